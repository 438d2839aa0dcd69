"""The command line of every CLI, and train.py's settings.

Every CLI keeps its knobs in a dataclass whose fields are its options (--key=value or --key value, typed by the
defaults); --help lists them with the comment after each field and the section comments above them. Config holds
train.py's knobs, with the defaults that change on CUDA, for DMT and on a probe.
"""
import ast
import dataclasses
import difflib
import inspect
import io
import json
import os
import sys
import textwrap
import tokenize
from dataclasses import dataclass

import torch

from data import DataError, PROBES, TEXT_PROBES
from smt import CELLS, ENCODERS, READOUTS


class UsageError(Exception):
    """Bad input from the user. The CLIs print it as one line and exit with code 2, no traceback."""


USER_ERRORS = (UsageError, DataError)  # data.py raises its own, since it imports nothing of the project's


def run_cli(main, usage=None):
    """Runs main(argv); -h or --help prints usage() and exits 0; a user error becomes 'error: ...' on stderr and
    exit code 2."""
    argv = sys.argv[1:]
    if usage is not None and ("-h" in argv or "--help" in argv):
        try:
            print(usage(), flush=True)
        except BrokenPipeError:  # piped into head, which stopped reading: nothing left to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    try:
        main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# --key=value overrides, typed by the defaults.

def parse_value(key, text, default):
    kind = type(default)
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UsageError(f"--{key} takes True or False, not '{text}'")
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"--{key} takes a {kind.__name__}, not '{text}'") from None


def parse_overrides(defaults, argv, positional=None):
    """Applies ['--key=value' or '--key value', ...] to the dataclass instance `defaults`. Returns the new instance
    and the set of keys the command line gave. `positional` names the one field a bare argument sets (data.py's
    dataset name), if any."""
    fields = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
    changes = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") and positional:
            key, text = positional, arg
        elif arg.startswith("--") and "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif arg.startswith("--") and isinstance(fields.get(arg[2:]), bool):
            key, text = arg[2:], "True"  # a bare --flag switches a boolean on
        elif arg.startswith("--") and arg[2:] in fields and args:
            key, text = arg[2:], args.pop(0)
        elif arg.startswith("--") and arg[2:] not in fields:
            key, text = arg[2:], ""
        else:
            raise UsageError(f"cannot read argument '{arg}': use --key=value (--help lists the options)")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.75)
            hint = f"did you mean {' or '.join('--' + k for k in close)}?" if close else "--help lists the options"
            raise UsageError(f"unknown option --{key}; {hint}")
        changes[key] = parse_value(key, text, fields[key])
    return dataclasses.replace(defaults, **changes), set(changes)


def field_comments(cls):
    """From the source of dataclass `cls`: {field: its comment} and {field: the section comment above it}. A
    comment line whose text starts indented continues the comment of the field above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = {node.lineno: node.target.id for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    comments, sections, section, last = {}, {}, "", None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row = token.start[0]
        if row in lines:
            last = lines[row]
            sections.setdefault(last, section)
        if token.type != tokenize.COMMENT:
            continue
        text = token.string[1:]
        if row in lines:
            comments[last] = text.strip()
        elif text.startswith("  ") and last:  # a continuation
            comments[last] += " " + text.strip()
        else:
            section, last = text.strip(), None
    return comments, sections


def options_help(cls, doc, other_defaults=None):
    """--help: the CLI's docstring, then every field of `cls` as --name=default, its type and comment, grouped by
    the section comments; other_defaults ({label: {field: value}}) adds the defaults that apply elsewhere."""
    comments, sections = field_comments(cls)
    other_defaults = other_defaults or {}
    rows, section = [], None
    fields = dataclasses.fields(cls)
    width = max(len(f"--{f.name}={shown(f.default)}") for f in fields) + 2
    for f in fields:
        if sections.get(f.name) != section:
            section = sections.get(f.name)
            rows.append(f"\n{section}:" if section else "")
        others = [f"{label}: {values[f.name]}" for label, values in other_defaults.items() if f.name in values]
        text = comments.get(f.name, "") + (f" [{'; '.join(others)}]" if others else "")
        rows.append(textwrap.fill(text, 118, initial_indent=f"  {f'--{f.name}={shown(f.default)}':<{width}}"
                                  f"{type(f.default).__name__:<6}", subsequent_indent=" " * (width + 8)))
    return (doc or "").strip() + "\n\noptions (--key=value or --key value):\n" + "\n".join(rows)


def shown(value):
    """A default as it would be typed: quoted when empty or holding spaces or control characters."""
    if isinstance(value, str) and (not value or not value.isprintable() or " " in value):
        return json.dumps(value)
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# train.py's settings.

@dataclass
class Config:
    # run
    method: str = "smt"  # smt | bptt | tbptt | dmt
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
    # data (the fields of data.DataConfig: python data.py takes the same)
    url: str = ""  # fetch the source from here (tinystories, mnist: its folder URL; shakespeare, mnist5k: the file)
    tokenizer: str = "bytes"  # text datasets: bytes (vocab 256) | gpt2 (GPT-2 BPE via tiktoken, vocab 50257)
    max_bytes: int = 0  # tinystories: only the first N bytes of each file (0: all of it)
    task_len: int = 64  # probes (retrieval, copy, stack, keys_values, modular, parity): tokens per sequence
    num_symbols: int = 16  # probes: distinct content symbols (parity: always 2)
    image_size: int = 0  # mnist, mnist5k: side of the images, a divisor of 28 (0: 28); smaller: blocks averaged
    binarize: bool = False  # mnist, mnist5k: pixels as 0 or 1 (vocab 2), 1 where the pixel (after resizing) >= 128
    gap: int = 32  # longrange: bytes of filler between a fact and the place it is needed again
    min_gap: int = 0  # longrange: training episodes draw their gap from [min_gap, gap] (0: all at gap); scored at gap
    curriculum_gap: int = 0  # longrange: training gaps at most this for the first curriculum_share of the run, then
    #                          up to gap, past targets meanwhile gap - this bytes less far back (0: no curriculum); a
    #                          teacher learns to copy at short gaps first
    curriculum_share: float = 0.5  # share of the run (time_budget or max_iters, whichever ends it) before gaps widen
    curriculum_ramp: float = 0.0  # share of the run over which they then widen a byte at a time, from curriculum_gap
    #                               to gap (0: in one jump)
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
    lr: float = 3e-3  # AdamW's peak learning rate; on CPU 3e-3 beat 1e-3 for SMT and BPTT alike (docs/results.md)
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
    cell: str = "transformer"  # the RNN cell: transformer | mlp | gru | lstm | elman
    encoder: str = "causal"  # causal: all memories from one pass | window: the paper's one pass per memory
    readout: str = "decoder"  # decoder: the teacher decoder's next-token head | linear: on the flat memory
    # SMT
    context_len: int = 64  # Tc: window a teacher memory sees (causal encoder: per attention layer)
    future_len: int = 8  # Tf: tokens the decoder predicts from each memory
    positions: str = "8"  # transitions trained per sequence: all, or a number drawn at random (1 = the released
    #                       recipe); on a CPU 8 of 72: a step costs a quarter of all 72, and learns nearly as much
    #                       (docs/text-gap.md)
    dec_positions: int = 8  # of those, how many also get the decoder loss (the decoder costs Tf tokens each)
    coef_dec: float = 1.0  # weight of the decoder loss
    coef_dyn: float = 0.1  # weight of the dynamics loss
    coef_unif: float = 0.001  # weight of the uniformity loss
    gamma: float = 1.0  # discount of the decoder loss k steps ahead
    far_targets: int = 0  # far-future targets per memory: y_{t+r} from m_t at r in (future_len, far_horizon]; 0: off
    far_horizon: int = 64  # farthest offset r; SMT windows grow to context_len + far_horizon to hold the targets
    far_positions: int = 32  # memories per sequence that get far (and past) targets; each target costs a decoder token
    coef_far: float = 1.0  # weight of that far-future loss
    past_targets: int = 0  # past targets per memory: the s-th last byte read, y_{t-s} = x_{t-s+1}, from m_t at s in
    #                        [1, past_horizon]; 0: off. Makes memories carry what they read (docs/long-range.md);
    #                        in DMT on the RNN's steps from its own memories
    past_horizon: int = 32  # farthest s
    coef_past: float = 1.0  # weight of that past loss
    coef_recall: float = 0.0  # each memory names its last input (keeps memories Markov; see smt.recall_loss)
    dyn_weighting: str = "uniform"  # uniform | change: transitions weighted by how far the teacher memory moves
    memory_noise: float = 0.0  # std of Gaussian noise on the teacher memory the RNN steps from (robustness to drift)
    detach_target: bool = False  # True: the dynamics loss does not shape the encoder's target memory
    freeze: str = "none"  # none | teacher (train the RNN only) | rnn (train the teacher only)
    # BPTT
    seq_len: int = 64  # unroll length
    bptt_window: int = 16  # tbptt: gradient cut every this many steps
    # DMT
    dmt_steps: int = 64  # Td: steps the RNN runs on its own memories
    dmt_every: int = 1  # k: a dynamics target every k steps (paper: 16; every step did better on CPU, docs/results.md)
    dmt_coef_dyn: float = 10.0  # weight of the dynamics loss along the RNN's own run
    dmt_coef_unif: float = 0.01  # weight of the uniformity loss
    dmt_coef_readout: float = 1.0  # readout CE on the RNN's step from its own (detached) memory; 0 disables
    dmt_readout_grad: bool = True  # that CE also trains the RNN's step into the memory it reads (one step); off
    #                                 with --freeze=rnn. Same bits/byte on Shakespeare, more recall (docs/long-range.md)


# Defaults that replace Config's where they apply, unless the command line sets the key: on CUDA the paper's shapes,
# every transition trained; for DMT a short cosine schedule, at 2e-3 on CPU (3e-4 and 1e-3 did worse in a
# 120-second DMT, docs/text-gap.md) and the paper's 3e-5 on CUDA; for BPTT a cosine schedule; on a probe what let the
# RNN alone solve retrieval on a CPU (see probe_defaults).
CUDA_DEFAULTS = dict(max_iters=150000, time_budget=0.0, eval_interval=2000, batch_size=128, lr=3e-4, warmup_iters=1500,
                     d_model=256, n_heads=8, mem_tokens=16, encoder_depth=8, decoder_depth=4, rnn_depth=8,
                     context_len=256, future_len=64, positions="all", dec_positions=16, seq_len=256, dmt_steps=256)
DMT_DEFAULTS = dict(lr=2e-3, lr_schedule="cosine", max_iters=1500, warmup_iters=15)
CUDA_DMT_DEFAULTS = dict(lr=3e-5)  # on top of DMT_DEFAULTS
PROBE_DMT_DEFAULTS = dict(lr=3e-4)  # on a probe on a CPU: what the probes' results used
BPTT_DEFAULTS = dict(lr_schedule="cosine")  # the baseline's best: 2.36 bits/byte on Shakespeare in 10 CPU minutes,
#                                             2.43 with a constant lr (docs/text-gap.md)
ARCH_KEYS = ("d_model", "n_heads", "mem_tokens", "encoder_depth", "decoder_depth", "rnn_depth", "cell", "encoder",
             "readout", "context_len")
RNN_KEYS = ("rnn_depth", "cell", "readout")  # the RNN's own shape: a fresh RNN on a trained teacher may change it
METHODS = ("smt", "bptt", "tbptt", "dmt")


def known_settings(saved):
    """Of a checkpoint's plain config, the settings this Config has (a fork's or a newer version's extra keys
    dropped; keys it lacks keep their defaults where the caller builds a Config)."""
    fields = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in saved.items() if k in fields}


def probe_defaults(task_len):
    """On a probe a training sequence is one whole task, which the teacher sees and predicts entirely. The rest is
    what let the RNN alone solve retrieval on a CPU (docs/results.md): 4 decoder windows a sequence (each costs
    task_len tokens), memories that name their last input, the rare transitions that write weighted up, noisy teacher
    memories for the RNN's SMT step, DMT without the readout CE."""
    return dict(context_len=task_len, future_len=task_len, seq_len=task_len, dmt_steps=task_len - 1, positions="all",
                dec_positions=4, coef_recall=0.1, dyn_weighting="change", memory_noise=0.3, dmt_coef_readout=0.0)


def config_help(doc):
    """train.py --help: Config's options with their CUDA, DMT and probe defaults."""
    probe = f"probe (task_len {Config.task_len})"
    return options_help(Config, doc, {"cuda": CUDA_DEFAULTS, "dmt": DMT_DEFAULTS, "cuda dmt": CUDA_DMT_DEFAULTS,
                                      probe: probe_defaults(Config.task_len), "probe dmt": PROBE_DMT_DEFAULTS,
                                      "bptt": BPTT_DEFAULTS})


def load_config(argv):
    """Config from defaults, device- and method-specific defaults, then the command line (which wins). Returns the
    config and the keys the command line gave."""
    cfg, given = parse_overrides(Config(), argv)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = cfg.device.startswith("cuda")
    extra = dict(CUDA_DEFAULTS) if cuda else {}
    if cfg.method == "dmt":
        extra.update(DMT_DEFAULTS, **(CUDA_DMT_DEFAULTS if cuda else {}))
    if cfg.method in ("bptt", "tbptt"):
        extra.update(BPTT_DEFAULTS)
    if cfg.dataset in PROBES:
        extra.update(probe_defaults(cfg.task_len), **(PROBE_DMT_DEFAULTS if cfg.method == "dmt" and not cuda else {}))
    if cfg.freeze == "rnn":  # a frozen RNN takes no gradient from the readout
        extra["dmt_readout_grad"] = False
    cfg = dataclasses.replace(cfg, **{k: v for k, v in extra.items() if k not in given})
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if cuda else "float32"
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
    one_of("act_ckpt", ("none", "cell", "all"))
    for key in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "grad_accum", "d_model",
                "n_heads", "mem_tokens", "context_len", "future_len", "seq_len", "dec_positions", "far_positions",
                "past_horizon", "bptt_window", "dmt_every", "max_bad_steps"):
        if getattr(cfg, key) <= 0:
            raise UsageError(f"--{key} must be positive, not {getattr(cfg, key)}")
    for key in ("encoder_depth", "decoder_depth", "rnn_depth", "warmup_iters", "lr", "weight_decay", "grad_clip",
                "time_budget", "eval_seconds", "coef_dec", "coef_dyn", "coef_unif", "coef_recall",
                "gamma", "peak_flops", "far_targets", "coef_far", "past_targets", "coef_past"):
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
    if cfg.past_targets > cfg.past_horizon:
        raise UsageError(f"--past_targets={cfg.past_targets} offsets do not fit in [1, past_horizon] = "
                         f"[1, {cfg.past_horizon}]: raise --past_horizon or lower --past_targets")
    if cfg.curriculum_gap:
        if cfg.dataset not in TEXT_PROBES:
            raise UsageError(f"--curriculum_gap widens the gaps of --dataset=longrange, not of {cfg.dataset}")
        if not max(1, cfg.min_gap) <= cfg.curriculum_gap < cfg.gap:
            raise UsageError(f"--curriculum_gap={cfg.curriculum_gap} must be at least --min_gap (and 1) and below "
                             f"--gap={cfg.gap}: the gaps widen from it to --gap")
        if not 0 < cfg.curriculum_share < 1:
            raise UsageError(f"--curriculum_share must be in (0, 1), not {cfg.curriculum_share}")
        if not 0 <= cfg.curriculum_ramp <= 1 - cfg.curriculum_share:
            raise UsageError(f"--curriculum_ramp={cfg.curriculum_ramp} must be in [0, 1 - --curriculum_share]: the "
                             f"gaps must reach --gap={cfg.gap} by the end of the run")
    if cfg.dmt_steps < 2:
        raise UsageError(f"--dmt_steps must be at least 2, not {cfg.dmt_steps}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={cfg.device} but CUDA is not available here; use --device=cpu")
    if cfg.method == "dmt" and cfg.init_from == "scratch":
        raise UsageError("--method=dmt refines a trained SMT run: pass --init_from=<its out_dir>")
    if cfg.method in ("bptt", "tbptt") and cfg.init_from not in ("scratch", "resume"):
        raise UsageError(f"--method={cfg.method} has no teacher to take from --init_from={cfg.init_from}: pass "
                         "--init_from=scratch or resume")
    if cfg.dmt_readout_grad and cfg.freeze == "rnn":
        raise UsageError("--dmt_readout_grad=True trains the RNN's step, which --freeze=rnn holds fixed: "
                         "pass one of them")
    if cfg.overwrite and cfg.init_from == "resume":
        raise UsageError("--overwrite=True starts afresh; --init_from=resume continues the run: pass one of them")
