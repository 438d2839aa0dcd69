"""A trained long-range run scored without training: a research diagnostic, off the main path.

    python dev/recall.py --run=out/lr --lengths=16,32

At each gap of --lengths, on --episodes held-out episodes: the share of answer bytes, of whole answers and of answer
bytes of each kind of fact that the RNN alone (from its empty memory) and its teacher (from its own memories) name.
Then, at the run's own gap, for runs with a teacher: with past targets, how many bytes back the memories (the
teacher's and the RNN's own) still name what they read (memory_record); and where the RNN's memories part from the
teacher's, direction by direction (direction_record). One JSON object per line. The record means something after
SMT; DMT retrains the readout, which is the decoder's head, on next bytes only.
"""
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules, from the repository root

import torch  # noqa: E402

import smt  # noqa: E402
from bench import accuracy_by_kind, load_run  # noqa: E402
from cli import UsageError, options_help, parse_overrides, run_cli  # noqa: E402
from data import TextProbe  # noqa: E402

BYTES_BACK = (1, 4, 8, 16, 24, 32, 40, 48)  # the distances of memory_record, asked together (the queries see one
#                                              another, so each answer depends a little on the set)


@dataclass
class RecallConfig:
    run: str = ""  # the out_dir of a finished long-range train.py run
    lengths: str = "16,32"  # the gaps to score it at, comma-separated
    episodes: int = 512  # held-out episodes at each gap, drawn with --seed (the same episodes for every run)
    seed: int = 1337  # which episodes (train.py evaluates those of its own --seed)


def load(cfg):
    """The run named by cfg.run: (its Config, its model in eval mode), checked to be a long-range run."""
    if not cfg.run:
        raise UsageError("--run is missing: give the out_dir of a finished train.py run")
    run, model = load_run(Path(cfg.run), "give the out_dir of a finished train.py run")
    if run.dataset != "longrange":
        raise UsageError(f"dev/recall.py scores long-range runs, and {cfg.run} trained on {run.dataset}")
    return run, model.eval()


def episodes(run, gap, count, seed):
    """Held-out long-range episodes at `gap` (x, y), the same for every run given the same seed."""
    probe = TextProbe(dataclasses.replace(run, gap=gap, min_gap=0), count)
    return probe.get("val", generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def answer_logits(model, x):
    """{"rnn": its readout at every byte of x, from m_empty; "teacher": its readout of its own memories} (B, L, V)."""
    logits = {"rnn": smt.rnn_logits(model, x)}
    if model.encoder is not None:
        memories = model.memories(x, torch.arange(x.size(1)))
        logits["teacher"] = model.readout(memories.flatten(0, 1)).view(*x.shape, -1)
    return logits


def scores(logits, x, y):
    """acc per answer byte, whole_acc per answer, and per answer byte on the episodes of each kind of fact (told by
    their first byte: k for keys, I for names, else brackets): key_acc, name_acc, bracket_acc."""
    return dict(acc=smt.accuracy(logits, y, whole=False), whole_acc=smt.accuracy(logits, y, whole=True),
                **accuracy_by_kind(logits, x, y))


@torch.no_grad()
def memory_record(model, x, distances):
    """{"teacher", "rnn": {s: the share of positions t (t >= s - 1) whose memory m_t, asked by the decoder for the
    byte s back (Decoder.at_offsets at offset -s: y_{t-s} = x_{t-s+1}), names it}}."""
    B, L = x.shape
    offsets = -torch.tensor(distances)
    memories = dict(teacher=model.memories(x, torch.arange(L)),
                    rnn=torch.stack([m for _, m in smt.rollout(model, model.empty(B), x)], dim=1))
    record = {}
    for name, m in memories.items():
        named = model.decoder.at_offsets(m.flatten(0, 1), offsets).argmax(-1).view(B, L, -1)
        record[name] = {}
        for i, s in enumerate(distances):  # named[:, t, i] against x[:, t - s + 1]
            record[name][s] = (named[:, s - 1:, i] == x[:, : L - s + 1]).float().mean().item()
    return record


@torch.no_grad()
def direction_record(model, x, y):
    """Where the RNN's memories part from its teacher's, in the principal directions of the teacher's memories (over
    every position of x): for the leading eighth of the directions, the next three eighths, the last half, and all,
    {"0-32": {variance: the share of the variance they hold; rollout_error and step_error: the RNN's error in them,
    as a share of that variance, along its own run from m_empty and one step from the teacher's previous memory;
    patched_acc: the share of answer bytes the readout names from the RNN's own memories with their coordinates in
    those directions replaced by the teacher's}}. With all of them replaced the memories are the teacher's."""
    B, L = x.shape
    teacher = model.memories(x, torch.arange(-1, L))  # m_empty, m_0 .. m_{L-1}
    own = torch.stack([m for _, m in smt.rollout(model, model.empty(B), x)], dim=1)
    one_step = model.step(teacher[:, :-1].flatten(0, 1), x.reshape(-1)).view_as(own)
    t, r, s = (m.flatten(2).float() for m in (teacher[:, 1:], own, one_step))
    Z = t.size(-1)
    var, basis = torch.linalg.eigh(torch.cov(t.reshape(-1, Z).T))
    var, basis = var.clamp(min=0).flip(0), basis.flip(1)  # the leading directions first
    record = {}
    for a, b in ((0, Z // 8), (Z // 8, Z // 2), (Z // 2, Z), (0, Z)):
        band = basis[:, a:b]
        error = lambda m: ((((m - t) @ band) ** 2).mean(dim=(0, 1)).sum() / var[a:b].sum().clamp(min=1e-12)).item()
        patched = r + ((t - r) @ band) @ band.T
        logits = model.readout(patched.view_as(own).flatten(0, 1)).view(B, L, -1)
        record[f"{a}-{b}"] = dict(variance=(var[a:b].sum() / var.sum()).item(), rollout_error=error(r),
                                  step_error=error(s), patched_acc=smt.accuracy(logits, y, whole=False))
    return record


def recall(cfg, gaps):
    """The records: one per gap and kind of memory, then the run's memory_record and direction_record."""
    run, model = load(cfg)
    for gap in gaps:
        x, y = episodes(run, gap, cfg.episodes, cfg.seed)
        for memories, logits in answer_logits(model, x).items():
            yield dict(gap=gap, memories=memories, **scores(logits, x, y), episodes=cfg.episodes)
    if model.encoder is None:
        return
    x, y = episodes(run, run.gap, cfg.episodes, cfg.seed)
    if run.past_targets:
        for memories, named in memory_record(model, x, [s for s in BYTES_BACK if s < x.size(1)]).items():
            yield dict(gap=run.gap, memories=memories, **{f"back_{s}": v for s, v in named.items()})
    for band, record in direction_record(model, x, y).items():
        yield dict(gap=run.gap, directions=band, **record)


def main(argv):
    cfg, _ = parse_overrides(RecallConfig(), argv)
    try:
        gaps = [int(s) for s in cfg.lengths.split(",")]
    except ValueError:
        raise UsageError(f"--lengths takes comma-separated gaps, not '{cfg.lengths}'") from None
    if min(gaps) < 1 or cfg.episodes < 1:
        raise UsageError(f"--lengths and --episodes must be positive, not '{cfg.lengths}' and {cfg.episodes}")
    for record in recall(cfg, gaps):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    run_cli(main, lambda: options_help(RecallConfig, __doc__))
