"""CUDA-only checks: bf16 autocast and torch.compile give the same losses as the plain float32 path (within bf16's
precision), a compiled SMT step trains, CUDA-graphed rollouts give what eager ones do, flex_attention's block masks
give SDPA's gradients, train.py compiles apart and logs MFU and memory. Skipped without a GPU."""
import pytest
import torch

import smt
from conftest import tiny_cfg, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method", ["smt", "bptt"])
def test_bf16_autocast_matches_float32(method):
    model = tiny_model(with_encoder=smt.METHODS[method].teacher).cuda()
    x = torch.randint(0, 32, (4, 16), device="cuda")
    y = torch.roll(x, -1, dims=1)
    torch.manual_seed(0)
    full, _ = smt.METHODS[method].loss(model, x, y, tiny_cfg(method=method, future_len=4, positions="all"))
    torch.manual_seed(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half, _ = smt.METHODS[method].loss(model, x, y, tiny_cfg(method=method, future_len=4, positions="all"))
    assert abs(full.item() - half.item()) < 0.05 * abs(full.item())


@pytest.mark.parametrize("d_model", [16, 32])
def test_compiled_smt_step_trains(d_model):
    """Sequences longer than context_len, compiled: with heads of 16 (d_model 32; the fused flex kernel's least) the
    windows are flex BlockMasks, with heads of 8 dense masks."""
    model = tiny_model(d_model=d_model).cuda()
    for part in (model.encoder, model.decoder, model.cell):
        part.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 32, (4, 16), device="cuda")
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = smt.smt_loss(model, x, y, tiny_cfg(future_len=4, positions="all"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert not any(k.startswith("_orig_mod") or "._orig_mod" in k for k in model.state_dict())


@pytest.mark.parametrize("autocast", [False, True])
def test_graphed_rollout_matches_plain(autocast, monkeypatch):
    """Teacher-forced reading then greedy generation: every yielded memory and token the same with CUDA graphs as
    without, each memory its own tensor (not a graph's buffer overwritten by the next replay), one graph per key."""
    model = tiny_model().cuda().eval()
    x = torch.randint(0, 32, (3, 9), device="cuda")
    runs = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for graphed in (False, True, True):  # the second graphed run replays the cached graphs
            monkeypatch.setattr(smt, "CUDA_GRAPHS", graphed)
            run = smt.rollout(model, model.empty(3), x, sample=lambda logits: logits.argmax(-1), num_new=6)
            runs.append([(token.clone(), memory) for token, memory in run])
    assert len(model._graphs[1]) == 2  # the step, and the step with its readout
    plain = runs[0]
    for graphed in runs[1:]:
        assert len(graphed) == len(plain) == 15
        for (tp, mp), (tg, mg) in zip(plain, graphed):
            assert torch.equal(tp, tg)
            assert torch.allclose(mp.float(), mg.float(), atol=1e-5 if not autocast else 2e-2)
    assert not torch.allclose(runs[1][3][1].float(), runs[1][4][1].float())  # memories kept, not overwritten


def test_graphs_follow_in_place_weight_updates(monkeypatch):
    model = tiny_model().cuda().eval()
    x = torch.randint(0, 32, (2, 5), device="cuda")
    with torch.no_grad():
        before = [m for _, m in smt.rollout(model, model.empty(2), x)][-1]
        for p in model.cell.parameters():
            p.mul_(1.5)  # in place, as AdamW and load_state_dict do
        graphed = [m for _, m in smt.rollout(model, model.empty(2), x)][-1]
        monkeypatch.setattr(smt, "CUDA_GRAPHS", False)
        plain = [m for _, m in smt.rollout(model, model.empty(2), x)][-1]
    assert torch.allclose(graphed, plain, atol=1e-5) and not torch.allclose(before, graphed, atol=1e-3)


def test_evaluate_rnn_graphed_equals_plain(monkeypatch):
    model = tiny_model().cuda()
    x = torch.randint(0, 32, (4, 20), device="cuda")
    y = torch.roll(x, -1, 1)
    graphed = smt.evaluate_rnn(model, x, y, 8, primed=True)
    monkeypatch.setattr(smt, "CUDA_GRAPHS", False)
    plain = smt.evaluate_rnn(model, x, y, 8, primed=True)
    assert graphed == pytest.approx(plain, rel=1e-5)


def test_flex_block_masks_match_dense_masks_with_gradients():
    from test_fast_paths import encoder_both_ways
    model = tiny_model(mem_tokens=3, context_len=5).cuda()
    x = torch.randint(0, 32, (2, 19), device="cuda")
    (dense, dense_grads), (flex, flex_grads) = encoder_both_ways(model, x, torch.tensor([0, 3, 9, 18], device="cuda"),
                                                                grad=True)
    assert torch.allclose(dense, flex, atol=1e-4)
    for a, b in zip(dense_grads, flex_grads):
        assert torch.allclose(a, b, atol=1e-4)


def test_train_on_cuda_compiles_apart_logs_mfu_and_memory(tmp_path, text_file):
    """train.py end to end on CUDA with torch.compile: the warm-up step reports compile time, log lines carry MFU
    (the device's peak from the table, or --peak_flops) and peak memory, evaluation runs (graphed rollouts)."""
    import json
    from conftest import run
    from test_cli import TINY
    tiny = [a for a in TINY if not a.startswith("--d_model")] + ["--d_model=32"]  # heads of 16: flex compiled
    result = run("train.py", f"--dataset={text_file}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'o'}",
                 *tiny, "--device=cuda", "--max_iters=10", "--eval_interval=5", "--peak_flops=1e15", "--lr=3e-3",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "compiled in " in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("iter 10/10"))
    assert "MFU " in line and " GiB" in line
    log = [json.loads(r) for r in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [5, 10]
    assert log[1]["val_rnn_bpb"] < log[0]["val_rnn_bpb"]  # on a CPU at these settings: 8.6 then 6.0
