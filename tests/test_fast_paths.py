"""The fast paths for CUDA compute what the plain ones do: flex_attention's block masks against SDPA's dense masks
(flex's forward runs eagerly on CPU), activation checkpointing against none, the chunked cross-entropy against
F.cross_entropy. All on CPU, float32."""
import pytest
import torch
import torch.nn.functional as F

import smt
from conftest import tiny_cfg, tiny_model


def encoder_both_ways(model, x, pos, grad):
    """The memories and encoder gradients with SDPA's dense masks, then with flex_attention's block masks."""
    results = []
    for flex in (False, True):
        model.zero_grad()
        model.encoder.flex = flex
        with torch.set_grad_enabled(grad):
            m = model.memories(x, pos)
        if grad:
            m.square().mean().backward()
        results.append((m.detach(), [p.grad.clone() for p in model.encoder.parameters()] if grad else []))
    return results


def test_flex_block_masks_match_dense_masks():
    """The sliding window (L > context_len) and the registers' windowed read, both ways (flex has no backward on CPU:
    the gradients are compared in test_gpu.py)."""
    model = tiny_model(mem_tokens=3, context_len=5)
    x = torch.randint(0, 32, (2, 19))
    (dense, _), (flex, _) = encoder_both_ways(model, x, torch.tensor([0, 3, 4, 9, 17, 18]), grad=False)
    assert torch.allclose(dense, flex, atol=1e-5)
    assert not torch.allclose(dense[:, 1], dense[:, 4], atol=1e-3)  # memories differ: the masks did something


@pytest.mark.parametrize("mode", ["cell", "all"])
def test_activation_checkpointing_changes_nothing_but_memory(mode):
    cfg = tiny_cfg(future_len=4, dec_positions=4)
    x = torch.randint(0, 32, (3, 14))
    y = torch.roll(x, -1, 1)
    grads = []
    for m in ("none", mode):
        model = tiny_model(context_len=6)
        model.set_act_ckpt(m)
        torch.manual_seed(3)
        loss, _ = smt.smt_loss(model, x, y, cfg)
        loss.backward()
        grads.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][name], atol=1e-6), name
    checked = {n for n, mod in model.named_modules() if getattr(mod, "act_ckpt", False)}
    assert checked == ({"cell.body"} if mode == "cell" else {"cell.body", "encoder.body", "decoder.body"})


def test_chunked_cross_entropy_is_exact(monkeypatch):
    monkeypatch.setattr(smt, "CE_CHUNK", 7 * 10)  # 7 rows of 10 logits a chunk: 50 rows make 8 chunks, the last short
    logits = torch.randn(5, 10, 10, requires_grad=True)
    targets = torch.randint(0, 10, (5, 10))
    targets[1, 3] = targets[4, 9] = -1
    ours = smt.cross_entropy(logits, targets)
    (g_ours,) = torch.autograd.grad((ours * torch.arange(50.0)).sum(), logits)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1, reduction="none")
    (g_ref,) = torch.autograd.grad((ref * torch.arange(50.0)).sum(), logits)
    assert ours.shape == (50,) and ours[13] == 0 and ours[49] == 0
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(g_ours, g_ref, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(smt.cross_entropy(logits, targets), ref, atol=1e-6)
    half = smt.cross_entropy(logits.detach().bfloat16(), targets)
    assert half.dtype == torch.float32  # computed in float32 from bfloat16 logits
