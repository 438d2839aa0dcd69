"""CUDA-only checks: bf16 autocast and torch.compile give the same losses as the plain float32 path (within bf16's
precision), and a compiled SMT step trains. Skipped without a GPU."""
import pytest
import torch

import smt
from conftest import tiny_cfg, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method", ["smt", "bptt"])
def test_bf16_autocast_matches_float32(method):
    model = tiny_model(with_encoder=method == "smt").cuda()
    x = torch.randint(0, 32, (4, 16), device="cuda")
    y = torch.roll(x, -1, dims=1)
    torch.manual_seed(0)
    full, _ = smt.LOSSES[method](model, x, y, tiny_cfg(method=method, future_len=4))
    torch.manual_seed(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half, _ = smt.LOSSES[method](model, x, y, tiny_cfg(method=method, future_len=4))
    assert abs(full.item() - half.item()) < 0.05 * abs(full.item())


def test_compiled_smt_step_trains():
    model = tiny_model().cuda()
    for part in (model.encoder, model.decoder, model.cell):
        part.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 32, (4, 16), device="cuda")
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = smt.smt_loss(model, x, y, tiny_cfg(future_len=4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert not any(k.startswith("_orig_mod") or "._orig_mod" in k for k in model.state_dict())
