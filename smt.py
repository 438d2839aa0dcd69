"""Losses and rollouts: SMT, BPTT (and truncated BPTT), DMT, and the one RNN rollout that evaluation, DMT and
sampling share. The method is written out in SMT.md; section numbers below refer to it.

Indexing: x, y are (B, L) with y = -1 where there is no target (for text, y_t = x_{t+1}). The memory at position t
has read x_0..x_t and predicts y_t; position -1 is the empty memory. A transition is (m_t, x_{t+1}) -> m_{t+1}.
Loss functions take `cfg`, any object with the attributes they read (train.py's Config).
"""
import math

import torch
import torch.nn.functional as F

from model import CELLS, ENCODERS, READOUTS, SMTModel, rms  # noqa: F401  (re-exported for the CLIs)

LN2 = math.log(2.0)


def build_model(c, vocab_size, with_encoder):
    """The SMTModel that a run's plain config c (a dict, as checkpoints keep it) describes."""
    return SMTModel(vocab_size, c["d_model"], c["n_heads"], c["mem_tokens"], c["encoder_depth"], c["decoder_depth"],
                    c["rnn_depth"], c["context_len"], cell=c["cell"], encoder=c["encoder"], readout=c["readout"],
                    with_encoder=with_encoder)


def rollout(model, memory, tokens, detach_every=0, sample=None, num_new=0):
    """Runs the RNN from `memory` (N, K, d), one token at a time, with constant memory.

    Reads `tokens` (N, T) teacher-forced; then, when `sample` (logits -> tokens) is given, generates `num_new` more
    tokens, each fed back in. Yields (token, memory after reading it). detach_every=k cuts the gradient every k steps
    (truncated BPTT)."""
    for t in range(tokens.size(1)):
        memory = model.step(memory, tokens[:, t])
        if detach_every and (t + 1) % detach_every == 0:
            memory = memory.detach()
        yield tokens[:, t], memory
    for _ in range(num_new):
        token = sample(model.readout(memory))
        memory = model.step(memory, token)
        yield token, memory


def readout_ce(model, memories, targets):
    """Per-position cross-entropy (nats) of the readout: memories (B, T, K, d), targets (B, T) -> (B, T); 0 where
    there is no target."""
    B, T = targets.shape
    logits = model.readout(memories.flatten(0, 1)).float()
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-1, reduction="none").view(B, T)


def mean_bits(ce, targets):
    """Mean of per-position CE over the positions that have a target, in bits."""
    valid = targets >= 0
    return (ce * valid).sum() / valid.sum().clamp(min=1) / LN2


def uniformity(m, num=512):
    """log mean_{a != b} exp(-2 ||u_a - u_b||^2) over a random subsample of memory tokens scaled to unit norm."""
    u = m.reshape(-1, m.size(-1))
    if u.size(0) > num:
        u = u[torch.randperm(u.size(0), device=u.device)[:num]]
    u = F.normalize(u.float(), dim=-1)
    n = u.size(0)
    sq = (2 - 2 * u @ u.T).clamp(min=0)
    off = ~torch.eye(n, dtype=torch.bool, device=u.device)
    return torch.logsumexp(-2 * sq[off], dim=0) - math.log(n * (n - 1))


def positions_for(cfg, L, device):
    """The transitions t -> t+1 (t in [-1, L-2]) trained on this batch: all of them, or a random subset."""
    every = torch.arange(-1, L - 1, device=device)
    if cfg.positions == "all" or int(cfg.positions) >= L:
        return every
    return every[torch.randperm(L, device=device)[: int(cfg.positions)]].sort().values


def decoder_loss(model, m, x, y, pos, future_len, gamma):
    """L_dec: from memories m (B, P, K, d) at positions pos (P,), the decoder predicts y_t .. y_{t+F-1}, reading the
    true x_{t+1} .. x_{t+F-1} (teacher forcing). Targets past the sequence end are skipped. Returns (loss, first-step
    CE in nats): the second is the teacher's next-token loss from the memory alone, what the RNN's readout gets."""
    B, L = x.shape
    j = torch.arange(future_len, device=x.device)
    tgt_idx = pos[:, None] + j  # (P, F): y at t .. t+F-1
    inp = x[:, tgt_idx[:, 1:].clamp(max=L - 1)]  # (B, P, F-1): x_{t+1} .. x_{t+F-1}, read to predict y_{t+1} ..
    tgt = y[:, tgt_idx.clamp(0, L - 1)]
    tgt = tgt.masked_fill(((tgt_idx < 0) | (tgt_idx >= L))[None], -1)
    P = pos.numel()
    logits = model.decoder(m.flatten(0, 1), inp.flatten(0, 1)).float()  # (B*P, F, V)
    ce = F.cross_entropy(logits.flatten(0, 1), tgt.reshape(-1), ignore_index=-1, reduction="none").view(B, P, -1)
    valid = (tgt >= 0).float()
    weight = gamma ** j.float()
    loss = (ce * weight).sum() / valid.sum().clamp(min=1)
    first = (ce[..., 0]).sum() / valid[..., 0].sum().clamp(min=1)
    return loss, first


def dynamics_error(pred, target, before, weighting):
    """L_dyn: the MSE of predicted against target memories (..., K, d). weighting="change" adds to each transition's
    weight of 1 how far the teacher's memory moves in it (||target - before||^2 over its batch mean, detached),
    then halves: the rare transitions that write something (a probe's needle) would otherwise drown among the many
    that only keep, and those that keep still count."""
    err = ((pred.float() - target.float()) ** 2).mean(dim=(-2, -1))
    if weighting == "change":
        change = ((target.detach().float() - before.detach().float()) ** 2).mean(dim=(-2, -1))
        err = err * (1 + change / change.mean().clamp(min=1e-12)) / 2
    return err.mean()


def smt_loss(model, x, y, cfg):
    """SMT (section 4): L = coef_dec L_dec + coef_dyn L_dyn + coef_unif L_unif, every selected transition at once.

    Memories come from the teacher encoder for t and t+1; the RNN makes exactly one step from the teacher's m_t, so
    no gradient crosses more than one RNN step. cfg.detach_target stops L_dyn from shaping the encoder's targets.
    With cfg.coef_recall, + coef_recall L_recall (recall_loss on every target memory; not in the paper); with
    cfg.far_targets, + coef_far L_far (far_loss on far_positions of the memories; not in the paper)."""
    B, L = x.shape
    t = positions_for(cfg, L, x.device)  # (P,)
    P = t.numel()
    ends, index = torch.unique(torch.cat([t, t + 1]), return_inverse=True)
    mem = model.memories(x, ends)  # one encoder call for both ends of every transition, each memory once
    m_now, m_next = mem[:, index[:P]], mem[:, index[P:]]
    d = torch.randperm(P, device=x.device)[: min(P, cfg.dec_positions)]
    # memory_noise: the RNN learns to step from near the teacher's memories, not only from them (robust to drift)
    noisy = m_now + cfg.memory_noise * torch.randn_like(m_now) if cfg.memory_noise else m_now
    pred = model.step(noisy.flatten(0, 1), x[:, t + 1].reshape(-1)).view_as(m_next)
    target = m_next.detach() if cfg.detach_target else m_next
    dyn = dynamics_error(pred, target, m_now, cfg.dyn_weighting)
    dec, first = decoder_loss(model, m_now[:, d], x, y, t[d], cfg.future_len, cfg.gamma)
    unif = uniformity(mem)
    loss = cfg.coef_dec * dec + cfg.coef_dyn * dyn + cfg.coef_unif * unif
    stats = dict(dec=dec.item(), dyn=dyn.item(), unif=unif.item(), teacher_bpb=first.item() / LN2)
    if cfg.far_targets:
        f = torch.randperm(P, device=x.device)[: min(P, cfg.far_positions)]
        far = far_loss(model, m_now[:, f], y, t[f], far_offsets(cfg, x.device))
        loss = loss + cfg.coef_far * far
        stats["far"] = far.item()
    if cfg.coef_recall:
        recall = recall_loss(model, m_next, x[:, t + 1])
        loss = loss + cfg.coef_recall * recall
        stats["recall"] = recall.item()
    return loss, stats


def far_offsets(cfg, device):
    """far_targets distinct offsets r in (future_len, far_horizon], drawn anew each batch (shared by its memories)."""
    span = cfg.far_horizon - cfg.future_len
    return cfg.future_len + 1 + torch.randperm(span, device=device)[: cfg.far_targets]


def far_loss(model, m, y, pos, offsets):
    """L_far: CE of predicting y_{t+r} from the memory m_t alone (Decoder.far), m (B, P, K, d) at positions pos
    (P,), for each offset r (R,); targets past the sequence end are skipped. The decoder predicts only future_len
    tokens, so without this a memory need not keep what is needed later than that (a name said again 60 bytes on),
    and then the memories in between do not hold it and no RNN step can carry it. Full-length decoding would cost
    the whole horizon per memory; here each memory costs R query tokens."""
    L = y.size(1)
    idx = pos[:, None] + offsets[None]  # (P, R)
    tgt = y[:, idx.clamp(max=L - 1)].masked_fill((idx >= L)[None], -1)
    logits = model.decoder.far(m.flatten(0, 1), offsets).float()  # (B*P, R, V)
    return F.cross_entropy(logits.flatten(0, 1), tgt.reshape(-1), ignore_index=-1, reduction="sum") / (
        (tgt >= 0).sum().clamp(min=1))


def recall_loss(model, m, tokens):
    """CE of naming the last input from its memory, m (..., K, d) against tokens (...): the mean memory token
    scored against the encoder's input embeddings. A memory may otherwise leave out what it just read whenever
    the future inputs the decoder is given imply it (a probe's marker, right before the needle), and then the
    next memory cannot be computed from it: the RNN's step would have no rule to learn."""
    d = m.size(-1)
    logits = m.float().mean(-2).reshape(-1, d) @ model.encoder.embed.weight.T / math.sqrt(d)  # (N, V)
    return F.cross_entropy(logits, tokens.reshape(-1))


def bptt_loss(model, x, y, cfg):
    """BPTT (section 6): unroll from m_empty over the whole sequence, readout CE at every step, backprop through
    the unroll. cfg.bptt_window = k > 0 makes it truncated BPTT: memory carried on, gradient cut every k steps."""
    window = cfg.bptt_window if cfg.method == "tbptt" else 0
    memories = torch.stack([m for _, m in rollout(model, model.empty(x.size(0)), x, detach_every=window)], dim=1)
    ce = readout_ce(model, memories, y)
    loss = mean_bits(ce, y) * LN2
    return loss, dict(ce=loss.item(), bpb=loss.item() / LN2)


def dmt_loss(model, x, y, cfg):
    """DMT (section 5): start from the teacher's memory at a random t0, let the RNN run on its own memories (no
    gradient through the unroll), and every dmt_every steps regress f(m_hat_t, x_{t+1}) onto the teacher's
    m_{t+1}. Optional readout CE on the RNN's own memory, input detached. The teacher (encoder) is frozen."""
    B, L = x.shape
    Td = min(cfg.dmt_steps, L - 1)
    k = min(cfg.dmt_every, Td - 1)
    t0 = int(torch.randint(-1, L - Td, (1,)))
    with torch.no_grad():
        teacher = model.memories(x, torch.arange(t0, t0 + Td + 1, device=x.device))  # m_{t0} .. m_{t0+Td}
        own = [m for _, m in rollout(model, teacher[:, 0], x[:, t0 + 1: t0 + Td])]  # m_hat_{t0+1} .. m_hat_{t0+Td-1}
    j = torch.arange(k - 1, Td - 1, k, device=x.device)  # compare every k-th own memory (index j <-> t0+1+j)
    m_hat = torch.stack(own, dim=1)[:, j]
    inputs = x[:, t0 + 2 + j]
    pred = model.step(m_hat.flatten(0, 1), inputs.reshape(-1)).view_as(m_hat)
    dyn = dynamics_error(pred, teacher[:, j + 2], teacher[:, j + 1], cfg.dyn_weighting)
    unif = uniformity(pred)
    ce = readout_ce(model, pred.detach(), y[:, t0 + 2 + j])
    readout = mean_bits(ce, y[:, t0 + 2 + j]) * LN2
    loss = cfg.dmt_coef_dyn * dyn + cfg.dmt_coef_unif * unif + cfg.dmt_coef_readout * readout
    return loss, dict(dyn=dyn.item(), unif=unif.item(), readout_bpb=readout.item() / LN2)


LOSSES = dict(smt=smt_loss, bptt=bptt_loss, tbptt=bptt_loss, dmt=dmt_loss)


@torch.no_grad()
def evaluate_rnn(model, x, y, context_len, primed):
    """The RNN's own held-out loss, reading x step by step (teacher-forced), in bits per byte:
    rnn_bpb from m_empty over all of x; rnn_tail_bpb the same run over positions >= context_len; and, with primed,
    rnn_primed_bpb over those same positions after the teacher encoder primes the memory on x[:, :context_len]."""
    own = torch.stack([m for _, m in rollout(model, model.empty(x.size(0)), x)], dim=1)
    ce = readout_ce(model, own, y)
    out = dict(rnn_bpb=mean_bits(ce, y).item(),
               rnn_tail_bpb=mean_bits(ce[:, context_len:], y[:, context_len:]).item())
    if primed:
        m0 = model.memories(x, torch.tensor([context_len - 1], device=x.device))[:, 0]
        run = torch.stack([m for _, m in rollout(model, m0, x[:, context_len:])], dim=1)
        out["rnn_primed_bpb"] = mean_bits(readout_ce(model, run, y[:, context_len:]), y[:, context_len:]).item()
    return out


@torch.no_grad()
def evaluate_probe(model, x, y, whole, whole_too=False):
    """A probe's score for the RNN alone, reading each whole task sequence x from m_empty: rnn_acc, the share of
    target positions where its readout's top token is the target (whole: the share of sequences with every target
    right); rnn_target_bits, its loss per target; and, with a teacher, teacher_acc from the teacher's memories.
    whole_too adds rnn_whole_acc, the share of sequences with every target right, to a per-target rnn_acc."""
    B, L = x.shape
    own = torch.stack([m for _, m in rollout(model, model.empty(B), x)], dim=1)
    logits = model.readout(own.flatten(0, 1)).view(B, L, -1)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.reshape(-1), ignore_index=-1, reduction="none").view(B, L)
    out = dict(rnn_acc=accuracy(logits, y, whole), rnn_target_bits=mean_bits(ce, y).item())
    if whole_too:
        out["rnn_whole_acc"] = accuracy(logits, y, True)
    if model.encoder is not None:
        mem = model.memories(x, torch.arange(L, device=x.device))
        out["teacher_acc"] = accuracy(model.readout(mem.flatten(0, 1)).view(B, L, -1), y, whole)
    return out


def accuracy(logits, y, whole):
    """Share of targets (y >= 0) that are the top logit; whole: share of rows with every target right."""
    valid = y >= 0
    right = (logits.argmax(-1) == y) | ~valid
    if whole:
        return right.all(dim=1)[valid.any(dim=1)].float().mean().item()
    return (right & valid).sum().item() / max(1, valid.sum().item())


@torch.no_grad()
def drift(model, x, start=-1):
    """delta_t = MSE(m_hat_t, m_t) per step t: the RNN reading x from the teacher's memory at `start` against the
    teacher's own memories. Returns a list, one value per step."""
    L = x.size(1)
    teacher = model.memories(x, torch.arange(start, L, device=x.device))
    own = torch.stack([m for _, m in rollout(model, teacher[:, 0], x[:, start + 1:])], dim=1)
    return ((own.float() - teacher[:, 1:].float()) ** 2).mean(dim=(0, 2, 3)).tolist()
