"""Benchmarks of SMT against BPTT: timing suites, and races that reproduce the paper's claims at CPU scale.

Timing (random tokens, vocab 256, stand in for data: a step costs the same whatever the tokens are; times are
wall-clock medians over --repeats steps after a warm-up step, every method timed in turn within each repetition, so
that a machine shared with other work slows all of them alike):

    python bench.py --suite=scaling      # step_s of SMT and BPTT at lengths 64..1024, tokens per batch fixed; then
                                         # per method ratio = step_s at the longest / at the shortest length, and
                                         # for SMT paper_max_ratio=1.5, meets_paper (ratio <= 1.5): the paper's
                                         # claim that SMT's step at the longest length costs at most 1.5x the
                                         # shortest's (BPTT's grows with the length)
    python bench.py --suite=throughput   # tokens_per_s, transitions_per_s of SMT positions=1 (window encoder) and
                                         # positions=all (causal), BPTT, TBPTT; then ratio = all / 1 transitions/s,
                                         # paper_min_ratio=10, meets_paper (ratio >= 10)
    python bench.py --suite=inference    # tokens_per_s, state_bytes, peak_rss_mib: the RNN generating 4,096 tokens
                                         # against the teacher re-encoding its whole context for every token
    python bench.py --suite=gradients    # grad_norm against distance d, BPTT vs SMT, and smt_reach, the farthest
                                         # input SMT's loss reaches (0 beyond it); gradients.png in --out
    python bench.py --suite=gpu          # CUDA: step_s, tokens_per_s, MFU, peak memory of SMT and BPTT at the
                                         # paper's shapes; one evaluation; generation graphed vs plain (< 7 min, H200)
    python bench.py --suite=scaling --quick --json    # small sizes (< 2 minutes on 2 cores), one JSON per line
    python bench.py --suite=scaling --device=cuda     # the timing suites on a GPU (synchronised timing)

Races: SMT then DMT (one lane) against BPTT of the same cell and against torch's own nn.GRU by BPTT (the RNN a user
would pick), real train.py runs given the same training seconds: on a CPU two lanes at a time, one thread each, the
third starting when one ends; on a GPU one after the other. Each lane prints its last held-out scores
(train.py's val_* numbers), seconds, tokens seen and iterations, and a PNG plots its curve against training seconds
and one against tokens seen. Their runs stay in --out.

    python bench.py --suite=probes --tasks=retrieval  # RNN accuracy at task lengths 64..1024 (SMT trains at 64)
    python bench.py --suite=text         # Shakespeare's bytes: the RNN's held-out bits per byte
    python bench.py --suite=images       # 14x14 black-and-white digits: bits per pixel, then digits drawn, completed
    python bench.py --suite=longrange    # the long-range text probe at gaps 16 and 32: recall, and per kind of fact
    python bench.py --suite=text --device=cuda   # the race on one GPU, paper shapes, the lanes in turn: < 9 min

Plots need matplotlib (pip install -e ".[plot]"); without it every suite still runs and prints its numbers.
Diagnostics of trained runs live in dev/ (python dev/recall.py --help).
"""
import dataclasses
import functools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import smt
from checkpoint import load_checkpoint, load_weights
from cli import UsageError, options_help, parse_overrides, run_cli
from config import CUDA_DEFAULTS, Config, known_settings
from data import PROBES, Probe, TextProbe

HERE = Path(__file__).resolve().parent
VOCAB = 256


@dataclass
class BenchConfig:
    suite: str = ""  # scaling | throughput | inference | gradients | gpu | probes | text | images | longrange
    quick: bool = False  # small sizes: every suite in under 2 minutes on a 2-core CPU
    json: bool = False  # one JSON object per measurement instead of table lines
    out: str = "bench_out"  # where PNGs (and the races' training runs) go
    lengths: str = ""  # comma-separated, overrides the suite's: scaling: sequence lengths; inference: token counts
    #                    reported; throughput: the one context length; gradients: the one unroll length T;
    #                    probes: task lengths; longrange: the gaps
    repeats: int = 0  # timed steps per measurement (the median is reported); 0: the suite's default
    tokens: int = 0  # scaling: tokens per batch, held fixed across lengths; 0: the suite's default
    batch_size: int = 0  # throughput: sequences per batch; 0: the suite's default
    threads: int = 0  # torch threads; 0: torch's default (1 is steadier on a machine shared with other jobs)
    seed: int = 1337  # random batches and initial weights; the races' runs get it as --seed
    device: str = "cpu"  # cpu | cuda | cuda:N: where the suites run (gpu: cuda unless --quick --device=cpu, its tiny
    #                      CPU rehearsal; the races: on cpu two lanes at a time, on cuda one after the other)
    act_ckpt: str = "none"  # gpu: activation checkpointing of the steps (train.py's --act_ckpt)
    compile: bool = True  # gpu: torch.compile each part for its shape, as train.py does (False: eager, to compare)
    # races (probes, text, images, longrange): training runs of train.py, two at a time, one thread each
    dataset: str = ""  # text: any text dataset of train.py (shakespeare); images: an image dataset (mnist5k)
    budget: float = 0.0  # training seconds per lane; 0: the race's (probes 360, text, images, longrange 600; GPU 80)
    dmt_share: float = 0.2  # of the SMT lane's budget, the share spent on DMT after SMT (0: SMT alone)
    tasks: str = "retrieval,copy,stack"  # probes: which
    train_len: int = 64  # probes: SMT and DMT train once on tasks this long; their RNN is scored at every length
    #                      (its teacher does not learn longer tasks in minutes; the RNN generalises); 0: each length
    num_symbols: int = 4  # probes: few symbols, so that tiny models leave the chance plateau within minutes
    eval_interval: int = 0  # iterations between evaluations (points on the curves); 0: the race's
    eval_seconds: float = 0.0  # also evaluate every this many training seconds (0: off; GPU: 40)
    args: str = ""  # extra train.py settings for every lane, space-separated; "": the race's
    smt_args: str = ""  # the same for the SMT run alone
    bptt_args: str = ""  # the same for BPTT of the same cell
    dmt_args: str = ""  # the same for DMT
    torch_args: str = ""  # the same for the torch lane (after TORCH_RNN's settings)
    lanes: str = "smt,bptt,torch"  # which lanes race: smt (then DMT), bptt (the same cell), torch (nn.GRU by BPTT)


# The races' settings, with which the README's numbers ran; --quick shrinks them for the tests.
# images: 14x14 black-and-white digits (196 tokens, vocab 2), each SMT window one whole digit from its first pixel;
# a GRU cell and a one-layer decoder readout in SMT's and same-cell BPTT's lanes: on one CPU thread a BPTT step on 196
# pixels costs about a quarter of the Transformer cell's, so each lane gets some 2,000 steps in 10 minutes.
# longrange: batches of 8 (many steps: recall is learnt late), training gaps mixed over [1, gap]; same-cell BPTT
# unrolls over gap + 32 bytes (the longest episode, gap + 23, and more; the torch lane keeps its 128), SMT has past
# targets reaching gap + 16 bytes back (they cost bits/byte on Shakespeare, so they are not train.py's default);
# scored at gap.
RACES = dict(
    probes=dict(budget=360, eval_interval=50),
    text=dict(dataset="shakespeare", budget=600, eval_interval=100),
    images=dict(dataset="mnist5k", budget=600, eval_interval=100,
                args="--image_size=14 --binarize=True --batch_size=16 --cell=gru --decoder_depth=1",
                smt_args="--context_len=180 --future_len=16", bptt_args="--seq_len=196", torch_args="--seq_len=196"),
    longrange=dict(budget=600, eval_interval=1000, args="--batch_size=8 --min_gap=1", smt_args="--past_targets=16"),
)
QUICK = dict(budget=8, eval_interval=1000)  # one evaluation, at the end
# The torch lane: torch.nn.GRU as a user trains it, one layer, hidden 256 (4 memory tokens of 64), embedding 64, a
# linear readout, BPTT over 128 bytes, the fused whole-sequence call, lr 3e-3. nn.LSTM (hidden 256, lr 1e-2, its best)
# was level with it on text at the race's budget and far behind on the long-range probe (docs/results.md), so the
# GRU is the lane (--torch_args="--cell=nn_lstm --mem_tokens=8 --lr=1e-2" races the LSTM). The images race unrolls it
# over a whole digit (its torch_args).
TORCH_RNN = "--cell=nn_gru --readout=linear --mem_tokens=4 --seq_len=128 --lr=3e-3"
# On one GPU, within one 9-minute call (not yet measured with three lanes): train.py's CUDA defaults (the paper's
# shapes, batch 128), 80 s of training a lane, in turn, evaluations every 40 s (128 held-out windows). SMT and BPTT
# compiled (on one H200: 0.25 s an SMT step, 2.55 s a BPTT step; the compile warm-ups are not training time), DMT
# and the torch lane eager (DMT's 16 s would not repay a compile; cuDNN's GRU is one fused call already). Learning
# rates and warmups reasoned, not tuned: SMT the paper's 3e-4, BPTT 1e-3 for its some 30 steps, warmups near a tenth
# of the steps; DMT the paper's 3e-5, cosine; the torch lane (hidden 1,024 at d_model 256) 2e-3. Images: one digit a
# window, as on CPU.
GPU = dict(budget=80, eval_interval=10 ** 9, eval_seconds=40, args="--eval_iters=1", smt_args="--warmup_iters=30",
           bptt_args="--lr=1e-3 --warmup_iters=3", dmt_args="--warmup_iters=3 --compile=False",
           torch_args="--lr=2e-3 --warmup_iters=10 --compile=False")
RACES["text-cuda"] = RACES["text"] | GPU
RACES["images-cuda"] = RACES["images"] | GPU | dict(args="--image_size=14 --binarize=True --eval_iters=1",
                                                    smt_args=GPU["smt_args"] + " --context_len=180 --future_len=16",
                                                    bptt_args=GPU["bptt_args"] + " --seq_len=196",
                                                    dmt_args=GPU["dmt_args"] + " --dmt_steps=195",
                                                    torch_args=GPU["torch_args"] + " --seq_len=196")


def emit(cfg, **record):
    """One measurement: a JSON object, or a table line of key=value."""
    if cfg.json:
        print(json.dumps(record), flush=True)
    else:
        shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        print("  ".join(shown), flush=True)


def build(cfg, with_encoder):
    return smt.build_model(dataclasses.asdict(cfg), VOCAB, with_encoder)


def sync(device):
    """Waits for the device's queued work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One method's model, optimizer and loss: a step is forward, backward, clip and AdamW, as in train.py (and on a
    GPU, autocast to cfg.dtype; with compile=True each part torch.compile'd as train.py does)."""

    def __init__(self, cfg, device=torch.device("cpu"), compile=False):
        self.cfg, self.loss_fn, self.device = cfg, smt.METHODS[cfg.method].loss, device
        self.model = build(cfg, with_encoder=smt.METHODS[cfg.method].teacher).to(device)
        self.model.set_act_ckpt(cfg.act_ckpt)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
        if compile:
            self.model.compile_parts(dynamic=False)  # one shape per trainer: no dynamic-shape recompiles

    def step(self, x, y):
        sync(self.device)
        start = time.perf_counter()
        with self.autocast:
            loss, _ = self.loss_fn(self.model, x, y, self.cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - start


def timed_side_by_side(runs, repeats):
    """runs: {name: () -> seconds}. One warm-up call each, then `repeats` rounds calling each in turn; medians."""
    times = {name: [] for name in runs}
    for r in range(1 + repeats):
        for name, run in runs.items():
            seconds = run()
            if r > 0:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def random_batch(batch_size, length, generator, device=torch.device("cpu")):
    x = torch.randint(0, VOCAB, (batch_size, length), generator=generator)
    return x.to(device), torch.randint(0, VOCAB, (batch_size, length), generator=generator).to(device)


# ---------------------------------------------------------------------------------------------------------------
# Timing

def scaling(cfg):
    """Step time against sequence length L at a fixed number of tokens per batch (batch = tokens / L), so the work per
    token is what the method makes of it. SMT: positions=all, causal encoder with its default 64-token context,
    decoder loss on L/4 positions per sequence (the same number of decoder windows per batch at every L). BPTT: the
    whole L-step unroll. Same Transformer cell and model size (train.py's CPU defaults) for both. Then each method's
    ratio of its step_s at the longest length to that at the shortest; the paper's claim for SMT: at most 1.5."""
    lengths = parse_lengths(cfg, [64, 128, 256, 512, 1024])
    tokens = cfg.tokens or (1024 if cfg.quick else 4096)
    repeats = cfg.repeats or (1 if cfg.quick else 3)
    gen = torch.Generator().manual_seed(cfg.seed)
    base, device = Config(positions="all", future_len=16), torch.device(cfg.device)  # as measured: every transition
    trainers = dict(smt=Trainer(dataclasses.replace(base, method="smt"), device),
                    bptt=Trainer(dataclasses.replace(base, method="bptt"), device))
    batches = {L: random_batch(max(1, tokens // L), L, gen, device) for L in lengths}

    def run(name, L):
        trainers[name].cfg.dec_positions = max(1, L // 4)  # read by SMT only
        return trainers[name].step(*batches[L])
    runs = {(name, L): functools.partial(run, name, L) for L in lengths for name in trainers}
    median = timed_side_by_side(runs, repeats)
    for (name, L), seconds in median.items():
        B = batches[L][0].size(0)
        emit(cfg, suite="scaling", method=name, seq_len=L, batch_size=B, tokens_per_batch=B * L, step_s=seconds,
             repeats=repeats)
    for name in trainers:
        ratio = median[name, lengths[-1]] / median[name, lengths[0]]
        emit(cfg, suite="scaling", method=name, ratio=ratio, long_len=lengths[-1], short_len=lengths[0],
             **(dict(paper_max_ratio=1.5, meets_paper=ratio <= 1.5) if name == "smt" else {}))


def throughput(cfg):
    """Training tokens/s and transitions/s at context_len 256 (the paper's context), 16 memory tokens of width 64
    (depths 2, 4 heads), future_len 16: sequences of 272 tokens for every method (BPTT unrolls all of them, TBPTT cuts
    every 16). A transition (m_t, x_{t+1}) -> m_{t+1} counts when the step trains it: SMT one per selected position,
    BPTT and TBPTT every step of the unroll. The paper's claim: positions=all trains at least 10x the transitions/s."""
    context_len = one_length(cfg, 256)
    batch_size = cfg.batch_size or (2 if cfg.quick else 8)
    repeats = cfg.repeats or (1 if cfg.quick else 3)
    L = context_len + 16
    base = Config(d_model=64, n_heads=4, mem_tokens=16, context_len=context_len, future_len=16, seq_len=L,
                  bptt_window=16)
    methods = {"smt_pos1_window": dict(method="smt", encoder="window", positions="1"),
               "smt_all_causal": dict(method="smt", encoder="causal", positions="all"),
               "bptt": dict(method="bptt"), "tbptt": dict(method="tbptt")}
    device = torch.device(cfg.device)
    trainers = {name: Trainer(dataclasses.replace(base, **over), device) for name, over in methods.items()}
    x, y = random_batch(batch_size, L, torch.Generator().manual_seed(cfg.seed), device)
    median = timed_side_by_side({name: (lambda t=t: t.step(x, y)) for name, t in trainers.items()}, repeats)
    per_second = {}
    for name, seconds in median.items():
        c = trainers[name].cfg
        transitions = batch_size * (L if c.positions == "all" else int(c.positions))
        per_second[name] = transitions / seconds
        emit(cfg, suite="throughput", method=name, batch_size=batch_size, seq_len=L, step_s=seconds,
             tokens_per_s=batch_size * L / seconds, transitions_per_s=per_second[name], repeats=repeats)
    ratio = per_second["smt_all_causal"] / per_second["smt_pos1_window"]
    emit(cfg, suite="throughput", method="smt_all_causal/smt_pos1_window", metric="transitions_per_s", ratio=ratio,
         paper_min_ratio=10, meets_paper=ratio >= 10)


@torch.no_grad()
def inference(cfg):
    """Generation, batch 1, greedy. rnn: the RNN alone from m_empty generates marks[-1] tokens, one step and one
    readout per token; tokens/s over the tokens since the previous mark. teacher: the causal encoder, with a context
    as long as the longest mark, re-encodes the whole context for every new token (memory at the last position, then
    the decoder's next-token head); tokens/s over a few such steps ending at each mark's context length.
    state_bytes: what the method holds for its context: the RNN's memory tensor (constant); for the teacher, the keys
    and values of every attention layer over the context (a KV cache's size: re-encoding holds them all in a step).
    peak_rss_mib: the process's high-water resident memory (includes Python, torch and the weights), rnn first."""
    marks = parse_lengths(cfg, [512, 1024, 2048, 4096])
    steps = cfg.repeats or (2 if cfg.quick else 4)
    torch.manual_seed(cfg.seed)
    base = Config()
    device = torch.device(cfg.device)
    model = build(dataclasses.replace(base, context_len=marks[-1]), with_encoder=True).to(device).eval()

    def greedy(logits):
        return logits.argmax(dim=-1)

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    start, previous = time.perf_counter(), 0
    run = smt.rollout(model, model.empty(1), torch.zeros(1, 0, dtype=torch.long, device=device), sample=greedy,
                      num_new=marks[-1])
    for n, (_, memory) in enumerate(run, start=1):
        if n in marks:
            sync(device)
            now = time.perf_counter()
            emit(cfg, suite="inference", method="rnn", tokens=n, tokens_per_s=(n - previous) / (now - start),
                 state_bytes=memory.nelement() * memory.element_size(), peak_rss_mib=peak())
            start, previous = now, n
    attending = len(model.encoder.body.blocks) + 1  # the body's layers and the registers' read over the context
    context = torch.randint(0, VOCAB, (1, marks[-1]), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    for n in marks:
        first = max(1, n - steps)  # the timed steps end with a context of n tokens
        tokens, start = context[:, :first], time.perf_counter()
        for _ in range(n - first):
            m = model.memories(tokens, torch.tensor([tokens.size(1) - 1], device=device))[:, 0]
            tokens = torch.cat([tokens, greedy(model.readout(m))[:, None]], dim=1)
        sync(device)
        seconds = time.perf_counter() - start
        emit(cfg, suite="inference", method="teacher", tokens=n, tokens_per_s=(n - first) / seconds,
             state_bytes=attending * 2 * n * base.d_model * 4, peak_rss_mib=peak())


def gradient_norms(model, x, y):
    """{"bptt", "smt": [norm at d = 1 .. T]}: the gradient of the next-token loss at the last position w.r.t. the
    input d steps back (its embeddings: d = 1 is x_{T-1}, the last one read), each sequence's norm, mean over the
    rows of x (B, T). bptt: the RNN's readout after its whole T-step unroll from m_empty. smt: the RNN's readout after
    one step from the teacher's memory m_{T-2}, what SMT's losses train: no path crosses more than one RNN step and
    the encoder, so inputs beyond smt_reach get exactly 0."""
    B, T = x.shape

    def last_loss(m):
        return F.cross_entropy(model.readout(m), y[:, -1], reduction="sum")  # sum: each sequence its own gradient

    e = model.rnn_embed(x).detach().requires_grad_()
    m = model.empty(B)
    for t in range(T):
        m = model.cell(m, e[:, t])
    norms = dict(bptt=torch.autograd.grad(last_loss(m), e)[0].norm(dim=-1))
    read = model.encoder.embed(x).detach().requires_grad_()
    hook = model.encoder.embed.register_forward_hook(lambda module, inputs, output: read)  # feed our leaf in
    try:
        m = model.memories(x, torch.tensor([T - 2]))[:, 0]
    finally:
        hook.remove()
    by_encoder, by_step = torch.autograd.grad(last_loss(model.cell(m, e[:, -1])), (read, e))
    norms["smt"] = (by_encoder.square().sum(-1) + by_step.square().sum(-1)).sqrt()
    return {name: g.mean(0).flip(0).tolist() for name, g in norms.items()}  # index d - 1


def smt_reach(cfg):
    """The farthest input (d) SMT's loss at the last position reaches: one RNN step (d = 1), then the teacher's memory
    one position earlier, which the causal encoder computes from context_len - 1 positions back in each of its
    encoder_depth layers and once more in its registers' read (the window encoder: one window)."""
    layers = cfg.encoder_depth + 1 if cfg.encoder == "causal" else 1
    return 2 + layers * (cfg.context_len - 1)


def gradients(cfg):
    """gradient_norms of an untrained model (train.py's CPU defaults), 8 random sequences of length T (256), each
    distance d a line per method (powers of 2 in the table, all with --json); smt_reach; a PNG of both curves."""
    T = one_length(cfg, 256 if not cfg.quick else 128)
    base = Config()
    torch.manual_seed(cfg.seed)
    x, y = random_batch(8, T, torch.Generator().manual_seed(cfg.seed))
    norms = gradient_norms(build(base, with_encoder=True), x, y)
    shown = range(1, T + 1) if cfg.json else sorted({2 ** i for i in range(int(math.log2(T)) + 1)} | {T})
    for d in shown:
        for name, values in norms.items():
            emit(cfg, suite="gradients", method=name, distance=d, grad_norm=values[d - 1])
    emit(cfg, suite="gradients", smt_reach=smt_reach(base), context_len=base.context_len,
         encoder_depth=base.encoder_depth)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gradients.png"
    series = {name: (COLORS[name], [(d, v) for d, v in enumerate(values, start=1) if v > 0])  # log scale: no 0
              for name, values in norms.items()}
    if plot(path, series, "distance d", "gradient norm", log_y=True):
        emit(cfg, suite="gradients", png=str(path), bptt_color="red", smt_color="blue")


# ---------------------------------------------------------------------------------------------------------------
# The GPU suite: train.py's CUDA defaults (d_model 256, 16 memory tokens, depths 8/4/8, context 256, future 64, bf16).

GPU_SHAPES = ((256, 128), (1024, 32))  # (sequence length, batch): the same number of tokens per batch
QUICK_GPU = dict(d_model=16, n_heads=2, mem_tokens=2, encoder_depth=1, decoder_depth=1, rnn_depth=1, context_len=8,
                 future_len=4)  # --quick: the same code at tiny shapes (on CPU too)


def gpu_suite(cfg):
    """First the sequential parts, which need no compiling: one evaluate_rnn as train.py runs it (batch 128 reading
    512 tokens, then 256 from the teacher's priming), first and second call; greedy generation from m_empty at batch
    1 and 128, CUDA graphs against plain eager steps. Then for SMT and BPTT at each (L, batch) of GPU_SHAPES, each
    part compiled once for its shape (dynamic=False) as in train.py (--compile=False: eager): step_s (median of
    --repeats after a first step, whose time, compiling included, is first_step_s), tokens_per_s, tflops_per_s and
    mfu (FLOPs by FlopCounterMode on the eager model against the device's bf16 peak; None if unknown), peak_mem_gib
    (torch.cuda.max_memory_allocated during the steps). A measurement that fails prints its error and the suite goes
    on (GPU time is scarce); it then ends with an error line."""
    device = torch.device(cfg.device)
    bf16 = device.type == "cuda"  # the CPU rehearsal runs float32
    base = dataclasses.replace(Config(), **{**CUDA_DEFAULTS, **(QUICK_GPU if cfg.quick else {})},
                               dtype="bfloat16" if bf16 else "float32", act_ckpt=cfg.act_ckpt)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build(base, with_encoder=True).to(device)
    failed = [name for name, measure in (
        ("evaluate_rnn", lambda: gpu_evaluation(cfg, model, base, gen, device)),
        ("generate", lambda: gpu_generation(cfg, model, (1, 2) if cfg.quick else (1, 128),
                                            16 if cfg.quick else 512, device, bf16)))
        if not measured(cfg, name, measure)]
    del model
    for L, batch in ((16, 2), (32, 1)) if cfg.quick else GPU_SHAPES:
        for method in ("smt", "bptt"):
            run = dataclasses.replace(base, method=method, batch_size=batch, seq_len=L)
            if not measured(cfg, f"{method} at L={L}", lambda: gpu_step(cfg, run, gen, device)):
                failed.append(f"{method} at L={L}")
    if failed:
        raise UsageError(f"--suite=gpu: {len(failed)} measurement(s) failed ({', '.join(failed)}): see the lines above")


def measured(cfg, name, measure):
    """Runs one measurement of the gpu suite; on an error prints it as a record and returns False."""
    try:
        measure()
        return True
    except Exception as error:  # a compiler or CUDA error in one measurement must not cost the others
        emit(cfg, suite="gpu", failed=name, error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
        return False
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def gpu_step(cfg, run, gen, device):
    """One method's training step at one shape: time, tokens/s, FLOP/s and MFU, peak memory."""
    L, batch = run.seq_len, run.batch_size
    trainer = Trainer(run, device)
    flops = smt.step_flops(trainer.model, trainer.loss_fn, run, VOCAB, L, device, trainer.autocast) * batch * L
    peak = smt.peak_flops(run.peak_flops, device)
    trainer = Trainer(run, device, compile=device.type == "cuda" and cfg.compile)
    x, y = random_batch(batch, L, gen, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = trainer.step(x, y)
    repeats = cfg.repeats or (1 if cfg.quick else 3)
    step_s = statistics.median(trainer.step(x, y) for _ in range(repeats))
    emit(cfg, suite="gpu", method=run.method, seq_len=L, batch_size=batch, step_s=step_s,
         tokens_per_s=batch * L / step_s, tflops_per_s=flops / step_s / 1e12,
         mfu=flops / step_s / peak if peak else None,
         peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
         first_step_s=first, repeats=repeats, act_ckpt=run.act_ckpt, compiled=device.type == "cuda" and cfg.compile)


def gpu_evaluation(cfg, model, base, gen, device):
    """evaluate_rnn on one held-out batch as train.py's evaluate calls it (autocast, compiled parts run eagerly)."""
    x, y = random_batch(8 if cfg.quick else base.batch_size, 2 * base.context_len, gen, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=base.dtype == "bfloat16")
    times = []
    with autocast, torch.compiler.set_stance("force_eager"):
        for _ in range(2):  # the first call captures the CUDA graphs
            sync(device)
            start = time.perf_counter()
            smt.evaluate_rnn(model, x, y, base.context_len, primed=True)
            sync(device)
            times.append(time.perf_counter() - start)
    steps = x.size(1) + x.size(1) - base.context_len
    emit(cfg, suite="gpu", measure="evaluate_rnn", batch_size=x.size(0), rnn_steps=steps, first_s=times[0],
         second_s=times[1], rnn_steps_per_s=steps / times[1])


@torch.no_grad()
def gpu_generation(cfg, model, batch_sizes, num_new, device, bf16):
    """Greedy generation from m_empty, tokens/s (all rows together) over num_new tokens after a short warm-up run
    (which captures the graphs), with CUDA graphs (graphed=True) and with plain eager steps."""
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in batch_sizes:
            for graphed in (False, True) if device.type == "cuda" else (False,):
                smt.CUDA_GRAPHS = graphed
                try:
                    times = []
                    for n in (4, num_new):
                        sync(device)
                        start = time.perf_counter()
                        for _ in smt.rollout(model, model.empty(batch), torch.zeros(batch, 0, dtype=torch.long,
                                             device=device), sample=lambda logits: logits.argmax(-1), num_new=n):
                            pass
                        sync(device)
                        times.append(time.perf_counter() - start)
                finally:
                    smt.CUDA_GRAPHS = True
                emit(cfg, suite="gpu", measure="generate", batch_size=batch, graphed=graphed,
                     tokens=num_new, tokens_per_s=batch * num_new / times[1])


# ---------------------------------------------------------------------------------------------------------------
# Races: real training runs of train.py, SMT then DMT in one lane against BPTT in the other, every lane the same
# training seconds (train.py's time_budget: evaluation is not counted), the SMT lane's split by --dmt_share. race()
# runs them and reports; the suites below it only choose the data and the settings.

RED, BLUE, GREEN = (220, 40, 40), (40, 70, 220), (30, 150, 60)
COLORS = {"smt": BLUE, "bptt": RED, "torch": GREEN}


@dataclass
class Lane:
    """One lane of a race: a BPTT run (of the same cell, or of torch's own RNN), or an SMT run and then DMT on its RNN
    (unless --dmt_share=0)."""
    method: str  # smt | bptt | torch
    name: str  # its runs' folders in --out: <name>-smt and <name>-dmt, <name>-bptt or <name>-torch
    args: list  # train.py settings, before the lane's own (--smt_args, ...)
    fields: dict  # what its lines say of it besides its scores (the task, its length)
    tag: str = ""  # its name in the plots, after the method's


def progress(line):
    sys.stderr.write(line + "\n")  # one write: the two lanes' threads print whole lines
    sys.stderr.flush()


def one_thread_env(cfg):
    """The environment of the runs a race starts: one thread each (or --threads)."""
    return dict(os.environ, OMP_NUM_THREADS=str(cfg.threads or 1))


def val_scores(stats):
    """An evaluation's val_* numbers, without the prefix."""
    return {k.removeprefix("val_"): v for k, v in stats.items() if k.startswith("val_")}


def train(cfg, name, args):
    """Runs `python train.py args` into cfg.out/name (emptied first: it is this suite's own output), its log in
    train.log there; returns (its log.jsonl records, the folder)."""
    out = Path(cfg.out) / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    progress(f"{name}: python train.py {' '.join(args)} (log: {out / 'train.log'})")
    with open(out / "train.log", "w") as log:
        done = subprocess.run([sys.executable, str(HERE / "train.py"), f"--device={cfg.device}", *args,
                               f"--out_dir={out}", f"--seed={cfg.seed}"], stdout=log, stderr=subprocess.STDOUT,
                              env=one_thread_env(cfg))
    if done.returncode != 0:
        raise UsageError(f"the {name} run failed (exit {done.returncode}): see {out / 'train.log'}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    progress(f"{name}: done, {records[-1]['iter']} iterations")
    return records, out


def run_lane(cfg, lane):
    """A lane's runs, cfg.budget training seconds in all. Returns ([log records], the folder of its last run); DMT's
    records count elapsed, iter and tokens from SMT's start (its first, the SMT run's RNN again, is left out)."""
    common = [*lane.args, f"--eval_interval={cfg.eval_interval}", f"--eval_seconds={cfg.eval_seconds}",
              *cfg.args.split()]
    if lane.method != "smt":
        extra = cfg.bptt_args.split() if lane.method == "bptt" else torch_lane_args(cfg)
        return train(cfg, f"{lane.name}-{lane.method}", [f"--time_budget={cfg.budget}", "--method=bptt", *common,
                                                         *extra])
    smt_budget = round(cfg.budget * (1 - cfg.dmt_share))
    records, out = train(cfg, f"{lane.name}-smt", [f"--time_budget={smt_budget}", "--method=smt", *common,
                                                   *cfg.smt_args.split()])
    if cfg.dmt_share == 0:
        return records, out
    dmt, out = train(cfg, f"{lane.name}-dmt", [f"--time_budget={cfg.budget - smt_budget}", "--method=dmt",
                                               f"--init_from={out}", *common, *cfg.dmt_args.split()])
    last = records[-1]
    return records + [dict(r, elapsed=r["elapsed"] + last["elapsed"], iter=r["iter"] + last["iter"],
                           tokens=r["tokens"] + last["tokens"]) for r in dmt[1:]], out


def chosen(cfg):
    """--lanes as a list, in the order given."""
    return cfg.lanes.split(",")


def torch_lane_args(cfg):
    """The torch lane's train.py settings: TORCH_RNN, then --torch_args (the later of two wins)."""
    return [*TORCH_RNN.split(), *cfg.torch_args.split()]


def lane_label(cfg, lane):
    """smt+dmt (smt with --dmt_share=0), bptt, or the torch lane's cell: nn.gru, nn.lstm."""
    if lane.method == "torch":
        cells = [arg.removeprefix("--cell=") for arg in torch_lane_args(cfg) if arg.startswith("--cell=")]
        return cells[-1].replace("_", ".")
    return "smt+dmt" if lane.method == "smt" and cfg.dmt_share else lane.method


def race(cfg, name, lanes, metric, more=None):
    """Trains the lanes: on CPU two at a time, one thread each, the same seconds on the same (shared) machine; on a
    GPU one after the other, each with the whole GPU for its budget (side by side they would contend for its SMs and
    memory bandwidth in ways neither controls). Prints a line per lane: its last evaluation's scores, seconds,
    tokens seen, iterations, the curve of `metric` (its points with --json, else their number), and more(folder of
    its last run) if given. Plots `metric` against training seconds (<name>.png) and tokens seen (<name>-tokens.png).
    Returns [(lane, [log records], folder of its last run)]."""
    if cfg.device == "cpu":  # a third lane starts when one of the first two ends: always two at a time
        with ThreadPoolExecutor(2) as pool:
            logs = [(lane, *run) for lane, run in zip(lanes, pool.map(functools.partial(run_lane, cfg), lanes))]
    else:
        progress(f"{name} on {cfg.device}: the lanes in turn, each with the whole GPU for {cfg.budget:g} s")
        logs = [(lane, *run_lane(cfg, lane)) for lane in lanes]
    by_time, by_tokens = {}, {}
    for lane, records, out in logs:
        points = [(r["elapsed"], r["tokens"], r[metric]) for r in records if metric in r]
        emit(cfg, suite=cfg.suite, **lane.fields, method=lane_label(cfg, lane), **val_scores(records[-1]),
             seconds=records[-1]["elapsed"], tokens=records[-1]["tokens"], iters=records[-1]["iter"],
             **(more(out) if more else {}), curve=[(s, v) for s, _, v in points] if cfg.json else len(points))
        label = f"{lane_label(cfg, lane)} {lane.tag}".strip()
        same = [other for other, _, _ in logs if other.method == lane.method]  # later ones paler
        color = tuple(round(c + (255 - c) * 0.75 * same.index(lane) / len(same)) for c in COLORS[lane.method])
        by_time[label] = (color, [(s, v) for s, _, v in points])
        by_tokens[label] = (color, [(n, v) for _, n, v in points])
    y_range = (0, 1) if metric.endswith("acc") else None
    for path, series, x_label in ((f"{name}.png", by_time, "training seconds"),
                                  (f"{name}-tokens.png", by_tokens, "training tokens seen")):
        if plot(Path(cfg.out) / path, series, x_label, f"{name}: {metric}", y_range=y_range, x_from=0):
            emit(cfg, suite=cfg.suite, png=str(Path(cfg.out) / path))
    return logs


def probes(cfg):
    """Accuracy of the RNN alone (from its empty memory, whole task sequences) on each probe and task length: SMT
    then DMT against the BPTT lanes. SMT's teacher does not learn long tasks within minutes on a CPU, but the RNN it
    teaches generalises: SMT and DMT train once on tasks of --train_len and their final RNN is then scored at every
    length (--train_len=0: they train at each length). The BPTT lanes train at each length, and their run at
    --train_len is scored at every length too (trained_len says which run a line scores). Batches hold 2,048 tokens
    (2048 / task_len sequences)."""
    lengths = parse_lengths(cfg, [16] if cfg.quick else [64, 256, 1024])
    for task in cfg.tasks.split(","):
        if task not in PROBES:
            raise UsageError(f"--tasks takes probes among {', '.join(PROBES)}, not '{task}'")
    for task in cfg.tasks.split(","):
        def lane(method, L):
            args = [f"--dataset={task}", f"--task_len={L}", f"--batch_size={max(1, 2048 // L)}",
                    f"--num_symbols={cfg.num_symbols}"]
            return Lane(method, f"{task}-{L}", args, dict(task=task, task_len=L, trained_len=L), tag=str(L))
        lanes = [lane("smt", n) for n in ([cfg.train_len] if cfg.train_len else lengths) if "smt" in chosen(cfg)]
        lanes += [lane(m, L) for m in chosen(cfg) if m != "smt" for L in lengths]
        for lane, records, out in race(cfg, f"probe-{task}", lanes, "val_rnn_acc"):
            for L in lengths if lane.fields["trained_len"] == cfg.train_len else []:
                if L != cfg.train_len:  # scored as train.py evaluates, at another length
                    emit(cfg, suite="probes", **(lane.fields | dict(task_len=L)), method=lane_label(cfg, lane),
                         **score_at_length(out, L), seconds=records[-1]["elapsed"], iters=records[-1]["iter"])


def score_at_length(run_dir, L):
    """A probe run's final RNN (and teacher, if any) scored as train.py evaluates it, on held-out tasks of another
    length L: rnn_acc, rnn_target_bits (and teacher_acc)."""
    run, model = load_run(run_dir)
    run = dataclasses.replace(run, task_len=L)
    stats = smt.evaluate(model, run, Probe(run, run.batch_size, run.seed), torch.autocast("cpu", enabled=False))
    return val_scores(stats)


def load_run(run_dir, what="the run failed"):
    """A finished run's settings (a Config) and its model, teacher included unless it trained BPTT; `what` says
    what to do when run_dir holds no checkpoint."""
    ckpt = load_checkpoint(run_dir / "ckpt.pt", what)
    run = Config(**known_settings(ckpt["config"]))
    model = smt.build_model(ckpt["config"], ckpt["meta"]["vocab_size"], with_encoder=smt.METHODS[run.method].teacher)
    load_weights(model, ckpt["model"], run_dir / "ckpt.pt")
    return run, model


def text(cfg):
    """The RNN's held-out bits per token (from its empty memory, windows of 2 context_len) on a text dataset
    (Shakespeare's bytes), train.py's defaults for the device: SMT then DMT against BPTT."""
    race(cfg, "text", [Lane(m, "text", [f"--dataset={cfg.dataset}"], {}) for m in chosen(cfg)], "val_rnn_bpb")


def images(cfg):
    """Pixels in raster order (the mnist5k digits: a pip download; by default 14x14 and black or white): SMT then DMT
    against BPTT, bits per pixel as for text, then each RNN alone draws digits from its empty memory and completes
    held-out digits from their top half (sample.py): PNGs."""
    lanes = [Lane(m, "images", [f"--dataset={cfg.dataset}"], {}) for m in chosen(cfg)]
    for lane, _, run_dir in race(cfg, "images", lanes, "val_rnn_bpb"):
        for rows, kind in ((-1, "completions"), (0, "samples")):  # -1: from the top half
            done = subprocess.run([sys.executable, str(HERE / "sample.py"), f"--out_dir={run_dir}", "--num_samples=8",
                                   f"--prompt_rows={rows}", f"--seed={cfg.seed}", f"--device={cfg.device}"],
                                  capture_output=True, text=True, env=one_thread_env(cfg))
            if done.returncode != 0:
                raise UsageError(f"sampling {run_dir} failed: {done.stderr.strip().splitlines()[-1]}")
            path = Path(cfg.out) / f"images-{lane.method}-{kind}.png"
            (run_dir / "samples.png").replace(path)
            emit(cfg, suite="images", method=lane_label(cfg, lane), png=str(path))


def longrange(cfg):
    """The long-range text probe at each gap: SMT then DMT against BPTT; the RNN alone from its empty memory, scored
    at the answers (train.py's rnn_acc per answer byte, rnn_whole_acc per answer), and per kind of fact."""
    for gap in parse_lengths(cfg, [16, 32]):
        args = ["--dataset=longrange", f"--gap={gap}", "--eval_iters=8", f"--seq_len={gap + 32}",
                f"--past_horizon={gap + 16}"]
        race(cfg, f"longrange-{gap}", [Lane(m, f"longrange-{gap}", args, dict(gap=gap)) for m in chosen(cfg)],
             "val_rnn_acc", more=answers_by_kind)


def answers_by_kind(run_dir, episodes=512):
    """A long-range run's final RNN, from its empty memory, scored per answer byte on held-out episodes of each
    kind: accuracy_by_kind."""
    run, model = load_run(run_dir)
    probe = TextProbe(dataclasses.replace(run, min_gap=0), episodes)
    x, y = probe.get("val", generator=torch.Generator().manual_seed(run.seed))
    with torch.no_grad():
        return accuracy_by_kind(smt.rnn_logits(model, x), x, y)


def accuracy_by_kind(logits, x, y):
    """Per answer byte, on the episodes of each kind (told by their first byte): {key_acc, name_acc, bracket_acc}."""
    kinds = dict(key=x[:, 0] == ord("k"), name=x[:, 0] == ord("I"))
    kinds["bracket"] = ~(kinds["key"] | kinds["name"])
    return {f"{kind}_acc": smt.accuracy(logits[rows], y[rows], whole=False) for kind, rows in kinds.items()}


@functools.cache
def pyplot():
    """matplotlib.pyplot drawing to files, or None (said once) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        progress('no plots: they need matplotlib (pip install -e ".[plot]")')
        return None
    return plt


def plot(path, series, x_label, y_label, log_y=False, y_range=None, x_from=None):
    """A 720 x 420 line plot as a PNG; returns whether it was written. series: {label: (RGB 0-255, [(x, y), ...])};
    y_range fixes the y axis (lo, hi); x_from fixes where the x axis starts."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.2, 4.2), dpi=100)
    for label, (color, points) in series.items():
        ax.plot(*zip(*points), "o-", color=[c / 255 for c in color], label=label, markersize=3)
    ax.set(xlabel=x_label, ylabel=y_label, yscale="log" if log_y else "linear")
    if y_range:
        ax.set_ylim(*y_range)
    if x_from is not None:
        ax.set_xlim(left=x_from)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------

def parse_lengths(cfg, default):
    """--lengths as increasing whole numbers (at least 2), or the suite's default."""
    if not cfg.lengths:
        return default
    try:
        lengths = [int(s) for s in cfg.lengths.split(",")]
    except ValueError:
        raise UsageError(f"--lengths takes comma-separated whole numbers, not '{cfg.lengths}'") from None
    if min(lengths) < 2 or lengths != sorted(set(lengths)):
        raise UsageError(f"--lengths must be increasing and at least 2, not '{cfg.lengths}'")
    return lengths


def one_length(cfg, default):
    lengths = parse_lengths(cfg, [default])
    if len(lengths) != 1:
        raise UsageError(f"--suite={cfg.suite} takes one length, not '{cfg.lengths}'")
    return lengths[0]


SUITES = dict(scaling=scaling, throughput=throughput, inference=inference, gradients=gradients, gpu=gpu_suite,
              probes=probes, text=text, images=images, longrange=longrange)


def settings(argv):
    """The command line checked, on top of its race's settings (the command line wins)."""
    cfg, given = parse_overrides(BenchConfig(), argv)
    if cfg.suite not in SUITES:
        raise UsageError(f"--suite must be one of {', '.join(SUITES)}, not '{cfg.suite}'")
    for key in ("repeats", "tokens", "batch_size", "threads"):
        if getattr(cfg, key) < 0:
            raise UsageError(f"--{key} must not be negative, not {getattr(cfg, key)}")
    if cfg.train_len < 0 or 0 < cfg.train_len < 8:
        raise UsageError(f"--train_len must be 0 (train at each length) or a task length of at least 8, "
                         f"not {cfg.train_len}")
    if cfg.device != "cpu" and not cfg.device.startswith("cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, not '{cfg.device}'")
    if cfg.device != "cpu" and cfg.suite == "probes":
        raise UsageError("--suite=probes runs on cpu: its many small runs go two at a time, one thread each")
    if cfg.act_ckpt not in ("none", "cell", "all"):
        raise UsageError(f"--act_ckpt must be one of none, cell, all, not '{cfg.act_ckpt}'")
    if cfg.suite == "gpu" and "device" not in given:
        cfg.device = "cuda"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--suite={cfg.suite} --device={cfg.device}: CUDA is not available here" +
                         (" (a CPU rehearsal of the gpu suite: --suite=gpu --quick --device=cpu)" if cfg.suite == "gpu"
                          else "; run on --device=cpu"))
    if cfg.suite == "gpu" and cfg.device == "cpu" and not cfg.quick:
        raise UsageError("--suite=gpu measures a GPU: on CPU only its tiny rehearsal runs (--quick --device=cpu)")
    race_settings = RACES.get(f"{cfg.suite}-cuda" if cfg.device != "cpu" else cfg.suite, RACES.get(cfg.suite))
    if race_settings is not None:
        cfg = dataclasses.replace(cfg, **{k: v for k, v in (race_settings | (QUICK if cfg.quick else {})).items()
                                          if k not in given})
        if cfg.budget <= 0 or not 0 <= cfg.dmt_share < 1 or cfg.eval_interval <= 0:
            raise UsageError("--budget and --eval_interval must be positive, --dmt_share in [0, 1)")
        if not chosen(cfg) or not set(chosen(cfg)) <= set(COLORS) or len(set(chosen(cfg))) < len(chosen(cfg)):
            raise UsageError(f"--lanes takes some of {', '.join(COLORS)}, comma-separated, not '{cfg.lanes}'")
    return cfg


def main(argv):
    cfg = settings(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    SUITES[cfg.suite](cfg)


if __name__ == "__main__":
    run_cli(main, lambda: options_help(BenchConfig, __doc__))
