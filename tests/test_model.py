"""Shapes, causality, one-pass vs per-position equivalence, and the cells' batched vs one-by-one equivalence."""
import pytest
import torch

from conftest import tiny_model
from model import CELLS, ENCODERS, READOUTS, rms

TOL = 1e-5  # float32 on CPU: batched and one-at-a-time computations agree to rounding


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("readout", READOUTS)
def test_shapes(encoder, readout):
    model = tiny_model(encoder=encoder, readout=readout)
    x = torch.randint(0, 32, (3, 12))
    pos = torch.tensor([-1, 0, 5, 11])
    m = model.memories(x, pos)
    assert m.shape == (3, 4, 2, 16)
    assert torch.allclose(m[:, 0], model.empty(3))  # position -1 is m_empty
    assert model.step(m[:, 1], x[:, 1]).shape == (3, 2, 16)
    assert model.readout(m[:, 1]).shape == (3, 32)
    assert model.decoder(m[:, 1], x[:, :5]).shape == (3, 6, 32)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_memory_never_sees_the_future(encoder):
    model = tiny_model(encoder=encoder, context_len=6)
    x = torch.randint(0, 32, (2, 16))
    pos = torch.arange(16)
    before = model.memories(x, pos)
    for t in (0, 4, 9, 14):
        changed = x.clone()
        changed[:, t + 1:] = torch.randint(0, 32, changed[:, t + 1:].shape)
        after = model.memories(changed, pos)
        assert torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=TOL), f"memory <= {t} saw the future"
        if t + 1 < 16:  # and the check is not vacuous: later memories do change
            assert not torch.allclose(before[:, t + 1:], after[:, t + 1:], atol=1e-3)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_memory_sees_only_its_context_window(encoder):
    """The window encoder's m_t reads x[t-Tc+1..t]. The causal encoder's attention windows are Tc wide in each of
    its depth + 1 layers (stream and readout), so m_t reads at most (depth + 1) * (Tc - 1) + 1 tokens."""
    Tc, depth = 4, 1
    span = Tc if encoder == "window" else (depth + 1) * (Tc - 1) + 1
    model = tiny_model(encoder=encoder, context_len=Tc)
    x = torch.randint(0, 32, (2, 16))
    t = 12
    older = x.clone()
    older[:, : t - span + 1] = torch.randint(0, 32, (2, t - span + 1))  # everything before m_t's span
    assert torch.allclose(model.memories(x, torch.tensor([t])), model.memories(older, torch.tensor([t])), atol=TOL)
    inside = x.clone()
    inside[:, t - span + 1] = (x[:, t - span + 1] + 1) % 32  # the oldest token m_t may read
    assert not torch.allclose(model.memories(x, torch.tensor([t])), model.memories(inside, torch.tensor([t])))


@pytest.mark.parametrize("encoder", ENCODERS)
def test_one_pass_equals_one_pass_per_position(encoder):
    """All memories of a sequence from one call equal each memory computed alone from its own prefix."""
    model = tiny_model(encoder=encoder, context_len=5)
    x = torch.randint(0, 32, (2, 10))
    together = model.memories(x, torch.arange(10))
    for t in range(10):
        alone = model.memories(x[:, : t + 1], torch.tensor([t]))[:, 0]
        assert torch.allclose(together[:, t], alone, atol=TOL)


@pytest.mark.parametrize("cell", CELLS)
def test_cell_batched_equals_one_by_one(cell):
    model = tiny_model(cell=cell)
    m = rms(torch.randn(5, 2, 16))
    x = torch.randint(0, 32, (5,))
    batched = model.step(m, x)
    single = torch.cat([model.step(m[i: i + 1], x[i: i + 1]) for i in range(5)])
    assert batched.shape == m.shape
    assert torch.allclose(batched, single, atol=TOL)
    if cell not in ("nn_gru", "nn_lstm"):  # torch's RNNs as they are (BPTT baselines) do not normalise
        assert torch.allclose(batched.pow(2).mean(-1), torch.ones(5, 2), atol=1e-3)  # each memory token has RMS 1
    assert not torch.allclose(batched, m, atol=1e-3)  # and the step does something


@pytest.mark.parametrize("cell", ["lstm", "nn_lstm"])
def test_lstm_needs_even_memory(cell):
    with pytest.raises(AssertionError):
        tiny_model(cell=cell, mem_tokens=3)


@pytest.mark.parametrize("cell", [name for name, kind in CELLS.items() if hasattr(kind, "run")])
def test_a_fused_run_equals_its_steps(cell):
    """A cell's run() over a sequence gives what its steps give one at a time (the part the readout reads), within
    1e-5, and the last step's memory continues the run where it stopped."""
    model = tiny_model(cell=cell, mem_tokens=4)
    m = torch.randn(3, 4, 16)
    e = torch.randn(3, 9, 16)
    fused = model.cell.run(m, e)
    steps, memory = [], m
    for t in range(9):
        memory = model.cell(memory, e[:, t])
        steps.append(memory[:, : model.out_tokens])
    assert fused.shape == (3, 9, model.out_tokens, 16)
    assert torch.allclose(fused, torch.stack(steps, 1), atol=1e-5)
    assert torch.allclose(model.cell.run(memory, e[:, :2]), model.cell.run(m, torch.cat([e, e[:, :2]], 1))[:, 9:],
                          atol=1e-5)
