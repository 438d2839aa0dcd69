"""Train an RNN with Supervised Memory Training (or BPTT, truncated BPTT, DMT).

    python train.py --method smt                      # SMT on the default dataset (Shakespeare, bytes)
    python train.py --method bptt                     # the baseline: same cell and readout, backprop through time
    python train.py --method dmt --init_from=out      # drift correction of an SMT run's RNN, into --out_dir
    python train.py --init_from=resume                # continue the run in --out_dir

Every knob is a field of Config below, with its default; set any with --key=value. On CUDA the defaults marked
"cuda:" switch to the paper's shapes unless you set them. Writes out_dir/ckpt.pt (everything, for resuming),
out_dir/rnn.pt (only what the RNN needs to generate) and out_dir/log.jsonl (one line per evaluation).
"""
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import smt
from data import (DATA_KEYS, PROBES, TEXT_PROBES, Batches, Probe, TextProbe, UsageError, load_checkpoint,
                  parse_overrides, prepare, run_cli)
from smt import CELLS, ENCODERS, READOUTS


@dataclass
class Config:
    # run
    method: str = "smt"  # smt | bptt | tbptt | dmt
    dataset: str = "shakespeare"  # shakespeare | tinystories | mnist | mnist5k | a probe | longrange | text file(s)
    data_dir: str = "data"  # where prepared datasets are kept
    # data (the fields of data.DataConfig: python data.py takes the same)
    url: str = ""  # fetch the source from here (tinystories, mnist: its folder URL; shakespeare, mnist5k: the file)
    tokenizer: str = "bytes"  # text datasets: bytes (vocab 256) | gpt2 (GPT-2 BPE via tiktoken, vocab 50257)
    max_bytes: int = 0  # tinystories: only the first N bytes of each file (0: all of it)
    task_len: int = 64  # probes (retrieval, copy, stack, keys_values, modular, parity): tokens per sequence
    num_symbols: int = 16  # probes: distinct content symbols (parity: always 2)
    gap: int = 32  # longrange: bytes of filler between a fact and the place it is needed again
    out_dir: str = "out"  # ckpt.pt, rnn.pt and log.jsonl go here
    init_from: str = "scratch"  # scratch | resume (continue out_dir) | for dmt: the out_dir of an SMT run
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 autocast on CUDA, float32 on CPU) | float32 | bfloat16
    compile: bool = True  # torch.compile the networks on CUDA (never on CPU, where it does not pay off)
    seed: int = 1337
    # schedule and logging
    max_iters: int = 100000  # cuda: 150000 (on CPU, time_budget ends the run first)
    time_budget: float = 600.0  # stop after this many seconds of training (0: no limit); cuda: 0
    eval_interval: int = 250  # cuda: 2000
    eval_iters: int = 4  # held-out batches per evaluation
    log_interval: int = 25
    # optimisation
    batch_size: int = 32  # cuda: 128
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # cuda: 3e-4 (dmt: 3e-5); on CPU 3e-3 beat 1e-3 for SMT and BPTT alike (README)
    lr_schedule: str = "constant"  # constant | cosine (down to lr/10), both after a linear warmup (dmt: cosine)
    warmup_iters: int = 100  # cuda: 1500 (1% of the run) (dmt: 15)
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    max_bad_steps: int = 10  # a step with a non-finite loss or gradient is skipped; this many in a row stop the run
    # model shapes (the RNN's memory holds mem_tokens x d_model numbers)
    d_model: int = 64  # cuda: 256
    n_heads: int = 4  # cuda: 8
    mem_tokens: int = 4  # K; cuda: 16
    encoder_depth: int = 2  # cuda: 8
    decoder_depth: int = 2  # cuda: 4
    rnn_depth: int = 2  # cuda: 8
    cell: str = "transformer"  # the RNN cell: transformer | mlp | gru | lstm | elman
    encoder: str = "causal"  # causal: all memories from one pass | window: the paper's one pass per memory
    readout: str = "decoder"  # decoder: the teacher decoder's next-token head | linear: on the flat memory
    # SMT
    context_len: int = 64  # Tc: window a teacher memory sees (causal encoder: per attention layer); cuda: 256
    future_len: int = 16  # Tf: tokens the decoder predicts from each memory; cuda: 64
    positions: str = "all"  # transitions trained per sequence: all, or a number (1 = the released recipe)
    dec_positions: int = 16  # of those, how many also get the decoder loss (the decoder costs Tf tokens each)
    coef_dec: float = 1.0
    coef_dyn: float = 0.1
    coef_unif: float = 0.001
    gamma: float = 1.0  # discount of the decoder loss k steps ahead
    far_targets: int = 0  # far-future targets per memory: y_{t+r} from m_t at r in (future_len, far_horizon]; 0: off
    far_horizon: int = 64  # farthest offset r; SMT windows grow to context_len + far_horizon to hold the targets
    far_positions: int = 32  # memories per sequence that get those targets (each costs far_targets decoder tokens)
    coef_far: float = 1.0  # weight of that far-future loss
    coef_recall: float = 0.0  # each memory names its last input (keeps memories Markov; see smt.recall_loss)
    dyn_weighting: str = "uniform"  # uniform | change: transitions weighted by how far the teacher memory moves
    memory_noise: float = 0.0  # std of Gaussian noise on the teacher memory the RNN steps from (robustness to drift)
    detach_target: bool = False  # True: the dynamics loss does not shape the encoder's target memory
    freeze: str = "none"  # none | teacher (train the RNN only) | rnn (train the teacher only)
    # BPTT
    seq_len: int = 64  # unroll length; cuda: 256
    bptt_window: int = 16  # tbptt: gradient cut every this many steps
    # DMT
    dmt_steps: int = 64  # Td: steps the RNN runs on its own memories; cuda: 256
    dmt_every: int = 1  # k: a dynamics target every k steps (paper: 16; every step did better on CPU, README)
    dmt_coef_dyn: float = 10.0
    dmt_coef_unif: float = 0.01
    dmt_coef_readout: float = 1.0  # readout CE on the RNN's own (detached) memory; 0 disables


CUDA_DEFAULTS = dict(max_iters=150000, time_budget=0.0, eval_interval=2000, batch_size=128, lr=3e-4, warmup_iters=1500,
                     d_model=256, n_heads=8, mem_tokens=16, encoder_depth=8, decoder_depth=4, rnn_depth=8,
                     context_len=256, future_len=64, seq_len=256, dmt_steps=256)
DMT_DEFAULTS = dict(lr=3e-5, lr_schedule="cosine", max_iters=1500, warmup_iters=15)
ARCH_KEYS = ("d_model", "n_heads", "mem_tokens", "encoder_depth", "decoder_depth", "rnn_depth", "cell", "encoder",
             "readout", "context_len")
METHODS = ("smt", "bptt", "tbptt", "dmt")


def probe_defaults(task_len):
    """On a probe a training sequence is one whole task, which the teacher sees and predicts entirely. The rest is
    what let the RNN alone solve retrieval on a CPU (README): 4 decoder windows a sequence (each costs task_len
    tokens), memories that name their last input, the rare transitions that write weighted up, noisy teacher
    memories for the RNN's SMT step, DMT without the readout CE."""
    return dict(context_len=task_len, future_len=task_len, seq_len=task_len, dmt_steps=task_len - 1,
                dec_positions=4, coef_recall=0.1, dyn_weighting="change", memory_noise=0.3, dmt_coef_readout=0.0)


def load_config(argv):
    """Config from defaults, device- and method-specific defaults, then the command line (which wins)."""
    cfg = parse_overrides(Config(), argv)
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    extra = dict(CUDA_DEFAULTS) if cfg.device.startswith("cuda") else {}
    if cfg.method == "dmt":
        extra.update(DMT_DEFAULTS)
    if cfg.dataset in PROBES:
        extra.update(probe_defaults(cfg.task_len))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in extra.items() if k not in given})
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if cfg.device.startswith("cuda") else "float32"
    return cfg, given


def check_config(cfg):
    """One clear line for every setting that cannot work."""
    def one_of(key, options):
        if getattr(cfg, key) not in options:
            raise UsageError(f"--{key} must be one of {', '.join(options)}, not '{getattr(cfg, key)}'")
    one_of("method", METHODS)
    one_of("cell", CELLS)
    one_of("encoder", ENCODERS)
    one_of("readout", READOUTS)
    one_of("lr_schedule", ("constant", "cosine"))
    one_of("freeze", ("none", "teacher", "rnn"))
    one_of("dyn_weighting", ("uniform", "change"))
    one_of("dtype", ("float32", "bfloat16"))
    for key in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "grad_accum", "d_model",
                "n_heads", "mem_tokens", "context_len", "future_len", "seq_len", "dec_positions", "far_positions",
                "bptt_window", "dmt_every", "max_bad_steps"):
        if getattr(cfg, key) <= 0:
            raise UsageError(f"--{key} must be positive, not {getattr(cfg, key)}")
    for key in ("encoder_depth", "decoder_depth", "rnn_depth", "warmup_iters", "lr", "weight_decay", "grad_clip",
                "time_budget", "coef_dec", "coef_dyn", "coef_unif", "coef_recall", "gamma", "far_targets", "coef_far"):
        if getattr(cfg, key) < 0:
            raise UsageError(f"--{key} must not be negative, not {getattr(cfg, key)}")
    if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
        raise UsageError(f"--n_heads={cfg.n_heads} must divide --d_model={cfg.d_model} into an even head size")
    if cfg.cell == "lstm" and cfg.mem_tokens % 2:
        raise UsageError(f"--cell=lstm keeps h and c in halves of the memory: --mem_tokens must be even, "
                         f"not {cfg.mem_tokens}")
    if cfg.positions != "all" and not (cfg.positions.isdigit() and int(cfg.positions) > 0):
        raise UsageError(f"--positions must be 'all' or a positive number, not '{cfg.positions}'")
    if cfg.far_targets and cfg.far_targets > cfg.far_horizon - cfg.future_len:
        raise UsageError(f"--far_targets={cfg.far_targets} offsets do not fit in (future_len, far_horizon] = "
                         f"({cfg.future_len}, {cfg.far_horizon}]: raise --far_horizon or lower --far_targets")
    if cfg.dmt_steps < 2:
        raise UsageError(f"--dmt_steps must be at least 2, not {cfg.dmt_steps}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={cfg.device} but CUDA is not available here; use --device=cpu")
    if cfg.method == "dmt" and cfg.init_from == "scratch":
        raise UsageError("--method=dmt refines a trained SMT run: pass --init_from=<its out_dir>")


def train_len(cfg):
    """Length of one training sequence."""
    if cfg.dataset in PROBES:
        return cfg.task_len
    if cfg.method in ("bptt", "tbptt"):
        return cfg.seq_len
    horizon = max(cfg.future_len, cfg.far_horizon if cfg.far_targets else 0)
    if cfg.method == "dmt":
        return max(cfg.dmt_steps + 1, cfg.context_len + cfg.future_len)
    if cfg.dataset in TEXT_PROBES:  # a window holds at least one whole episode, fact and answer
        return max(cfg.context_len + horizon, TextProbe.longest(cfg.gap) + 1)
    return cfg.context_len + horizon


def lr_at(cfg, it):
    """Linear warmup, then constant or cosine decay to lr/10."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.lr / 10 + 0.5 * (cfg.lr - cfg.lr / 10) * (1 + math.cos(math.pi * progress))


def save_atomic(obj, path):
    """torch.save to a temporary file, fsync, rename: a crash or failed write leaves the previous file intact."""
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def restore(cfg, given):
    """For resume: the checkpoint and the run's config, with what the command line gives on top (the architecture
    cannot change). For dmt: the SMT run's checkpoint, with its architecture and dataset."""
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", f"nothing to resume in --out_dir={cfg.out_dir}",
                               keys=("config", "model", "meta", "optimizer", "iter", "elapsed", "rng"))
        if "method" in given and ckpt["config"]["method"] != cfg.method:
            raise UsageError(f"{cfg.out_dir}/ckpt.pt is a {ckpt['config']['method']} run, not {cfg.method}: "
                             f"pass --method={ckpt['config']['method']} or another --out_dir")
    else:
        ckpt = load_checkpoint(Path(cfg.init_from) / "ckpt.pt", f"--init_from={cfg.init_from} must be the "
                               "out_dir of an SMT run")
        if ckpt["config"]["method"] not in ("smt", "dmt"):
            raise UsageError(f"--init_from={cfg.init_from} is a {ckpt['config']['method']} run; DMT needs a "
                             "teacher, from an SMT run")
    for key in ARCH_KEYS:
        if key in given and getattr(cfg, key) != ckpt["config"][key]:
            raise UsageError(f"--{key}={getattr(cfg, key)} differs from the checkpoint's {ckpt['config'][key]}; "
                             f"the architecture of a run cannot change")
    if cfg.init_from == "resume":  # the same run goes on: its settings, bar what the command line changes
        fields = {f.name for f in dataclasses.fields(Config)} - given - {"init_from", "out_dir"}
        return dataclasses.replace(cfg, **{k: v for k, v in ckpt["config"].items() if k in fields}), ckpt
    arch = {k: ckpt["config"][k] for k in ARCH_KEYS}
    if "dataset" not in given:  # dmt refines on the SMT run's data
        arch.update({k: ckpt["config"][k] for k in DATA_KEYS})
        if arch["dataset"] in PROBES:  # what load_config would have set, had it known the dataset
            arch.update({k: v for k, v in probe_defaults(arch["task_len"]).items() if k not in given and
                         k not in ARCH_KEYS})
    return dataclasses.replace(cfg, **arch), ckpt


@torch.no_grad()
def evaluate(model, cfg, batches, autocast):
    """Held-out numbers: the RNN's own bits per byte (from empty; after teacher priming), or on a probe its
    accuracy at the target positions (from empty, whole task sequences) and the teacher's; for SMT on text, the
    teacher's losses. Always the same val windows (a fixed generator), so evaluations compare."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = cfg.dataset in PROBES
    text_probe = cfg.dataset in TEXT_PROBES
    sums = {}
    with torch.random.fork_rng(devices=[]):  # evaluation leaves training's random stream as it was
        for _ in range(cfg.eval_iters):
            if probe or text_probe:  # at least 32 sequences a batch: small batches would make accuracy noise
                x, y = batches.get("val", batch_size=max(cfg.batch_size, 32), generator=gen)
            else:
                x, y = batches.get("val", seq_len=2 * cfg.context_len, generator=gen)
            with autocast:
                if probe:
                    stats = smt.evaluate_probe(model, x, y, whole=batches.meta["whole_answer"])
                elif text_probe:  # accuracy per answer byte and per whole answer
                    stats = smt.evaluate_probe(model, x, y, whole=False, whole_too=True)
                else:
                    stats = smt.evaluate_rnn(model, x, y, cfg.context_len, primed=model.encoder is not None)
                if model.encoder is not None and not (probe or text_probe):  # probes: teacher_acc says it
                    L = cfg.context_len + cfg.future_len
                    stats.update(smt.smt_loss(model, x[:, :L], y[:, :L], cfg)[1])
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.eval_iters
    model.train()
    return {("val_" + k): v for k, v in sums.items()}


def all_reduce_mean(params, numbers):
    """Averages the gradients of `params` and a few `numbers` over all ranks in one collective; returns the numbers.
    Done by hand, once per optimizer step (after the last micro-batch), because the losses call the model's parts,
    not its forward, which DistributedDataParallel would need. Every rank has gradients for the same parameters
    (unused ones, like the linear readout in SMT, have none anywhere)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads] + [torch.tensor(numbers, dtype=grads[0].dtype,
                                                                  device=grads[0].device)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[offset:].tolist()


def main(argv):
    cfg, given = load_config(argv)
    check_config(cfg)
    ckpt = None
    if cfg.init_from != "scratch":
        cfg, ckpt = restore(cfg, given)
        check_config(cfg)
    # under torchrun: one process per GPU (or CPU process), each on its own batches, gradients averaged
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0  # the one that prints, evaluates and writes
    if world > 1:
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(cfg.device)
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    torch.manual_seed(cfg.seed)  # the same on every rank: the same initial weights
    device = torch.device(cfg.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    if world > 1 and not master:
        dist.barrier()  # rank 0 prepares the dataset alone
    folder = None if cfg.dataset in PROBES + TEXT_PROBES else prepare(cfg)
    if world > 1 and master:
        dist.barrier()
    if folder is None:  # a probe: its sequences are generated per batch
        kind = TextProbe if cfg.dataset in TEXT_PROBES else Probe
        batches = kind(cfg, cfg.batch_size, cfg.seed, rank=rank, device=device)
    else:
        batches = Batches(folder, max(train_len(cfg), 2 * cfg.context_len), cfg.batch_size, cfg.seed, rank=rank,
                          device=device)
    meta, vocab_size = batches.meta, batches.meta["vocab_size"]
    L = train_len(cfg)

    model = smt.build_model(dataclasses.asdict(cfg), vocab_size, cfg.method in ("smt", "dmt")).to(device)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError:  # the message lists every mismatched tensor; one line says enough
            raise UsageError(f"the weights in {cfg.init_from} do not fit this model (vocab {vocab_size} of "
                             f"{cfg.dataset}, {cfg.method}); was it trained on another dataset?") from None
    if cfg.method == "dmt":
        model.encoder.requires_grad_(False)
    if cfg.freeze == "teacher" and model.encoder is not None:
        model.encoder.requires_grad_(False)
        model.decoder.requires_grad_(False)
    if cfg.freeze == "rnn":
        model.cell.requires_grad_(False)
        model.rnn_embed.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    start_iter, elapsed_before, skipped = 0, 0.0, 0
    if ckpt is not None and cfg.init_from == "resume":
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError:
            raise UsageError(f"the optimizer state in {cfg.out_dir}/ckpt.pt does not fit this run's trained "
                             "parameters (was --freeze changed?)") from None
        start_iter, elapsed_before, skipped = ckpt["iter"], ckpt["elapsed"], ckpt.get("skipped", 0)
        if rank < len(ckpt["rng"]):  # each rank goes on with its own random streams (new ranks start fresh)
            rng = ckpt["rng"][rank]
            torch.set_rng_state(rng["torch"])
            batches.generator.set_state(rng["batches"])
            if "cuda" in rng and device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], device)
    if cfg.compile and device.type == "cuda":
        for part in (model.encoder, model.decoder, model.cell):
            if part is not None:
                part.compile()
    loss_fn = smt.LOSSES[cfg.method]

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if master and start_iter > 0 and (out / "log.jsonl").exists():  # evaluations past the checkpoint are redone
        lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
        (out / "log.jsonl").write_text("".join(line for line in lines if line.endswith("\n")
                                               and json.loads(line)["iter"] <= start_iter))
    n_params = sum(p.numel() for p in model.parameters())
    if master:
        print(f"{cfg.method} on {folder or cfg.dataset}, {cfg.device} {cfg.dtype}, {n_params / 1e6:.2f}M "
              f"parameters, memory {cfg.mem_tokens}x{cfg.d_model}, sequences of {L}, batch "
              f"{cfg.batch_size}x{cfg.grad_accum}" + (f"x{world} processes" if world > 1 else ""), flush=True)

    def checkpoint(it, elapsed):
        """Everything an exact resume needs: weights, optimizer, iteration and every rank's random states (torch's,
        which the losses draw from, and the batch sampler's). Called on every rank; rank 0 writes."""
        rng = dict(torch=torch.get_rng_state(), batches=batches.generator.get_state())
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        rngs = [rng]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng)
        if not master:
            return
        state = dict(config=dataclasses.asdict(cfg), model=model.state_dict(), optimizer=optimizer.state_dict(),
                     iter=it, elapsed=elapsed, skipped=skipped, meta=meta, rng=rngs)
        save_atomic(state, out / "ckpt.pt")
        save_atomic(dict(config=dataclasses.asdict(cfg), model=model.rnn_state_dict(), meta=meta),
                    out / "rnn.pt")

    def log_eval(it, elapsed, with_drift=False):
        stats = evaluate(model, cfg, batches, autocast)
        record = dict(iter=it, elapsed=round(elapsed, 2), **stats, skipped=skipped)
        if with_drift:  # dmt: the drift per step over the same held-out window before and after
            x, _ = batches.get("val", seq_len=cfg.dmt_steps, generator=torch.Generator().manual_seed(cfg.seed))
            record["drift"] = smt.drift(model, x)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " | ".join(f"{k} {v:.4f}" for k, v in stats.items())
        print(f"eval {it}: {shown}", flush=True)

    if cfg.method == "dmt" and start_iter == 0 and master:
        log_eval(0, 0.0, with_drift=True)

    stop = []  # signals received; the loop saves a checkpoint and ends at the next step
    def on_signal(signum, frame):
        stop.append(signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    model.train()
    it, t_start, tokens_done, bad_in_a_row = start_iter, time.time(), 0, 0
    t_last = t_start
    while it < cfg.max_iters:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, it)
        loss_sum, stats_sum = 0.0, {}
        for _ in range(cfg.grad_accum):
            x, y = batches.get("train", seq_len=L)
            with autocast:
                loss, stats = loss_fn(model, x, y, cfg)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v / cfg.grad_accum
        elapsed = elapsed_before + time.time() - t_start
        out_of_time = cfg.time_budget > 0 and elapsed >= cfg.time_budget
        signalled = bool(stop)
        if world > 1:  # every rank gets the mean gradient and logged numbers, and stops when any must
            loss_sum, *values, out_of_time, signalled = all_reduce_mean(
                params, [loss_sum, *stats_sum.values(), out_of_time, signalled])
            stats_sum = dict(zip(stats_sum, values))
            out_of_time, signalled = out_of_time > 0, signalled > 0
        # with max_norm=inf, clip_grad_norm_ only measures: the norm tells whether every gradient is finite
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if math.isfinite(loss_sum) and torch.isfinite(norm):
            optimizer.step()
            bad_in_a_row = 0
        else:  # an overflow or a bad batch must not reach the weights
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
        optimizer.zero_grad(set_to_none=True)
        it += 1
        tokens_done += cfg.batch_size * cfg.grad_accum * L * world
        if master and (it % cfg.log_interval == 0 or it == cfg.max_iters or out_of_time or bad_in_a_row):
            now = time.time()
            rate = tokens_done / (now - t_last)
            per_iter = (now - t_start) / (it - start_iter)
            eta = (cfg.max_iters - it) * per_iter
            if cfg.time_budget > 0:
                eta = min(eta, cfg.time_budget - elapsed)
            shown = " ".join(f"{k} {v:.4f}" for k, v in stats_sum.items())
            print(f"iter {it}/{cfg.max_iters} | loss {loss_sum:.4f} | {shown} | lr {lr_at(cfg, it - 1):.2e} | "
                  f"{rate:,.0f} tok/s | {elapsed:.0f}s elapsed | ETA {max(0, eta):.0f}s"
                  + (f" | skipped {skipped} (non-finite)" if skipped else ""), flush=True)
            t_last, tokens_done = now, 0
        if bad_in_a_row >= cfg.max_bad_steps:
            break  # without a checkpoint: the last one written holds the last good state
        if it % cfg.eval_interval == 0 or it == cfg.max_iters or out_of_time:
            t_eval = time.time()
            if master:
                log_eval(it, elapsed, with_drift=cfg.method == "dmt" and (it == cfg.max_iters or out_of_time))
            checkpoint(it, elapsed)
            paused = time.time() - t_eval  # evaluation does not count as training time
            t_start, t_last = t_start + paused, t_last + paused
        elif signalled:
            checkpoint(it, elapsed)
        if out_of_time or signalled:
            break
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if world > 1:
        dist.destroy_process_group()
    if bad_in_a_row >= cfg.max_bad_steps:
        kept = f"{out / 'ckpt.pt'} keeps the last good state" if (out / "ckpt.pt").exists() else "no checkpoint yet"
        raise UsageError(f"stopped at iter {it}: {bad_in_a_row} steps in a row had a non-finite loss or gradient "
                         f"(skipped); {kept}. Lower --lr (now {cfg.lr}) or check the data")
    if master and signalled:
        print(f"stopped by {stop[0] if stop else 'a signal'} at iter {it}: checkpoint in {out / 'ckpt.pt'}; "
              "continue with --init_from=resume")
    elif master:
        print(f"done: {it} iterations, checkpoint in {out / 'ckpt.pt'}, RNN for sampling in {out / 'rnn.pt'}")


if __name__ == "__main__":
    run_cli(main)
