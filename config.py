"""train.py's settings: every knob a field of Config with its default and a comment, the defaults that change where
they apply (on CUDA, for a method, on a probe), and the checks that reject a setting that cannot work.

The choices of --method, --cell, --encoder and --readout are the registries smt.METHODS, model.CELLS, ENCODERS and
READOUTS: an entry added there is a valid option here, in --help and in the tests.
"""
import dataclasses
from dataclasses import dataclass

import torch

from cli import UsageError, options_help, parse_overrides
from data import PROBES
from model import CELLS, ENCODERS, READOUTS
from smt import METHODS


@dataclass
class Config:
    # run
    method: str = "smt"  # smt: the teacher and the RNN at once | dmt: drift correction of an SMT run's RNN | bptt,
    #                      tbptt: the baseline, the same cell by (truncated) backpropagation through time
    dataset: str = "shakespeare"  # shakespeare | tinystories | mnist | mnist5k | a probe | longrange | text file(s)
    data_dir: str = "data"  # where prepared datasets are kept
    out_dir: str = "out"  # ckpt.pt, rnn.pt and log.jsonl go here
    init_from: str = "scratch"  # scratch | resume (continue out_dir) | the out_dir of an SMT run: dmt refines its RNN;
    #                             smt trains a fresh RNN on its teacher (--cell, --rnn_depth, --readout may differ)
    overwrite: bool = False  # True: start afresh in an out_dir that holds a run, deleting it (and its log)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 autocast on CUDA, float32 on CPU) | float32 | bfloat16
    compile: bool = True  # torch.compile the networks on CUDA (never on CPU, where it does not pay off)
    act_ckpt: str = "none"  # none | cell | all: activation checkpointing of the RNN cell's (or every) Transformer:
    #                         recomputed in backward, less memory for more time (SMT's cell runs on every transition)
    peak_flops: float = 0.0  # the device's peak FLOP/s for the logged MFU; 0: bf16 dense peak by GPU name (a table)
    seed: int = 1337  # initial weights, batches and every random draw of the losses
    # data (the fields of data.DataConfig: python prepare.py takes the same)
    url: str = ""  # fetch the source from here (tinystories, mnist: its folder URL; shakespeare, mnist5k: the file)
    tokenizer: str = "bytes"  # text datasets: bytes (vocab 256) | gpt2 (GPT-2 BPE via tiktoken, vocab 50257)
    max_bytes: int = 0  # tinystories: only the first N bytes of each file (0: all of it)
    task_len: int = 64  # probes (retrieval, copy, stack, keys_values, modular, parity): tokens per sequence
    num_symbols: int = 16  # probes: distinct content symbols (parity: always 2)
    image_size: int = 0  # mnist, mnist5k: side of the images, a divisor of 28 (0: 28); smaller: blocks averaged
    binarize: bool = False  # mnist, mnist5k: pixels as 0 or 1 (vocab 2), 1 where the pixel (after resizing) >= 128
    gap: int = 32  # longrange: bytes of filler between a fact and the place it is needed again
    min_gap: int = 0  # longrange: training episodes draw their gap from [min_gap, gap] (0: all at gap); scored at gap
    # schedule and logging
    max_iters: int = 100000  # optimizer steps (on CPU, time_budget ends the run first)
    time_budget: float = 600.0  # stop after this many seconds of training, counting a resumed run's (0: no limit)
    eval_interval: int = 250  # iterations between evaluations and checkpoints
    eval_seconds: float = 0.0  # also evaluate once this many training seconds have passed since the last (0: never)
    eval_iters: int = 4  # held-out batches per evaluation
    log_interval: int = 25  # iterations between progress lines
    # optimisation
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3  # AdamW's peak learning rate; on CPU 3e-3 beat 1e-3 for SMT and BPTT alike
    lr_schedule: str = "constant"  # constant | cosine (to lr/10 by max_iters or time_budget, whichever is first); both
    #                                after a linear warmup
    warmup_iters: int = 100  # iterations of linear warmup
    weight_decay: float = 0.01  # AdamW's, on weight matrices only
    beta1: float = 0.9  # AdamW's
    beta2: float = 0.95  # AdamW's
    grad_clip: float = 1.0  # 0 disables clipping
    max_bad_steps: int = 10  # a step with a non-finite loss or gradient is skipped; this many in a row stop the run
    # model shapes (the RNN's memory holds mem_tokens x d_model numbers)
    d_model: int = 64  # width of every network
    n_heads: int = 4  # attention heads
    mem_tokens: int = 4  # K: tokens of the memory
    encoder_depth: int = 2  # teacher encoder layers
    decoder_depth: int = 2  # teacher decoder layers
    rnn_depth: int = 2  # RNN cell layers
    cell: str = "transformer"  # the RNN cell (model.CELLS); nn_lstm, nn_gru: torch's own, for the BPTT baseline
    encoder: str = "causal"  # the teacher encoder (model.ENCODERS): causal, all memories from one pass; window, the
    #                          paper's, one pass per memory
    readout: str = "decoder"  # the RNN's readout (model.READOUTS): decoder, the teacher decoder's next-token head;
    #                           linear, a linear map of the flat memory
    # SMT
    context_len: int = 64  # Tc: window a teacher memory sees (causal encoder: per attention layer)
    future_len: int = 8  # Tf: tokens the decoder predicts from each memory
    positions: str = "8"  # transitions trained per sequence: all, or a number drawn at random (1 = the released
    #                       recipe); on a CPU 8 of 72: a step costs a quarter of all 72, and learns nearly as much
    #                       (docs/results.md)
    dec_positions: int = 8  # of those, how many also get the decoder loss (the decoder costs Tf tokens each)
    coef_dec: float = 1.0  # weight of the decoder loss
    coef_dyn: float = 0.1  # weight of the dynamics loss
    coef_unif: float = 0.001  # weight of the uniformity loss
    gamma: float = 1.0  # discount of the decoder loss k steps ahead
    past_targets: int = 0  # past targets per memory: the s-th last byte read, y_{t-s} = x_{t-s+1}, from m_t at s in
    #                        [1, past_horizon]; 0: off. Makes memories carry what they read (docs/results.md);
    #                        in DMT on the RNN's steps from its own memories
    past_horizon: int = 32  # farthest s
    past_positions: int = 32  # memories per sequence that get past targets; each target costs a decoder token
    coef_past: float = 1.0  # weight of that past loss
    coef_recall: float = 0.0  # each memory names its last input (keeps memories Markov; see smt.recall_loss)
    dyn_weighting: str = "uniform"  # uniform | change: transitions weighted by how far the teacher memory moves
    memory_noise: float = 0.0  # std of Gaussian noise on the teacher memory the RNN steps from (robustness to drift)
    freeze: str = "none"  # none | teacher (train the RNN only) | rnn (train the teacher only)
    # BPTT
    seq_len: int = 64  # unroll length
    bptt_window: int = 16  # tbptt: gradient cut every this many steps
    # DMT
    dmt_steps: int = 64  # Td: steps the RNN runs on its own memories
    dmt_every: int = 1  # k: a dynamics target every k steps (paper: 16; every step did better on CPU)
    dmt_coef_dyn: float = 10.0  # weight of the dynamics loss along the RNN's own run
    dmt_coef_unif: float = 0.01  # weight of the uniformity loss
    dmt_coef_readout: float = 1.0  # readout CE on the RNN's step from its own (detached) memory; 0 disables
    dmt_readout_grad: bool = True  # that CE also trains the RNN's step into the memory it reads (one step); off
    #                                 with --freeze=rnn. Same bits/byte on Shakespeare, more recall (docs/results.md)



REGISTRIES = dict(method=METHODS, cell=CELLS, encoder=ENCODERS, readout=READOUTS)  # what each option may name
ARCH_KEYS = ("d_model", "n_heads", "mem_tokens", "encoder_depth", "decoder_depth", "rnn_depth", "cell", "encoder",
             "readout", "context_len")
RNN_KEYS = ("rnn_depth", "cell", "readout")  # the RNN's own shape: a fresh RNN on a trained teacher may change it
CUDA_DEFAULTS = dict(max_iters=150000, time_budget=0.0, eval_interval=2000, batch_size=128, lr=3e-4, warmup_iters=1500,
                     d_model=256, n_heads=8, mem_tokens=16, encoder_depth=8, decoder_depth=4, rnn_depth=8,
                     context_len=256, future_len=64, positions="all", dec_positions=16, seq_len=256, dmt_steps=256)


def default_layers(cfg):
    """The defaults that replace Config's where they apply, in order (a later layer wins; the command line wins over
    all): [(label, applies to cfg, {field: value})].
    - cuda: the paper's shapes, every transition trained;
    - bptt: a cosine schedule (2.43 bits/byte on Shakespeare in 10 CPU minutes with a constant lr);
    - dmt: a short cosine schedule, at 2e-3 on CPU (3e-4 and 1e-3 did worse in a 120-second DMT), the paper's 3e-5
      on CUDA;
    - probe: a training sequence is one whole task, which the teacher sees and predicts entirely; then what let the
      RNN alone solve retrieval on a CPU: 4 decoder windows a sequence (each costs task_len tokens), memories that
      name their last input, the rare transitions that write weighted up, noisy teacher memories for the RNN's step,
      DMT without the readout CE, at 3e-4 on CPU;
    - a frozen RNN takes no gradient from DMT's readout."""
    cuda, method, probe = cfg.device.startswith("cuda"), METHODS.get(cfg.method), cfg.dataset in PROBES
    dmt = method is not None and method.refines
    return [
        ("cuda", cuda, CUDA_DEFAULTS),
        ("bptt", method is not None and not method.teacher, dict(lr_schedule="cosine")),
        ("dmt", dmt, dict(lr=2e-3, lr_schedule="cosine", max_iters=1500, warmup_iters=15)),
        ("cuda dmt", cuda and dmt, dict(lr=3e-5)),
        (f"probe (task_len {cfg.task_len})", probe,
         dict(context_len=cfg.task_len, future_len=cfg.task_len, seq_len=cfg.task_len, dmt_steps=cfg.task_len - 1,
              positions="all", dec_positions=4, coef_recall=0.1, dyn_weighting="change", memory_noise=0.3,
              dmt_coef_readout=0.0)),
        ("probe dmt on cpu", probe and dmt and not cuda, dict(lr=3e-4)),
        ("--freeze=rnn", cfg.freeze == "rnn", dict(dmt_readout_grad=False)),
    ]


def with_defaults(cfg, fixed):
    """cfg with every default layer that applies to it, bar the keys in `fixed` (set by the command line, or taken
    from a checkpoint)."""
    if cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    for _, applies, values in default_layers(cfg):
        if applies:
            cfg = dataclasses.replace(cfg, **{k: v for k, v in values.items() if k not in fixed})
    if cfg.dtype == "auto":
        cfg = dataclasses.replace(cfg, dtype="bfloat16" if cfg.device.startswith("cuda") else "float32")
    return cfg


def load_config(argv):
    """Config from its defaults, the layers that apply, then the command line (which wins). Returns the config and
    the keys the command line gave."""
    cfg, given = parse_overrides(Config(), argv)
    return with_defaults(cfg, given), given


def known_settings(saved):
    """Of a checkpoint's plain config, the settings this Config has (a fork's or a newer version's extra keys
    dropped; keys it lacks keep their defaults where the caller builds a Config)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in saved.items() if k in fields}


def config_help(doc):
    """train.py --help: Config's options, the registries' choices, and every layer's defaults."""
    every = {label: values for label, _, values in default_layers(Config(device="cpu", method="dmt"))}
    return options_help(Config, doc, every, {key: list(names) for key, names in REGISTRIES.items()})


POSITIVE = ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "grad_accum", "d_model",
            "n_heads", "mem_tokens", "context_len", "future_len", "seq_len", "dec_positions", "past_positions",
            "past_horizon", "bptt_window", "dmt_every", "max_bad_steps")
NOT_NEGATIVE = ("encoder_depth", "decoder_depth", "rnn_depth", "warmup_iters", "lr", "weight_decay", "grad_clip",
                "time_budget", "eval_seconds", "coef_dec", "coef_dyn", "coef_unif", "coef_recall", "gamma",
                "peak_flops", "past_targets", "coef_past", "memory_noise")
CHOICES = dict(lr_schedule=("constant", "cosine"), freeze=("none", "teacher", "rnn"),
               dyn_weighting=("uniform", "change"), dtype=("float32", "bfloat16"), act_ckpt=("none", "cell", "all"))


def check_config(cfg):
    """One clear line for every setting that cannot work."""
    for key, options in {**REGISTRIES, **CHOICES}.items():
        if getattr(cfg, key) not in options:
            raise UsageError(f"--{key} must be one of {', '.join(options)}, not '{getattr(cfg, key)}'")
    for key in POSITIVE:
        if getattr(cfg, key) <= 0:
            raise UsageError(f"--{key} must be positive, not {getattr(cfg, key)}")
    for key in NOT_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise UsageError(f"--{key} must not be negative, not {getattr(cfg, key)}")
    if cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
        raise UsageError(f"--n_heads={cfg.n_heads} must divide --d_model={cfg.d_model} into an even head size")
    if cfg.cell in ("lstm", "nn_lstm") and cfg.mem_tokens % 2:
        raise UsageError(f"--cell={cfg.cell} keeps h and c in halves of the memory: --mem_tokens must be even, "
                         f"not {cfg.mem_tokens}")
    if cfg.positions != "all" and not (cfg.positions.isdigit() and int(cfg.positions) > 0):
        raise UsageError(f"--positions must be 'all' or a positive number, not '{cfg.positions}'")
    if cfg.past_targets > cfg.past_horizon:
        raise UsageError(f"--past_targets={cfg.past_targets} offsets do not fit in [1, past_horizon] = "
                         f"[1, {cfg.past_horizon}]: raise --past_horizon or lower --past_targets")
    if cfg.dmt_steps < 2:
        raise UsageError(f"--dmt_steps must be at least 2, not {cfg.dmt_steps}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={cfg.device} but CUDA is not available here; use --device=cpu")
    method = METHODS[cfg.method]
    if method.refines and cfg.init_from == "scratch":
        raise UsageError(f"--method={cfg.method} refines a trained SMT run: pass --init_from=<its out_dir>")
    if not method.teacher and cfg.init_from not in ("scratch", "resume"):
        raise UsageError(f"--method={cfg.method} has no teacher to take from --init_from={cfg.init_from}: pass "
                         "--init_from=scratch or resume")
    if cfg.dmt_readout_grad and cfg.freeze == "rnn":
        raise UsageError("--dmt_readout_grad=True trains the RNN's step, which --freeze=rnn holds fixed: "
                         "pass one of them")
    if cfg.overwrite and cfg.init_from == "resume":
        raise UsageError("--overwrite=True starts afresh; --init_from=resume continues the run: pass one of them")
