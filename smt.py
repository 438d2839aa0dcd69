"""Losses and rollouts: SMT, BPTT (and truncated BPTT), DMT, and the one RNN rollout that evaluation, DMT and
sampling share. docs/method.md explains the method and maps it onto these functions.

Indexing: x, y are (B, L) with y = -1 where there is no target (for text, y_t = x_{t+1}). The memory at position t
has read x_0..x_t and predicts y_t; position -1 is the empty memory. A transition is (m_t, x_{t+1}) -> m_{t+1}.
Loss functions take `cfg`, any object with the attributes they read (config.Config, train.py's settings).
METHODS, after the losses, is the one place a training method is named: its loss and what train.py must build for it.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import SMTModel

LN2 = math.log(2.0)
CUDA_GRAPHS = True  # rollouts without gradients on CUDA replay CUDA graphs of the step (False: eager, to compare)
CE_CHUNK = 2 ** 24  # logits per chunk of cross_entropy: a float32 chunk of 64 MiB at most


def build_model(c, vocab_size, with_encoder):
    """The SMTModel that a run's plain config c (a dict, as checkpoints keep it) describes."""
    return SMTModel(vocab_size, c["d_model"], c["n_heads"], c["mem_tokens"], c["encoder_depth"], c["decoder_depth"],
                    c["rnn_depth"], c["context_len"], cell=c["cell"], encoder=c["encoder"], readout=c["readout"],
                    with_encoder=with_encoder)


def rollout(model, memory, tokens, detach_every=0, sample=None, num_new=0):
    """Runs the RNN from `memory` (N, K, d), one token at a time, with constant memory.

    Reads `tokens` (N, T) teacher-forced; then, when `sample` (logits -> tokens) is given, generates `num_new` more
    tokens, each fed back in. Yields (token, memory after reading it). detach_every=k cuts the gradient every k steps
    (truncated BPTT). On CUDA without gradients (evaluation, DMT's unroll, sampling) the steps replay CUDA graphs
    (GraphedStep) unless CUDA_GRAPHS is False; everywhere else they run eagerly. Every yielded memory is its own
    tensor."""
    graphs = graph_cache(model) if CUDA_GRAPHS and memory.is_cuda and not torch.is_grad_enabled() else None
    own = False  # the first step reads a memory from outside (m_empty, a teacher's), maybe of another dtype: eager
    for t in range(tokens.size(1)):
        memory, _ = advance(model, graphs if own else None, memory, tokens[:, t], False)
        own = True
        if detach_every and (t + 1) % detach_every == 0:
            memory = memory.detach()
        yield tokens[:, t], memory
    logits = model.readout(memory) if num_new else None
    for i in range(num_new):
        token = sample(logits)
        memory, logits = advance(model, graphs if own else None, memory, token, i < num_new - 1)
        own = True
        yield token, memory


def advance(model, graphs, memory, token, readout):
    """One step, and the readout of the new memory if asked: (memory, logits or None); replayed from a CUDA graph
    of the cache `graphs` when given (captured on first use for this batch size, dtype and autocast state)."""
    if graphs is None:
        memory = model.step(memory, token)
        return memory, model.readout(memory) if readout else None
    key = (memory.shape, memory.dtype, token.dtype, readout, torch.is_autocast_enabled("cuda"),
           torch.get_autocast_dtype("cuda"))
    if key not in graphs:
        graphs[key] = GraphedStep(model, memory, token, readout)
    return graphs[key](memory, token)


def graph_cache(model):
    """The model's CUDA graphs, emptied when its parameters moved (a graph reads the tensors it was captured with;
    in-place updates such as the optimizer's and load_state_dict's are seen, new tensors are not)."""
    where = tuple(p.data_ptr() for p in model.parameters())
    if getattr(model, "_graphs", (None,))[0] != where:
        model._graphs = (where, {})
    return model._graphs[1]


class GraphedStep:
    """One RNN step (and optionally the readout of its result) captured as a CUDA graph: static input buffers, warmed
    up on a side stream, captured once, then replayed per call with the inputs copied in and the outputs cloned out
    (so that they survive the next replay). Under autocast the capture runs with cache_enabled=False, as CUDA graphs
    need. The eager forwards are captured, not a torch.compile'd part's (train.py compiles the parts for the
    training shapes: capturing those would recompile for every rollout shape)."""

    def __init__(self, model, memory, token, readout):
        self.model, self.readout = model, readout
        self.memory, self.token = memory.clone(), token.clone()
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        with torch.compiler.set_stance("force_eager"), autocast:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # lazy initialisations (cuBLAS handles, workspaces) happen here, not in capture
                    self.run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.run()

    def run(self):
        memory = self.model.step(self.memory, self.token)
        return memory, self.model.readout(memory) if self.readout else None

    def __call__(self, memory, token):
        self.memory.copy_(memory)
        self.token.copy_(token)
        self.graph.replay()
        return tuple(None if out is None else out.clone() for out in self.out)


def readout_ce(model, memories, targets):
    """Per-position cross-entropy (nats) of the readout: memories (B, T, K, d), targets (B, T) -> (B, T); 0 where
    there is no target."""
    B, T = targets.shape
    return cross_entropy(model.readout(memories.flatten(0, 1)), targets).view(B, T)


def cross_entropy(logits, targets):
    """F.cross_entropy in float32, per position (0 where the target is -1): logits (..., V), targets (...) -> (N,)
    flat. In chunks, each recomputed in backward when it needs gradients, so that no float32 copy of all the
    logits (nor of their log-softmax) is ever held at once: only the logits in their own dtype are kept."""
    flat, tgt = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    rows = max(1, CE_CHUNK // flat.size(1))
    if flat.size(0) <= rows:
        return chunk_ce(flat, tgt)
    grad = torch.is_grad_enabled() and flat.requires_grad
    return torch.cat([checkpoint(chunk_ce, f, t, use_reentrant=False) if grad else chunk_ce(f, t)
                      for f, t in zip(flat.split(rows), tgt.split(rows))])


def chunk_ce(logits, targets):
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="none")


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
    logits = model.decoder(m.flatten(0, 1), inp.flatten(0, 1))  # (B*P, F, V)
    ce = cross_entropy(logits, tgt).view(B, P, -1)
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
    """SMT: L = coef_dec L_dec + coef_dyn L_dyn + coef_unif L_unif, every selected transition at once.

    Memories come from the teacher encoder for t and t+1; the RNN makes exactly one step from the teacher's m_t, so
    no gradient crosses more than one RNN step, and L_dyn shapes the encoder's memories as well as the RNN (joint
    training, as in the paper). With cfg.coef_recall, + coef_recall L_recall (recall_loss on every target memory);
    with cfg.past_targets, + coef_past L_past (past_loss); neither is in the paper."""
    B, L = x.shape
    t = positions_for(cfg, L, x.device)  # (P,)
    P = t.numel()
    if P == L:  # every transition: the ends are -1 .. L-1, m_t at index t + 1 (no data-dependent torch.unique)
        mem = model.memories(x, torch.arange(-1, L, device=x.device))
        m_now, m_next = mem[:, :P], mem[:, 1:]
    else:
        ends, index = torch.unique(torch.cat([t, t + 1]), return_inverse=True)
        mem = model.memories(x, ends)  # one encoder call for both ends of every transition, each memory once
        m_now, m_next = mem[:, index[:P]], mem[:, index[P:]]
    d = torch.randperm(P, device=x.device)[: min(P, cfg.dec_positions)]
    # memory_noise: the RNN learns to step from near the teacher's memories, not only from them (robust to drift)
    noisy = m_now + cfg.memory_noise * torch.randn_like(m_now) if cfg.memory_noise else m_now
    pred = model.step(noisy.flatten(0, 1), x[:, t + 1].reshape(-1)).view_as(m_next)
    dyn = dynamics_error(pred, m_next, m_now, cfg.dyn_weighting)
    dec, first = decoder_loss(model, m_now[:, d], x, y, t[d], cfg.future_len, cfg.gamma)
    unif = uniformity(mem)
    loss = cfg.coef_dec * dec + cfg.coef_dyn * dyn + cfg.coef_unif * unif
    stats = dict(dec=dec.item(), dyn=dyn.item(), unif=unif.item(), teacher_bpb=first.item() / LN2)
    if cfg.past_targets:
        past = past_loss(model, m_now, y, t, cfg)
        loss = loss + cfg.coef_past * past
        stats["past"] = past.item()
    if cfg.coef_recall:
        recall = recall_loss(model, m_next, x[:, t + 1])
        loss = loss + cfg.coef_recall * recall
        stats["recall"] = recall.item()
    return loss, stats


def past_loss(model, m, y, pos, cfg):
    """CE of naming the bytes already read from the memory alone. Of the memories m (B, P, K, d) at positions pos
    ((P,), or (B, P) when each row has its own), past_positions drawn at random get past_targets distinct offsets s
    in [1, past_horizon] (drawn anew each batch): target y_{t-s} = x_{t-s+1}, predicted by Decoder.at_offsets at
    offset -s; targets before the sequence start are skipped. Each target costs a decoder query token.

    Without it a teacher may drop a fact as soon as it is read and look it up again by attention where it is needed;
    the memories in between then do not hold it, and no RNN step can carry it. Naming what they read makes memories
    carry it."""
    B, L = y.shape
    pos = pos.expand(B, -1)
    f = torch.randperm(pos.size(1), device=pos.device)[: cfg.past_positions]
    m, pos = m[:, f], pos[:, f]
    offsets = -1 - torch.randperm(cfg.past_horizon, device=pos.device)[: cfg.past_targets]  # (R,)
    idx = pos[..., None] + offsets  # (B, P, R)
    tgt = y.gather(1, idx.clamp(0, L - 1).flatten(1)).view_as(idx).masked_fill((idx < 0) | (idx >= L), -1)
    ce = cross_entropy(model.decoder.at_offsets(m.flatten(0, 1), offsets), tgt)  # (B * P * R,)
    return mean_bits(ce, tgt.reshape(-1)) * LN2


def recall_loss(model, m, tokens):
    """CE of naming the last input from its memory, m (..., K, d) against tokens (...): the mean memory token
    scored against the encoder's input embeddings. A memory may otherwise leave out what it just read whenever
    the future inputs the decoder is given imply it (a probe's marker, right before the needle), and then the
    next memory cannot be computed from it: the RNN's step would have no rule to learn."""
    d = m.size(-1)
    logits = m.float().mean(-2).reshape(-1, d) @ model.encoder.embed.weight.T / math.sqrt(d)  # (N, V)
    return F.cross_entropy(logits, tokens.reshape(-1))


def read(model, memory, x):
    """The memories (B, T, K, d) after each input of x (B, T), from `memory`: one call of the cell's run() where it
    has one (torch's fused RNNs; those give the part the readout reads), else a rollout, one step at a time."""
    if hasattr(model.cell, "run"):
        return model.cell.run(memory, model.rnn_embed(x))
    return torch.stack([m for _, m in rollout(model, memory, x)], dim=1)


def bptt_loss(model, x, y, cfg, window=0):
    """BPTT: unroll from m_empty over the whole sequence, readout CE at every step, backprop through the unroll.
    window = k > 0 makes it truncated BPTT: memory carried on, gradient cut every k steps (step by step)."""
    if window:
        memories = torch.stack([m for _, m in rollout(model, model.empty(x.size(0)), x, detach_every=window)], 1)
    else:
        memories = read(model, model.empty(x.size(0)), x)
    ce = readout_ce(model, memories, y)
    loss = mean_bits(ce, y) * LN2
    return loss, dict(ce=loss.item(), bpb=loss.item() / LN2)


def dmt_loss(model, x, y, cfg):
    """DMT (drift correction): each sequence starts from the teacher's memory at a random t0 of its own, the RNN runs
    on its own memories for dmt_steps (no gradient through the unroll), and every dmt_every steps f(m_hat_t, x_{t+1})
    is regressed onto the teacher's m_{t+1}. Optional readout CE on the RNN's step from its own memory, input
    detached (the paper's); with cfg.dmt_readout_grad it trains that step too (still one step of gradient): the
    memory must also serve the readout, not only resemble the teacher's. With cfg.past_targets, + coef_past L_past
    on that step: what the RNN reads it must keep along its own run, where it drifts. The encoder is frozen."""
    B, L = x.shape
    Td = min(cfg.dmt_steps, L - 1)
    k = min(cfg.dmt_every, Td - 1)
    t0 = torch.randint(-1, L - Td, (B, 1), device=x.device)
    rows = torch.arange(B, device=x.device)[:, None]
    with torch.no_grad():  # the teacher's memories over every row's span, then each row's m_{t0} .. m_{t0+Td}
        first = int(t0.min())
        span = model.memories(x, torch.arange(first, int(t0.max()) + Td + 1, device=x.device))
        teacher = span[rows, t0 - first + torch.arange(Td + 1, device=x.device)]  # (B, Td + 1, K, d)
        read = x.gather(1, t0 + torch.arange(1, Td, device=x.device))  # x_{t0+1} .. x_{t0+Td-1}
        own = [m for _, m in rollout(model, teacher[:, 0], read)]  # m_hat_{t0+1} .. m_hat_{t0+Td-1}
    j = torch.arange(k - 1, Td - 1, k, device=x.device)  # compare every k-th own memory (index j <-> t0+1+j)
    m_hat = torch.stack(own, dim=1)[:, j]
    t = t0 + 2 + j  # (B, J): the positions of the memories the RNN steps to
    pred = model.step(m_hat.flatten(0, 1), x.gather(1, t).reshape(-1)).view_as(m_hat)
    dyn = dynamics_error(pred, teacher[:, j + 2], teacher[:, j + 1], cfg.dyn_weighting)
    unif = uniformity(pred)
    targets = y.gather(1, t)
    ce = readout_ce(model, pred if cfg.dmt_readout_grad else pred.detach(), targets)
    readout = mean_bits(ce, targets) * LN2
    loss = cfg.dmt_coef_dyn * dyn + cfg.dmt_coef_unif * unif + cfg.dmt_coef_readout * readout
    stats = dict(dyn=dyn.item(), unif=unif.item(), readout_bpb=readout.item() / LN2)
    if cfg.past_targets:  # the RNN's own next memory names the bytes it read (one step of gradient, as dyn)
        past = past_loss(model, pred, y, t, cfg)
        loss = loss + cfg.coef_past * past
        stats["past"] = past.item()
    return loss, stats


@dataclass(frozen=True)
class Method:
    """A training method, as train.py needs it."""
    loss: Callable  # (model, x, y, cfg) -> (loss, {name: number to log})
    teacher: bool  # the model has a teacher encoder (and decoder): SMT trains it, DMT reads it
    refines: bool  # starts from a trained SMT run's model (--init_from=<its out_dir>)
    seq_len: Callable  # cfg -> the length of one training sequence (a probe's task sets its own)


METHODS = dict(
    smt=Method(smt_loss, teacher=True, refines=False, seq_len=lambda cfg: cfg.context_len + cfg.future_len),
    dmt=Method(dmt_loss, teacher=True, refines=True,
               seq_len=lambda cfg: max(cfg.dmt_steps + 1, cfg.context_len + cfg.future_len)),
    bptt=Method(bptt_loss, teacher=False, refines=False, seq_len=lambda cfg: cfg.seq_len),
    tbptt=Method(lambda model, x, y, cfg: bptt_loss(model, x, y, cfg, window=cfg.bptt_window), teacher=False,
                 refines=False, seq_len=lambda cfg: cfg.seq_len),
)


@torch.no_grad()
def evaluate(model, cfg, batches, autocast):
    """Held-out numbers: the RNN's own bits per byte (from empty; after teacher priming), or on a probe its
    accuracy at the target positions (from empty, whole task sequences) and the teacher's; for SMT on text, the
    teacher's losses. Always the same val windows (a fixed generator), so evaluations compare."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = "whole_answer" in batches.meta  # scored at its answers only: a synthetic or a long-range text probe
    sums = {}
    # evaluation leaves training's random stream as it was, and draws the same random transitions and decoder windows
    # for the teacher's losses every time (positions=N); its shapes are not training's, so the compiled parts run
    # eagerly here (big batched calls; the rollout replays CUDA graphs) rather than compiling again
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.compiler.set_stance("force_eager"):
        torch.manual_seed(cfg.seed)
        for _ in range(cfg.eval_iters):
            if probe:  # at least 32 sequences a batch: small batches on long tasks would make accuracy noise
                x, y = batches.get("val", batch_size=max(cfg.batch_size, 32), generator=gen)
            else:  # images: one whole image, from its first pixel (what drawing from m_empty does)
                L = math.prod(batches.meta["image_shape"]) if "image_shape" in batches.meta else 2 * cfg.context_len
                x, y = batches.get("val", seq_len=L, generator=gen)
            with autocast:
                if probe:
                    stats = evaluate_probe(model, x, y, whole=batches.meta["whole_answer"],
                                           whole_too=batches.meta["tokenizer"] != "probe")  # text: both
                else:  # the teacher primes at most half the window
                    stats = evaluate_rnn(model, x, y, min(cfg.context_len, x.size(1) // 2),
                                         primed=model.encoder is not None)
                if model.encoder is not None and not probe:  # probes: teacher_acc says it; the losses cost a lot
                    L = cfg.context_len + cfg.future_len
                    stats.update(smt_loss(model, x[:, :L], y[:, :L], cfg)[1])
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.eval_iters
    model.train()
    return {("val_" + k): v for k, v in sums.items()}


@torch.no_grad()
def evaluate_rnn(model, x, y, context_len, primed):
    """The RNN's own held-out loss, reading x step by step (teacher-forced), in bits per byte:
    rnn_bpb from m_empty over all of x; rnn_tail_bpb the same run over positions >= context_len; and, with primed,
    rnn_primed_bpb over those same positions after the teacher encoder primes the memory on x[:, :context_len]."""
    own = read(model, model.empty(x.size(0)), x)
    ce = readout_ce(model, own, y)
    out = dict(rnn_bpb=mean_bits(ce, y).item(),
               rnn_tail_bpb=mean_bits(ce[:, context_len:], y[:, context_len:]).item())
    if primed:
        m0 = model.memories(x, torch.tensor([context_len - 1], device=x.device))[:, 0]
        run = read(model, m0, x[:, context_len:])
        out["rnn_primed_bpb"] = mean_bits(readout_ce(model, run, y[:, context_len:]), y[:, context_len:]).item()
    return out


@torch.no_grad()
def evaluate_probe(model, x, y, whole, whole_too=False):
    """A probe's score for the RNN alone, reading each whole task sequence x from m_empty: rnn_acc, the share of
    target positions where its readout's top token is the target (whole: the share of sequences with every target
    right); rnn_target_bits, its loss per target; and, with a teacher, teacher_acc from the teacher's memories.
    whole_too adds rnn_whole_acc, the share of sequences with every target right, to a per-target rnn_acc."""
    B, L = x.shape
    logits = rnn_logits(model, x)
    ce = cross_entropy(logits, y).view(B, L)
    out = dict(rnn_acc=accuracy(logits, y, whole), rnn_target_bits=mean_bits(ce, y).item())
    if whole_too:
        out["rnn_whole_acc"] = accuracy(logits, y, True)
    if model.encoder is not None:
        mem = model.memories(x, torch.arange(L, device=x.device))
        out["teacher_acc"] = accuracy(model.readout(mem.flatten(0, 1)).view(B, L, -1), y, whole)
    return out


def rnn_logits(model, x):
    """The RNN's readout logits (B, L, vocab) at every step of reading x (B, L) from m_empty."""
    return model.readout(read(model, model.empty(x.size(0)), x).flatten(0, 1)).view(*x.shape, -1)


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


# ---------------------------------------------------------------------------------------------------------------
# The cost of a training step, for the MFU that train.py logs and bench.py reports.

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12,
             "L40": 181e12, "A10": 125e12, "L4": 121e12, "4090": 165e12, "3090": 71e12}  # dense, no sparsity


def peak_flops(given, device):
    """The device's peak FLOP/s for MFU: `given` if set, else the bf16 dense peak of a known GPU; 0 when unknown."""
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name.split() or f"{k}-" in name or f"{k} " in name), 0.0)


def step_flops(model, loss_fn, cfg, vocab_size, L, device, autocast):
    """FLOPs per token of a training step (forward and backward), counted by torch's FlopCounterMode on the eager
    model for one sequence of random tokens (the cost is per sequence and does not depend on the tokens), without
    activation checkpointing's recomputation and with dense attention masks (a window's masked-out blocks count).
    torch's random state is restored and the gradients discarded."""
    from torch.utils.flop_counter import FlopCounterMode
    model.set_act_ckpt("none")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x = torch.randint(0, vocab_size, (1, L), device=device)
        with FlopCounterMode(display=False) as counter:
            with autocast:
                loss, _ = loss_fn(model, x, x, cfg)
            loss.backward()
    model.set_act_ckpt(cfg.act_ckpt)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / L
