"""The losses: SMT's one-step gradient path, BPTT against a hand-written loop, TBPTT's cut, DMT, and each loss
falling when it overfits a tiny batch."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import smt
from conftest import tiny_cfg, tiny_model
from model import CELLS, ENCODERS, READOUTS


def record_cell_calls(model):
    """Wraps the cell so every call's input memory and output memory are kept."""
    calls = []
    forward = model.cell.forward

    def recording(m, e):
        out = forward(m, e)
        calls.append((m, out))
        return out
    model.cell.forward = recording
    return calls


def graph_nodes(tensor):
    """Every autograd node the tensor's value was computed through."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


def longest_cell_chain(calls):
    """The most RNN steps any gradient path crosses: call j feeds call i if j's output is in i's input graph."""
    depth = []
    for i, (m_in, _) in enumerate(calls):
        nodes = graph_nodes(m_in)
        feeders = [depth[j] for j in range(i) if calls[j][1].grad_fn in nodes]
        depth.append(1 + max(feeders, default=0))
    return max(depth)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_smt_gradient_crosses_one_rnn_step(encoder):
    model = tiny_model(encoder=encoder)
    calls = record_cell_calls(model)
    x, y = torch.randint(0, 32, (2, 12)), torch.randint(0, 32, (2, 12))
    loss, _ = smt.smt_loss(model, x, y, tiny_cfg(future_len=4))
    loss.backward()
    assert len(calls) == 1  # every transition in one batched step
    assert longest_cell_chain(calls) == 1
    assert model.encoder.registers.grad.abs().sum() > 0  # joint training: the encoder is shaped too
    assert model.cell.body.blocks[0].mlp.up.weight.grad.abs().sum() > 0


def test_chain_check_sees_bptt_chains():
    """The check above can fail: on BPTT it finds the full unroll."""
    model = tiny_model(with_encoder=False)
    calls = record_cell_calls(model)
    x = torch.randint(0, 32, (2, 9))
    smt.bptt_loss(model, x, x, tiny_cfg(method="bptt"))
    assert longest_cell_chain(calls) == 9


def test_tbptt_cuts_every_window():
    model = tiny_model(with_encoder=False)
    calls = record_cell_calls(model)
    x = torch.randint(0, 32, (2, 12))
    smt.bptt_loss(model, x, x, tiny_cfg(method="tbptt"), window=4)
    assert longest_cell_chain(calls) == 4


@pytest.mark.parametrize("cell", CELLS)
def test_bptt_equals_hand_written_loop(cell):
    model = tiny_model(cell=cell, with_encoder=False)
    x, y = torch.randint(0, 32, (3, 7)), torch.randint(0, 32, (3, 7))
    y[0, 2] = -1  # no target here
    loss, _ = smt.bptt_loss(model, x, y, tiny_cfg(method="bptt"))
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    m = model.m_empty / model.m_empty.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    m = m.expand(3, -1, -1)
    total, count = 0.0, 0
    for t in range(7):
        m = model.cell(m, model.rnn_embed(x[:, t]))
        logits = model.decoder(m[:, : model.out_tokens])[:, 0]  # an LSTM's readout reads h alone
        for b in range(3):
            if y[b, t] >= 0:
                total = total + F.cross_entropy(logits[b: b + 1], y[b, t: t + 1])
                count += 1
    hand = total / count
    hand_grads = torch.autograd.grad(hand, list(model.parameters()), allow_unused=True)
    assert torch.allclose(loss, hand, atol=1e-5)
    for g, h in zip(grads, hand_grads):
        assert (g is None) == (h is None)
        if g is not None:
            assert torch.allclose(g, h, atol=1e-5)


def test_decoder_inputs_and_targets_line_up():
    """From m_t the decoder reads x_{t+1..t+F-1} and is scored on y_t..y_{t+F-1}; targets before the sequence start
    (t = -1) or past its end are skipped. A fake decoder that outputs exactly y at the expected places gets 0."""
    model = tiny_model()
    x, y = torch.randint(0, 32, (2, 10)), torch.randint(0, 32, (2, 10))
    pos, F_ = torch.tensor([-1, 3, 8]), 4
    seen = {}

    def fake_decoder(m, future):
        seen["future"] = future
        expected = y[:, (pos[:, None] + torch.arange(F_)).clamp(0, 9)].flatten(0, 1)  # (B * P, F)
        return F.one_hot(expected, 32).float() * 50
    model.decoder.forward = fake_decoder
    loss, first = smt.decoder_loss(model, model.memories(x, pos), x, y, pos, F_, gamma=1.0)
    assert loss.item() < 1e-6 and first.item() < 1e-6
    future = seen["future"].view(2, 3, F_ - 1)
    assert torch.equal(future[:, 0], x[:, 0:3]) and torch.equal(future[:, 1], x[:, 4:7])
    assert torch.equal(future[:, 2, :1], x[:, 9:10])


def overfit(loss_fn, model, cfg, x, y, steps=60, lr=3e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = loss_fn(model, x, y, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["smt", "bptt", "tbptt"])
def test_loss_falls_on_a_tiny_batch(method):
    torch.manual_seed(0)
    model = tiny_model(with_encoder=smt.METHODS[method].teacher)
    x = torch.randint(0, 32, (4, 16))
    y = torch.roll(x, -1, dims=1)
    losses = overfit(smt.METHODS[method].loss, model, tiny_cfg(method=method, future_len=4, bptt_window=4), x, y)
    assert losses[-1] < 0.6 * losses[0], losses[::10]


def test_memory_noise_perturbs_only_the_rnn_input():
    """memory_noise: the RNN steps from a noisy teacher memory; the target and the decoder's memory stay clean."""
    model = tiny_model()
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    stats = {}
    for noise in (0.0, 1.0):
        torch.manual_seed(0)
        stats[noise] = smt.smt_loss(model, x, y, tiny_cfg(future_len=4, memory_noise=noise))[1]
    assert stats[1.0]["dec"] == stats[0.0]["dec"] and stats[1.0]["unif"] == stats[0.0]["unif"]
    assert stats[1.0]["dyn"] > stats[0.0]["dyn"]


def test_change_weighting_counts_the_transitions_that_write():
    """dyn_weighting=change: weight (1 + change / mean change) / 2 per transition; uniform is the plain MSE."""
    before = torch.zeros(2, 1, 4)
    target = torch.stack([torch.zeros(1, 4), torch.full((1, 4), 2.0)])  # transition 0 keeps, 1 writes (change 4)
    pred = target + torch.stack([torch.full((1, 4), 1.0), torch.full((1, 4), 1.0)])  # both off by 1 (error 1)
    assert smt.dynamics_error(pred, target, before, "uniform") == pytest.approx(F.mse_loss(pred, target).item())
    assert smt.dynamics_error(pred, target, before, "change") == pytest.approx((0.5 * 1 + 1.5 * 1) / 2)
    pred_off_on_write = target + torch.stack([torch.zeros(1, 4), torch.full((1, 4), 1.0)])
    pred_off_on_keep = target + torch.stack([torch.full((1, 4), 1.0), torch.zeros(1, 4)])
    assert smt.dynamics_error(pred_off_on_write, target, before, "change") == pytest.approx(0.75)
    assert smt.dynamics_error(pred_off_on_keep, target, before, "change") == pytest.approx(0.25)


def test_recall_makes_memories_name_their_last_input():
    """recall_loss is low for memories that carry their last input's embedding, high for others; in smt_loss it
    shapes only the teacher (the RNN's step does not enter it)."""
    model = tiny_model()
    tokens = torch.randint(0, 32, (8, 5), generator=torch.Generator().manual_seed(0))
    naming = 3 * model.encoder.embed.weight[tokens].detach()[..., None, :].expand(-1, -1, 2, -1)  # (8, 5, K, d)
    assert smt.recall_loss(model, naming, tokens) < smt.recall_loss(model, naming, tokens.roll(1, dims=0)) - 1
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = tiny_cfg(future_len=4, coef_dec=0.0, coef_dyn=0.0, coef_unif=0.0, coef_recall=1.0)
    loss, stats = smt.smt_loss(model, x, torch.roll(x, -1, dims=1), cfg)
    loss.backward()
    assert loss.item() == pytest.approx(stats["recall"]) and model.encoder.embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.cell.parameters())


def test_dmt_lowers_its_loss_and_trains_only_the_rnn():
    torch.manual_seed(0)
    model = tiny_model()
    x = torch.randint(0, 32, (4, 16))
    y = torch.roll(x, -1, dims=1)
    cfg = tiny_cfg(method="dmt", future_len=4, dmt_steps=12, dmt_every=3)
    overfit(smt.smt_loss, model, cfg, x, y, steps=30)
    model.encoder.requires_grad_(False)
    encoder_before = [p.clone() for p in model.encoder.parameters()]
    losses = overfit(smt.dmt_loss, model, cfg, x, y, steps=60)
    assert losses[-1] < 0.7 * losses[0], losses[::10]
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, model.encoder.parameters()))


def test_evaluation_and_drift_match_a_step_by_step_loop():
    """evaluate_rnn's three scores and drift's per-step MSE, against the RNN stepped by hand (tolerance 1e-5)."""
    model = tiny_model()
    x = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    y[0, 5] = -1  # a position without a target is left out
    with torch.no_grad():
        stats = smt.evaluate_rnn(model, x, y, context_len=8, primed=True)
        teacher = model.memories(x, torch.arange(16))

        def loop(m, start):
            ces, memories = [], []
            for t in range(start, 16):
                m = model.step(m, x[:, t])
                memories.append(m)
                ces += [F.cross_entropy(model.readout(m)[b], y[b, t]) / smt.LN2 for b in range(2) if y[b, t] >= 0]
            return ces, memories
        ces, own = loop(model.empty(2), 0)
        primed, _ = loop(teacher[:, 7], 8)
        tail = [c for c, (b, t) in zip(ces, [(b, t) for t in range(16) for b in range(2) if y[b, t] >= 0]) if t >= 8]
        by_hand = dict(rnn_bpb=torch.stack(ces).mean(), rnn_tail_bpb=torch.stack(tail).mean(),
                       rnn_primed_bpb=torch.stack(primed).mean())
        assert stats == pytest.approx({k: v.item() for k, v in by_hand.items()}, abs=1e-5)
        assert len(ces) == 31 and len(tail) == 16
        drifts = smt.drift(model, x)
        assert drifts == pytest.approx([F.mse_loss(own[t], teacher[:, t]).item() for t in range(16)], abs=1e-6)
        assert drifts[0] > 0  # m_empty's first step is not the teacher's m_0 in an untrained model


def test_rollout_samples_with_constant_memory():
    model = tiny_model(with_encoder=False)
    steps = list(smt.rollout(model, model.empty(2), torch.randint(0, 32, (2, 3)),
                             sample=lambda logits: logits.argmax(-1), num_new=5))
    assert len(steps) == 8
    assert all(m.shape == (2, 2, 16) for _, m in steps)
    for (_, m), (tok, _) in zip(steps[2:], steps[3:]):  # each generated token is the readout's choice
        assert torch.equal(tok, model.readout(m).argmax(-1))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("readout", READOUTS)
def test_every_cell_works_with_every_method_and_readout(cell, readout):
    model = tiny_model(cell=cell, readout=readout)
    x = torch.randint(0, 32, (2, 14))
    y = torch.roll(x, -1, dims=1)
    for method in smt.METHODS:
        cfg = tiny_cfg(method=method, future_len=4, bptt_window=4, dmt_steps=8, dmt_every=2)
        loss, _ = smt.METHODS[method].loss(model, x, y, cfg)
        model.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in model.cell.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), (cell, readout, method)
        assert any(g.abs().sum() > 0 for g in grads)


def smt_stat_while_overfitting(cfg, key, steps=100):
    """One of smt_loss's stats at each of `steps` steps of overfitting a tiny model to one batch of 4 x 16 tokens."""
    torch.manual_seed(0)
    model = tiny_model()
    x = torch.randint(0, 32, (4, 16))
    y = torch.roll(x, -1, dims=1)
    values = []

    def recording(*args):
        loss, stats = smt.smt_loss(*args)
        values.append(stats[key])
        return loss, stats
    overfit(recording, model, cfg, x, y, steps=steps)
    return values


def test_past_targets_name_what_the_memory_read():
    """A past offset s scores y_{t-s} = x_{t-s+1} from m_t (s = 1: x_t, the byte m_t read last) and skips targets
    before the sequence start, with positions shared by the batch or each row's own; the memory's predictions do not
    depend on anything read after t; with past_targets smt_loss adds L_past, and on a tiny batch the memories learn
    to name what they read."""
    model = tiny_model()
    x = torch.randint(0, 32, (2, 20))
    y = torch.roll(x, -1, dims=1)
    cfg = tiny_cfg(past_targets=6, past_horizon=6, past_positions=3)  # every offset, every memory, in drawn order
    for pos in (torch.tensor([-1, 4, 9]), torch.tensor([[-1, 4, 9], [2, 3, 12]])):
        torch.manual_seed(0)  # past_loss's draws: which memories, then which offsets (the queries see one another)
        order, offsets = torch.randperm(3), -1 - torch.randperm(6)
        rows = pos.expand(2, -1)
        m = torch.stack([model.memories(x[b: b + 1], rows[b])[0] for b in range(2)])  # (B, P, K, d)
        logits = model.decoder.at_offsets(m[:, order].flatten(0, 1), offsets).view(2, 3, 6, 32)
        rows = rows[:, order]
        by_hand = [F.cross_entropy(logits[b, p, i], x[b, rows[b, p] + r + 1]) for b in range(2) for p in range(3)
                   for i, r in enumerate(offsets.tolist()) if rows[b, p] + r >= 0]
        assert len(by_hand) == sum(min(6, max(t, 0)) for t in rows.flatten().tolist())  # s <= t: within the sequence
        torch.manual_seed(0)
        assert torch.allclose(smt.past_loss(model, m, y, pos, cfg), torch.stack(by_hand).mean(), atol=1e-5)
    later = x.clone()
    later[:, 10:] = torch.randint(0, 32, (2, 10))  # every input after the last memory changes
    pos = torch.tensor([-1, 4, 9])
    again = model.decoder.at_offsets(model.memories(later, pos).flatten(0, 1), offsets)
    assert torch.allclose(model.decoder.at_offsets(model.memories(x, pos).flatten(0, 1), offsets), again, atol=1e-6)

    past = smt_stat_while_overfitting(tiny_cfg(future_len=4, past_targets=3, past_horizon=5, past_positions=6), "past")
    assert sum(past[-10:]) / 10 < 0.6 * past[0], past[::10]


def test_dmt_past_targets_train_the_rnns_own_step_and_cross_one_step():
    """In DMT, past_targets add coef_past L_past on the RNN's steps from its own (detached) memories: the loss is
    DMT's plus that term (same draws otherwise), its gradient reaches the cell through one step only, and on a tiny
    batch the RNN's own memories learn to name what they read."""
    model = tiny_model()
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    base = dict(method="dmt", future_len=4, dmt_steps=12, dmt_every=1, past_positions=6)
    torch.manual_seed(3)
    plain, _ = smt.dmt_loss(model, x, y, tiny_cfg(**base))
    calls = record_cell_calls(model)
    torch.manual_seed(3)
    loss, stats = smt.dmt_loss(model, x, y, tiny_cfg(**base, past_targets=3, past_horizon=6, coef_past=0.5))
    assert loss.item() == pytest.approx(plain.item() + 0.5 * stats["past"], rel=1e-5)
    loss.backward()
    assert longest_cell_chain(calls) == 1
    assert model.cell.body.blocks[0].mlp.up.weight.grad.abs().sum() > 0
    del model.cell.forward  # back to the class's forward, unrecorded

    model.encoder.requires_grad_(False)
    only_past = tiny_cfg(**base, past_targets=3, past_horizon=6, dmt_coef_dyn=0.0, dmt_coef_unif=0.0,
                         dmt_coef_readout=0.0)
    torch.manual_seed(0)
    losses = overfit(smt.dmt_loss, model, only_past, x, y, steps=150)
    freq = torch.bincount(x.flatten(), minlength=32).float() / x.numel()
    unigram = -(freq[freq > 0] * freq[freq > 0].log()).sum().item()  # the best guess that reads no memory
    assert sum(losses[-10:]) / 10 < unigram - 0.5, (unigram, losses[::15])


def test_dmt_readout_grad_trains_the_rnns_step_through_one_step_only():
    """dmt_readout_grad routes the readout CE into the RNN's step from its own memory (same loss, same draws): without
    it the cell gets no gradient from the readout; with it, a gradient that crosses one RNN step."""
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    only_readout = dict(method="dmt", future_len=4, dmt_steps=12, dmt_every=1, dmt_coef_dyn=0.0, dmt_coef_unif=0.0)
    grads, losses = {}, {}
    for through in (False, True):
        model = tiny_model()
        calls = record_cell_calls(model)
        torch.manual_seed(3)
        loss, _ = smt.dmt_loss(model, x, y, tiny_cfg(**only_readout, dmt_readout_grad=through))
        loss.backward()
        grads[through] = model.cell.body.blocks[0].mlp.up.weight.grad
        losses[through] = loss.item()
        assert model.decoder.head.weight.grad.abs().sum() > 0  # the readout learns either way
    assert losses[False] == pytest.approx(losses[True], rel=1e-6)
    assert grads[False] is None or grads[False].abs().sum() == 0
    assert grads[True].abs().sum() > 0
    assert longest_cell_chain(calls) == 1


def test_evaluations_compare_and_leave_training_randomness_alone(tmp_path, text_file):
    """With a random subset of transitions (positions=N), every evaluation scores the teacher on the same ones, and
    the training's random stream goes on as if no evaluation had run."""
    import data
    folder = data.prepare(data.DataConfig(str(text_file), str(tmp_path / "data")))
    torch.manual_seed(0)
    model = smt.SMTModel(256, 16, 2, 2, 1, 1, 1, 8)  # bytes
    cfg = tiny_cfg(context_len=8, future_len=4, positions="3", dec_positions=2, eval_iters=2, batch_size=4)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        stats = smt.evaluate(model, cfg, data.Batches(folder, 12, 4), contextlib.nullcontext())
        runs.append((stats, torch.rand(1)))
    assert runs[0][0] == runs[1][0] and "val_teacher_bpb" in runs[0][0]
    torch.manual_seed(1)
    assert torch.equal(runs[1][1], torch.rand(1))


class Lookup(torch.nn.Module):
    """A stand-in teacher encoder whose memory at t is the embedding of x_t alone (one memory token)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x, pos):
        return self.table[x[:, pos]][:, :, None]  # (B, P, 1, d)


class Reads(torch.nn.Module):
    """A stand-in RNN cell whose next memory is its input's embedding: f(m, e) = e."""

    def forward(self, m, e):
        return e[:, None]


def test_dmt_pairs_each_step_with_the_next_input_and_the_next_target():
    """A model whose teacher memory m_t is the embedding of x_t, whose RNN step writes the input's embedding and whose
    readout names the token after the one its memory holds, on sequences x_t = (s + t) mod V: every one of DMT's
    transitions matches the teacher exactly (dyn 0) and the readout is right (bits ~0), wherever each sequence's t0
    falls. Inputs or targets shifted by one position would give a large dyn or readout loss."""
    V = 8
    table = torch.eye(16)[:V] * 4  # one-hot rows, already RMS-normalised (rms = 1)
    model = tiny_model(mem_tokens=1)
    model.encoder, model.cell = Lookup(table), Reads()
    model.rnn_embed = torch.nn.Embedding.from_pretrained(table)
    model.readout_head = torch.nn.Linear(16, V, bias=False)
    model.readout_head.weight.data.copy_(4 * table.roll(1, dims=0))  # logit of u: 16 * [memory holds u - 1]
    model.readout_head = torch.nn.Sequential(torch.nn.Flatten(), model.readout_head)
    x = (torch.arange(6)[:, None] * 3 + torch.arange(20)) % V
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -1
    for steps, every in ((12, 1), (8, 3), (19, 4)):
        torch.manual_seed(steps)
        cfg = tiny_cfg(method="dmt", dmt_steps=steps, dmt_every=every, dmt_coef_unif=0.0)
        _, stats = smt.dmt_loss(model, x, y, cfg)
        assert stats["dyn"] == 0.0 and stats["readout_bpb"] < 1e-5, (steps, every, stats)
    shifted = torch.roll(y, -1, dims=1)
    shifted[:, -2:] = -1
    _, stats = smt.dmt_loss(model, x, shifted, tiny_cfg(method="dmt", dmt_steps=12))
    assert stats["readout_bpb"] > 10  # the check above can fail
