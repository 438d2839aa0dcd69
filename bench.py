"""Benchmarks of SMT against BPTT: step time against sequence length, training throughput, generation, gradient paths.

    python bench.py --suite=scaling      # training step time at lengths 64..1024, SMT and BPTT side by side
    python bench.py --suite=throughput   # tokens/s and transitions/s: SMT positions=1 (window) and =all, BPTT, TBPTT
    python bench.py --suite=inference    # the RNN generating 4,096 tokens against the teacher re-encoding its context
    python bench.py --suite=gradients    # gradient norm against distance, BPTT vs SMT; a PNG in --out
    python bench.py --suite=scaling --quick --json    # small sizes (< 2 minutes on 2 cores), one JSON per line

Random tokens (vocab 256) stand in for data: the cost of a step does not depend on what the tokens are. Times are
wall-clock medians over --repeats steps after one warm-up step, every method timed in turn within each repetition
(interleaved), so that a machine shared with other work slows all of them alike.
"""
import dataclasses
import functools
import json
import math
import resource
import statistics
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import smt
from data import UsageError, parse_overrides, run_cli
from train import Config

SUITES = ("scaling", "throughput", "inference", "gradients")
VOCAB = 256


@dataclass
class BenchConfig:
    suite: str = ""  # scaling | throughput | inference | gradients
    quick: bool = False  # small sizes: every suite in under 2 minutes on a 2-core CPU
    json: bool = False  # one JSON object per measurement instead of table lines
    out: str = "bench_out"  # where the gradients suite writes its PNG
    lengths: str = ""  # comma-separated, overrides the suite's: scaling: sequence lengths; inference: token counts
    #                    reported; throughput: the one context length; gradients: the one unroll length T
    repeats: int = 0  # timed steps per measurement (the median is reported); 0: the suite's default
    tokens: int = 0  # scaling: tokens per batch, held fixed across lengths; 0: the suite's default
    batch_size: int = 0  # throughput: sequences per batch; 0: the suite's default
    threads: int = 0  # torch threads; 0: torch's default (1 is steadier on a machine shared with other jobs)
    seed: int = 1337


def emit(cfg, **record):
    """One measurement: a JSON object, or a table line of key=value."""
    if cfg.json:
        print(json.dumps(record), flush=True)
    else:
        shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        print("  ".join(shown), flush=True)


def build(cfg, with_encoder):
    return smt.build_model(dataclasses.asdict(cfg), VOCAB, with_encoder)


class Trainer:
    """One method's model, optimizer and loss: a step is forward, backward, clip and AdamW, as in train.py."""

    def __init__(self, cfg):
        self.cfg, self.loss_fn = cfg, smt.LOSSES[cfg.method]
        self.model = build(cfg, with_encoder=cfg.method == "smt")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    def step(self, x, y):
        start = time.perf_counter()
        loss, _ = self.loss_fn(self.model, x, y, self.cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
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


def random_batch(batch_size, length, generator):
    x = torch.randint(0, VOCAB, (batch_size, length), generator=generator)
    return x, torch.randint(0, VOCAB, (batch_size, length), generator=generator)


# ---------------------------------------------------------------------------------------------------------------

def scaling(cfg, lengths):
    """Step time against sequence length L at a fixed number of tokens per batch (batch = tokens / L), so the work per
    token is what the method makes of it. SMT: positions=all, causal encoder with its default 64-token context,
    decoder loss on L/4 positions per sequence (the same number of decoder windows per batch at every L). BPTT: the
    whole L-step unroll. Same Transformer cell and model size (train.py's CPU defaults) for both."""
    tokens = cfg.tokens or (1024 if cfg.quick else 4096)
    repeats = cfg.repeats or (1 if cfg.quick else 3)
    gen = torch.Generator().manual_seed(cfg.seed)
    base = Config()
    trainers = dict(smt=Trainer(dataclasses.replace(base, method="smt")),
                    bptt=Trainer(dataclasses.replace(base, method="bptt")))
    batches = {L: random_batch(max(1, tokens // L), L, gen) for L in lengths}

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
             **(dict(target=1.5, met=ratio <= 1.5) if name == "smt" else {}))


def throughput(cfg, context_len):
    """Training tokens/s and transitions/s at context_len 256 (issue 3's setting), 16 memory tokens of width 64
    (depths 2, 4 heads), future_len 16: sequences of 272 tokens for every method (BPTT unrolls all of them, TBPTT cuts
    every 16). A transition (m_t, x_{t+1}) -> m_{t+1} counts when the step trains it: SMT one per selected position,
    BPTT and TBPTT every step of the unroll."""
    batch_size = cfg.batch_size or (2 if cfg.quick else 8)
    repeats = cfg.repeats or (1 if cfg.quick else 3)
    L = context_len + 16
    base = Config(d_model=64, n_heads=4, mem_tokens=16, context_len=context_len, future_len=16, seq_len=L,
                  bptt_window=16)
    methods = {"smt_pos1_window": dict(method="smt", encoder="window", positions="1"),
               "smt_all_causal": dict(method="smt", encoder="causal", positions="all"),
               "bptt": dict(method="bptt"), "tbptt": dict(method="tbptt")}
    trainers = {name: Trainer(dataclasses.replace(base, **over)) for name, over in methods.items()}
    x, y = random_batch(batch_size, L, torch.Generator().manual_seed(cfg.seed))
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
         target=10.0, met=ratio >= 10)


@torch.no_grad()
def inference(cfg, marks):
    """Generation, batch 1, greedy. rnn: the RNN alone from m_empty generates marks[-1] tokens, one step and one
    readout per token; tokens/s over the tokens since the previous mark. teacher: the causal encoder, with a context
    as long as the longest mark, re-encodes the whole context for every new token (memory at the last position, then
    the decoder's next-token head); tokens/s over a few such steps ending at each mark's context length.
    state_bytes: what the method holds for its context: the RNN's memory tensor (constant); for the teacher, the keys
    and values of every attention layer over the context (a KV cache's size: re-encoding holds them all in a step).
    peak_rss_mib: the process's high-water resident memory (includes Python, torch and the weights), rnn first."""
    steps = cfg.repeats or (2 if cfg.quick else 4)
    torch.manual_seed(cfg.seed)
    base = Config()
    model = build(dataclasses.replace(base, context_len=marks[-1]), with_encoder=True).eval()

    def greedy(logits):
        return logits.argmax(dim=-1)

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    start, previous = time.perf_counter(), 0
    run = smt.rollout(model, model.empty(1), torch.zeros(1, 0, dtype=torch.long), sample=greedy, num_new=marks[-1])
    for n, (_, memory) in enumerate(run, start=1):
        if n in marks:
            now = time.perf_counter()
            emit(cfg, suite="inference", method="rnn", tokens=n, tokens_per_s=(n - previous) / (now - start),
                 state_bytes=memory.nelement() * memory.element_size(), peak_rss_mib=peak())
            start, previous = now, n
    attending = len(model.encoder.body.blocks) + 1  # the body's layers and the registers' read over the context
    context = torch.randint(0, VOCAB, (1, marks[-1]), generator=torch.Generator().manual_seed(cfg.seed))
    for n in marks:
        first = max(1, n - steps)  # the timed steps end with a context of n tokens
        tokens, start = context[:, :first], time.perf_counter()
        for _ in range(n - first):
            m = model.memories(tokens, torch.tensor([tokens.size(1) - 1]))[:, 0]
            tokens = torch.cat([tokens, greedy(model.readout(m))[:, None]], dim=1)
        seconds = time.perf_counter() - start
        emit(cfg, suite="inference", method="teacher", tokens=n, tokens_per_s=(n - first) / seconds,
             state_bytes=attending * 2 * n * base.d_model * 4, peak_rss_mib=peak())


def gradients(cfg, T):
    """Norm of the gradient of the next-token loss at the last position, w.r.t. the embedding of the input d tokens
    back (d = 1: the last input read), untrained model (train.py's CPU defaults), 8 random sequences of length T, mean
    per-sequence norm. BPTT: through the T-step unroll of the RNN from m_empty. SMT: through the teacher encoder (its
    context is T, so it sees every input) to the memory at the last position, read out by the same decoder head: no
    path crosses more than the encoder's depth."""
    torch.manual_seed(cfg.seed)
    model = build(Config(context_len=T), with_encoder=True)
    x, y = random_batch(8, T, torch.Generator().manual_seed(cfg.seed))

    def last_loss(m):
        return F.cross_entropy(model.readout(m), y[:, -1], reduction="sum")  # sum: each sequence its own gradient

    e = model.rnn_embed(x).detach().requires_grad_()
    m = model.empty(x.size(0))
    for t in range(T):
        m = model.cell(m, e[:, t])
    norms = dict(bptt=torch.autograd.grad(last_loss(m), e)[0])
    e = model.encoder.embed(x).detach().requires_grad_()
    hook = model.encoder.embed.register_forward_hook(lambda module, inputs, output: e)  # feed our leaf in
    try:
        m = model.memories(x, torch.tensor([T - 1]))[:, 0]
    finally:
        hook.remove()
    norms["smt"] = torch.autograd.grad(last_loss(m), e)[0]
    norms = {k: g.norm(dim=-1).mean(0).flip(0).tolist() for k, g in norms.items()}  # index d - 1
    shown = range(1, T + 1) if cfg.json else sorted({2 ** i for i in range(int(math.log2(T)) + 1)} | {T})
    for d in shown:
        for name, values in norms.items():
            emit(cfg, suite="gradients", method=name, distance=d, grad_norm=values[d - 1])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gradients.png"
    plot(path, norms)
    emit(cfg, suite="gradients", png=str(path), bptt_color="red", smt_color="blue")


# ---------------------------------------------------------------------------------------------------------------
# A PNG line plot written by hand: an RGB pixel grid, a 3x5 pixel font, zlib and struct.

FONT = dict(zip("0123456789-.ABCDEGIMNOPRST ", """
111101101101111 010110010010111 111001111100111 111001111001111 101101111001001 111100111001111 111100111101111
111001001010010 111101111101111 111101111001111 000000111000000 000000000000010 010101111101101 110101110101110
011100100100011 110101101101110 111100110100111 011100101101011 111010010010111 101111111101101 110101101101101
010101101101010 110101110100100 110101110101101 011100010001110 111010010010010 000000000000000""".split()))
RED, BLUE, GREY, BLACK = (220, 40, 40), (40, 70, 220), (215, 215, 215), (0, 0, 0)


class Canvas:
    def __init__(self, width, height):
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x, y, color, size=1):
        for i in range(size):
            for j in range(size):
                if 0 <= x + i < self.width and 0 <= y + j < self.height:
                    k = 3 * ((y + j) * self.width + x + i)
                    self.pixels[k: k + 3] = bytes(color)

    def line(self, x0, y0, x1, y1, color, size=1):
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            self.dot(round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n), color, size)

    def text(self, x, y, s, color=BLACK, scale=2):
        for c, ch in enumerate(s.upper()):
            for k, bit in enumerate(FONT[ch]):
                if bit == "1":
                    self.dot(x + (4 * c + k % 3) * scale, y + k // 3 * scale, color, scale)

    def save(self, path):
        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
        row = 3 * self.width
        raw = b"".join(b"\x00" + bytes(self.pixels[y * row: (y + 1) * row]) for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                               + chunk(b"IEND", b""))


def plot(path, series):
    """Log-scale y against distance 1..T, one line per series (bptt red, smt blue), decade grid lines."""
    width, height, left, right, top, bottom = 640, 400, 70, 20, 30, 40
    values = [v for s in series.values() for v in s if v > 0]
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    hi = max(hi, lo + 1)
    T = len(next(iter(series.values())))
    canvas = Canvas(width, height)

    def px(d, v):
        x = left + (d - 1) / max(1, T - 1) * (width - left - right)
        y = top + (hi - math.log10(max(v, 10.0 ** lo))) / (hi - lo) * (height - top - bottom)
        return round(x), round(y)
    for decade in range(lo, hi + 1):
        y = px(1, 10.0 ** decade)[1]
        canvas.line(left, y, width - right, y, GREY)
        canvas.text(4, y - 5, f"1E{decade}")
    canvas.line(left, top, left, height - bottom, BLACK)
    canvas.line(left, height - bottom, width - right, height - bottom, BLACK)
    canvas.text(left, height - bottom + 8, "1")
    canvas.text(width - right - 8 * len(str(T)), height - bottom + 8, str(T))
    canvas.text(width // 2 - 40, height - bottom + 8, "DISTANCE D")
    canvas.text(left, 8, "GRAD NORM")
    for (name, values), color, row in zip(series.items(), (RED, BLUE), (8, 22)):
        points = [px(d, v) for d, v in enumerate(values, start=1)]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            canvas.line(x0, y0, x1, y1, color, size=2)
        canvas.line(width - 110, row + 4, width - 80, row + 4, color, size=2)
        canvas.text(width - 70, row, name)
    canvas.save(path)


# ---------------------------------------------------------------------------------------------------------------

def parse_lengths(cfg, default):
    if not cfg.lengths:
        return default
    try:
        lengths = [int(s) for s in cfg.lengths.split(",")]
    except ValueError:
        raise UsageError(f"--lengths takes comma-separated whole numbers, not '{cfg.lengths}'") from None
    if min(lengths) < 2 or lengths != sorted(set(lengths)):
        raise UsageError(f"--lengths must be increasing and at least 2, not '{cfg.lengths}'")
    return lengths


def main(argv):
    cfg = parse_overrides(BenchConfig(), argv)
    if cfg.suite not in SUITES:
        raise UsageError(f"--suite must be one of {', '.join(SUITES)}, not '{cfg.suite}'")
    for key in ("repeats", "tokens", "batch_size", "threads"):
        if getattr(cfg, key) < 0:
            raise UsageError(f"--{key} must not be negative, not {getattr(cfg, key)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.suite == "scaling":
        scaling(cfg, parse_lengths(cfg, [64, 128, 256, 512, 1024]))
    elif cfg.suite == "inference":
        inference(cfg, parse_lengths(cfg, [512, 1024, 2048, 4096]))
    else:
        lengths = parse_lengths(cfg, [256] if cfg.suite == "throughput" or not cfg.quick else [128])
        if len(lengths) != 1:
            raise UsageError(f"--suite={cfg.suite} takes one length, not '{cfg.lengths}'")
        (throughput if cfg.suite == "throughput" else gradients)(cfg, lengths[0])


if __name__ == "__main__":
    run_cli(main)
