"""The losses: SMT's one-step gradient path, BPTT against a hand-written loop, TBPTT's cut, DMT, and each loss
falling when it overfits a tiny batch."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import smt
from conftest import tiny_cfg, tiny_model
from model import CELLS, ENCODERS


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
    smt.bptt_loss(model, x, x, tiny_cfg(method="tbptt", bptt_window=4))
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
        logits = model.decoder(m)[:, 0]
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
    model = tiny_model(with_encoder=method == "smt")
    x = torch.randint(0, 32, (4, 16))
    y = torch.roll(x, -1, dims=1)
    losses = overfit(smt.LOSSES[method], model, tiny_cfg(method=method, future_len=4, bptt_window=4), x, y)
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


def test_evaluation_and_drift():
    model = tiny_model()
    x = torch.randint(0, 32, (2, 16))
    y = torch.roll(x, -1, dims=1)
    stats = smt.evaluate_rnn(model, x, y, context_len=8, primed=True)
    assert set(stats) == {"rnn_bpb", "rnn_tail_bpb", "rnn_primed_bpb"}
    assert all(0 < v < 10 for v in stats.values())
    d = smt.drift(model, x)
    assert len(d) == 16 and all(v >= 0 for v in d)


def test_rollout_samples_with_constant_memory():
    model = tiny_model(with_encoder=False)
    steps = list(smt.rollout(model, model.empty(2), torch.randint(0, 32, (2, 3)),
                             sample=lambda logits: logits.argmax(-1), num_new=5))
    assert len(steps) == 8
    assert all(m.shape == (2, 2, 16) for _, m in steps)
    for (_, m), (tok, _) in zip(steps[2:], steps[3:]):  # each generated token is the readout's choice
        assert torch.equal(tok, model.readout(m).argmax(-1))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("readout", ["decoder", "linear"])
def test_every_cell_works_with_every_method_and_readout(cell, readout):
    model = tiny_model(cell=cell, readout=readout)
    x = torch.randint(0, 32, (2, 14))
    y = torch.roll(x, -1, dims=1)
    for method in ("smt", "bptt", "tbptt", "dmt"):
        cfg = tiny_cfg(method=method, future_len=4, bptt_window=4, dmt_steps=8, dmt_every=2)
        loss, _ = smt.LOSSES[method](model, x, y, cfg)
        model.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in model.cell.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), (cell, readout, method)
        assert any(g.abs().sum() > 0 for g in grads)


def test_far_targets_line_up_and_do_not_reach_the_memory():
    """L_far scores y_{t+r} from m_t for each offset r, skips targets past the end, and m_t's far predictions are
    the same whatever comes after t: the target cannot leak into the memory or the query."""
    model = tiny_model()
    x, y = torch.randint(0, 32, (2, 20)), torch.randint(0, 32, (2, 20))
    pos, offsets = torch.tensor([-1, 4, 9]), torch.tensor([6, 11])
    m = model.memories(x, pos)
    logits = model.decoder.far(m.flatten(0, 1), offsets)
    assert logits.shape == (6, 2, 32)
    by_hand = [F.cross_entropy(logits.view(2, 3, 2, 32)[b, p, i], y[b, pos[p] + r])
               for b in range(2) for p in range(3) for i, r in enumerate(offsets.tolist()) if pos[p] + r < 20]
    assert len(by_hand) == 2 * 5  # t = 9, r = 11 would reach 20, past the end: skipped
    assert torch.allclose(smt.offset_loss(model, m, y, pos, offsets), torch.stack(by_hand).mean(), atol=1e-5)
    assert torch.isclose(smt.offset_loss(model, m, y, pos, torch.tensor([12])),  # 9 + 12 >= 20: skipped
                         torch.stack([F.cross_entropy(model.decoder.far(m[:, p], torch.tensor([12]))[:, 0],
                                                      y[:, pos[p] + 12]) for p in (0, 1)]).mean(), atol=1e-5)
    later = x.clone()
    later[:, 10:] = torch.randint(0, 32, (2, 10))  # every input after the last memory changes
    again = model.decoder.far(model.memories(later, pos).flatten(0, 1), offsets)
    assert torch.allclose(logits, again, atol=1e-6)
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # the distance reaches the prediction


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


def test_far_targets_train_with_smt():
    """With far_targets, smt_loss adds L_far; on a tiny batch it falls, and far offsets stay in
    (future_len, far_horizon]."""
    cfg = tiny_cfg(future_len=4, far_targets=3, far_horizon=8, far_positions=6)
    offsets = torch.stack([smt.far_offsets(cfg, "cpu") for _ in range(50)])
    assert offsets.min() == 5 and offsets.max() == 8 and all(len(set(o)) == 3 for o in offsets.tolist())
    far = smt_stat_while_overfitting(cfg, "far")
    assert far[0] > 0 and sum(far[-10:]) / 10 < 0.6 * far[0], far[::10]  # offsets are drawn anew each step: noisy


def test_past_targets_name_what_the_memory_read():
    """A past offset r = -s scores y_{t-s} = x_{t-s+1} from m_t (r = -1: x_t, the byte m_t read last), skips targets
    before the sequence start; past offsets stay in [-past_horizon, -1]; with past_targets smt_loss adds L_past, and
    on a tiny batch the memories learn to name what they read."""
    model = tiny_model()
    x = torch.randint(0, 32, (2, 20))
    y = torch.roll(x, -1, dims=1)
    pos, offsets = torch.tensor([-1, 4, 9]), torch.tensor([-1, -6])
    m = model.memories(x, pos)
    logits = model.decoder.far(m.flatten(0, 1), offsets).view(2, 3, 2, 32)
    by_hand = [F.cross_entropy(logits[b, p, i], x[b, pos[p] + r + 1])
               for b in range(2) for p in range(3) for i, r in enumerate(offsets.tolist()) if pos[p] + r >= 0]
    assert len(by_hand) == 2 * 3  # m_empty names nothing; m_4 read only 5 bytes, so not the 6th last
    assert torch.allclose(smt.offset_loss(model, m, y, pos, offsets), torch.stack(by_hand).mean(), atol=1e-5)

    cfg = tiny_cfg(future_len=4, past_targets=3, past_horizon=5, far_positions=6)
    offsets = torch.stack([smt.past_offsets(cfg, "cpu") for _ in range(50)])
    assert offsets.min() == -5 and offsets.max() == -1 and all(len(set(o)) == 3 for o in offsets.tolist())
    past = smt_stat_while_overfitting(cfg, "past")
    assert sum(past[-10:]) / 10 < 0.6 * past[0], past[::10]


def test_dmt_past_targets_train_the_rnns_own_step_and_cross_one_step():
    """In DMT, past_targets add coef_past L_past on the RNN's steps from its own (detached) memories: the loss is
    DMT's plus that term (same draws otherwise), its gradient reaches the cell through one step only, and on a tiny
    batch the RNN's own memories learn to name what they read."""
    model = tiny_model()
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    base = dict(method="dmt", future_len=4, dmt_steps=12, dmt_every=1, far_positions=6)
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
