"""Long runs: atomic checkpoints, exact resume after kill -9 or a signal, refusal of unusable checkpoints, skipped
non-finite steps, one clear line for bad input in every CLI, and two processes through torchrun."""
import dataclasses
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import checkpoint
import smt
import train
from cli import UsageError
from data import DataError
from conftest import ROOT, tiny_model
from test_cli import TINY

ARGS = [*TINY, "--device=cpu", "--max_iters=40", "--eval_interval=10", "--log_interval=1", "--lr=3e-3"]


def launch(*args, cwd, launcher=("train.py",)):
    """Starts a CLI (by default train.py) without waiting for it. One thread each: the machine is shared."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    launcher = [str(ROOT / a) if a.endswith(".py") else a for a in launcher]
    return subprocess.Popen([sys.executable, *launcher, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process, code=0):
    out, err = process.communicate(timeout=300)
    assert process.returncode == code, err
    return out


def losses(stdout):
    """iter -> what the training log says about it, up to the learning rate (the rest is timing)."""
    return {int(m[1]): m[2] for m in re.finditer(r"^iter (\d+)/~?\d+ \| (.*?) \| lr", stdout, re.M)}


def evals(out_dir):
    return [json.loads(line)["iter"] for line in (out_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 40 iterations, a checkpoint every 10; the other tests copy or compare with it."""
    root = tmp_path_factory.mktemp("robust")
    text = root / "text.txt"
    text.write_text("".join(f"{i}: to be, or not to be, that is the question {i % 5}.\n" for i in range(600)))
    args = [f"--dataset={text}", f"--data_dir={root / 'data'}", *ARGS]
    out = finish(launch(*args, f"--out_dir={root / 'ref'}", cwd=root))
    return SimpleNamespace(root=root, args=args, out=root / "ref", losses=losses(out))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic({"iter": 1}, path)

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"iter": 2}, path)
    assert torch.load(path, weights_only=True) == {"iter": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_resume_after_kill_or_signal_matches_an_uninterrupted_run(reference, how):
    out = reference.root / how
    process = launch(*reference.args, f"--out_dir={out}", cwd=reference.root)
    for line in process.stdout:  # iter 13 comes after the first checkpoint (iter 10) is written
        if line.startswith("iter 13/"):
            break
    process.send_signal(getattr(signal, how))
    stdout = finish(process, dict(SIGKILL=-9, SIGTERM=143, SIGINT=130)[how])  # 128 + the signal's number
    ckpt_iter = torch.load(out / "ckpt.pt", weights_only=True)["iter"]
    if how == "SIGKILL":
        assert ckpt_iter in (10, 20, 30)
    else:  # a checkpoint right where it stopped
        assert f"stopped by {how} at iter {ckpt_iter}" in stdout and ckpt_iter < 40
    resumed = losses(finish(launch("--init_from=resume", f"--out_dir={out}", cwd=reference.root)))
    assert sorted(resumed) == list(range(ckpt_iter + 1, 41))
    assert resumed == {i: v for i, v in reference.losses.items() if i > ckpt_iter}  # the run went on exactly
    assert evals(out) == evals(reference.out) == [10, 20, 30, 40]


@pytest.mark.parametrize("spent, args, message", [
    ("iterations", [], "has done its 40 iterations (--max_iters=40): raise --max_iters to train on"),
    ("time", ["--max_iters=100"], "has trained 700s of its --time_budget=600: raise --time_budget (total seconds"),
])
def test_resuming_a_spent_run_says_so_and_changes_nothing(reference, tmp_path, spent, args, message):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ckpt.pt", "rnn.pt", "log.jsonl"):
        (out / name).write_bytes((reference.out / name).read_bytes())
    if spent == "time":  # as if its 40 iterations had taken 700 of its 600 seconds
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        torch.save({**ckpt, "elapsed": 700.0}, out / "ckpt.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    process = launch("--init_from=resume", f"--out_dir={out}", *args, cwd=tmp_path)
    stderr = process.communicate(timeout=300)[1]
    lines = stderr.strip().splitlines()
    assert process.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {out} {message}"), stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def damage(out, case):
    ckpt = out / "ckpt.pt"
    if case == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif case == "corrupted":
        ckpt.write_bytes(b"\x13\x37" * 64 + ckpt.read_bytes()[128:])
    elif case == "not a checkpoint":
        torch.save(torch.zeros(3), ckpt)
    elif case == "rnn.pt only":
        ckpt.write_bytes((out / "rnn.pt").read_bytes())


@pytest.mark.parametrize("case, args, message", [
    ("architecture", ["--d_model=32"], "--d_model=32 differs from the checkpoint's 16"),
    ("method", ["--method=bptt"], "ckpt.pt is a smt run, not bptt"),
    ("truncated", [], "cannot read checkpoint"),
    ("corrupted", [], "cannot read checkpoint"),
    ("not a checkpoint", [], "is not a checkpoint this can use"),
    ("rnn.pt only", [], "is not a checkpoint this can use: it needs config, model, meta, optimizer"),
])
def test_unusable_checkpoints_are_refused_and_left_alone(reference, tmp_path, case, args, message):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ckpt.pt", "rnn.pt", "log.jsonl"):
        (out / name).write_bytes((reference.out / name).read_bytes())
    damage(out, case)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    process = launch("--init_from=resume", f"--out_dir={out}", *args, cwd=tmp_path)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 2 and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten


def test_checkpoints_of_compiled_models_load_into_plain_ones_and_back(tmp_path):
    compiled = tiny_model()
    for part in (compiled.encoder, compiled.decoder, compiled.cell):  # as train.py does on CUDA: in place
        part.compile()
    plain = tiny_model(seed=1)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # so either loads the other's checkpoint
    wrapped = torch.compile(tiny_model(seed=2))  # a wrapper instead prefixes every key with _orig_mod.
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    checkpoint.save_atomic(dict(config={}, model=wrapped.state_dict(), meta={}), tmp_path / "ckpt.pt")
    weights = checkpoint.load_checkpoint(tmp_path / "ckpt.pt", "")["model"]
    plain.load_state_dict(weights)
    compiled.load_state_dict(weights)
    for a, b, c in zip(wrapped.state_dict().values(), plain.state_dict().values(), compiled.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("bad_calls, finishes", [({7, 8}, True), (set(range(8, 100)), False)])
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, text_file, monkeypatch, capsys,
                                                                 bad_calls, finishes):
    real, calls = smt.METHODS["smt"].loss, []

    def poisoned(model, x, y, cfg):  # a NaN loss (and so NaN gradients) at the chosen training steps
        calls.append(x)
        loss, stats = real(model, x, y, cfg)
        return (loss * math.nan if len(calls) in bad_calls else loss), stats
    monkeypatch.setitem(smt.METHODS, "smt", dataclasses.replace(smt.METHODS["smt"], loss=poisoned))
    out = tmp_path / "out"
    args = [f"--dataset={text_file}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}", *TINY, "--device=cpu",
            "--max_iters=15", "--eval_interval=5", "--max_bad_steps=3"]
    if finishes:
        train.main(args)
        assert "skipped 2 (non-finite)" in capsys.readouterr().out
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [(r["iter"], r["skipped"]) for r in records] == [(5, 0), (10, 2), (15, 2)]
    else:
        with pytest.raises(UsageError, match="stopped at iter 10: 3 steps in a row had a non-finite loss"):
            train.main(args)
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert ckpt["iter"] == 5  # the last good one, not overwritten by the bad steps
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# Bad input, every CLI. OUT is a trained run, DAMAGED one whose rnn.pt is cut short; TEXT, EMPTY, BINARY are files.
BAD_INPUT = [
    ("train", ["--batch_size=-4"], "--batch_size must be positive, not -4"),
    ("train", ["--max_bad_steps=0"], "--max_bad_steps must be positive"),
    ("train", ["--grad_clip=-1"], "--grad_clip must not be negative"),
    ("train", ["--n_heads=3"], "must divide --d_model"),
    ("train", ["--method=bptt", "--seq_len=100000"], "fewer than the"),
    ("train", ["--future_len=100000"], "fewer than the"),
    ("train", ["--method=dmt", "--init_from=nowhere"], "no ckpt.pt in nowhere"),
    ("train", ["--init_from=resume", "--out_dir=DAMAGED"], "cannot read checkpoint"),
    ("train", ["--lr=1e30", "--max_bad_steps=2"], "steps in a row had a non-finite loss or gradient"),
    ("sample", ["--no_such_key=1"], "unknown option --no_such_key"),
    ("sample", ["--num_tokens=many"], "--num_tokens takes a int"),
    ("sample", ["--num_tokens=-5"], "--num_tokens must be positive, not -5"),
    ("sample", ["--num_samples=0"], "--num_samples must be positive, not 0"),
    ("sample", ["--temperature=0"], "--temperature must be positive, not 0.0"),
    ("sample", ["--top_k=-1"], "--top_k must be 0 (all tokens) or positive, not -1"),
    ("sample", ["--prime=oracle"], "--prime must be rnn or teacher"),
    ("sample", ["--out_dir=nowhere"], "no rnn.pt in nowhere"),
    ("sample", ["--out_dir=DAMAGED"], "cannot read checkpoint"),
    ("sample", ["--prompt=FILE:missing.txt"], "no prompt file missing.txt"),
    ("sample", ["--prompt=FILE:BINARY"], "does not look like text"),
    ("sample", ["--prompt=FILE:EMPTY"], "is empty"),
    ("sample", ["--prime=teacher", "--prompt=" + "x" * 17], "--prime=teacher reads at most context_len=16 tokens"),
    ("prepare", ["--no_such_key=1"], "unknown option --no_such_key"),
    ("prepare", ["--data_dir"], "cannot read argument '--data_dir'"),
    ("prepare", ["missing.txt"], "unknown dataset 'missing.txt'"),
    ("prepare", ["EMPTY"], "is empty"),
    ("prepare", ["BINARY"], "does not look like text"),
]


@pytest.mark.parametrize("cli, args, message", BAD_INPUT)
def test_bad_input_gives_one_clear_line_in_every_cli(reference, tmp_path, monkeypatch, cli, args, message):
    """In-process for speed: a UsageError is what run_cli turns into one line on stderr and exit code 2 (which the
    last test checks for each CLI)."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("ckpt.pt", "rnn.pt"):
        (damaged / name).write_bytes((reference.out / name).read_bytes()[:1000])
    (tmp_path / "EMPTY").write_bytes(b"")
    (tmp_path / "BINARY").write_bytes(bytes(range(256)) * 4)
    paths = dict(OUT=reference.out, DAMAGED=damaged, EMPTY=tmp_path / "EMPTY", BINARY=tmp_path / "BINARY")
    args = [re.sub("|".join(paths), lambda m: str(paths[m[0]]), a) for a in args]
    data_dir = f"--data_dir={tmp_path / 'data'}"
    common = dict(train=[f"--dataset={reference.root / 'text.txt'}", data_dir, f"--out_dir={tmp_path / 'out'}", *TINY,
                         "--device=cpu", "--max_iters=5"],
                  sample=[f"--out_dir={reference.out}", "--num_tokens=5", "--device=cpu"], prepare=[data_dir])[cli]
    monkeypatch.chdir(tmp_path)  # relative paths (nowhere, missing.txt) stay relative in the messages
    with pytest.raises((UsageError, DataError)) as error:
        importlib.import_module(cli).main([*common, *args])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("cli", ["train.py", "sample.py", "prepare.py"])
def test_cli_turns_bad_input_into_one_line_and_exit_code_2(tmp_path, cli):
    process = launch("--no_such_key=1", cwd=tmp_path, launcher=(cli,))
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 2 and stderr.startswith("error: unknown option --no_such_key") and \
        len(stderr.strip().splitlines()) == 1, stderr


SPY = """import os, sys
sys.path.insert(0, {root!r})
import dataclasses, torch, smt, train
real, seen = smt.METHODS["smt"].loss, {{}}
def spy(model, x, y, cfg):
    seen.setdefault("model", model)
    seen.setdefault("batch", x.clone())
    return real(model, x, y, cfg)
smt.METHODS["smt"] = dataclasses.replace(smt.METHODS["smt"], loss=spy)
train.main(sys.argv[1:])
torch.save(dict(model=seen["model"].state_dict(), batch=seen["batch"]), {out!r} + f"/rank{{os.environ['RANK']}}.pt")
"""


def test_torchrun_two_cpu_processes(tmp_path, text_file):
    """Data parallel with gloo: every rank draws its own batches, ends with the same weights; rank 0 alone logs and
    checkpoints; the run resumes. readout=linear leaves parameters without gradients, which must not matter."""
    spy = tmp_path / "spy.py"  # train.py, plus each rank's final weights and first batch saved for this test
    spy.write_text(SPY.format(root=str(ROOT), out=str(tmp_path)))
    out = tmp_path / "out"
    args = [f"--dataset={text_file}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}", *TINY, "--device=cpu",
            "--eval_interval=10", "--lr=3e-3", "--grad_accum=2", "--readout=linear"]
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(spy))
    stdout = finish(launch(*args, "--max_iters=20", cwd=tmp_path, launcher=torchrun))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["batch"], ranks[1]["batch"])
    for a, b in zip(ranks[0]["model"].values(), ranks[1]["model"].values()):
        assert torch.equal(a, b)
    logged = losses(stdout)
    assert sorted(logged) == [5, 10, 15, 20]  # printed once, by rank 0
    first, last = (float(logged[i].split()[1]) for i in (5, 20))
    assert last < first
    assert evals(out) == [10, 20]
    assert len(torch.load(out / "ckpt.pt", weights_only=True)["rng"]) == 2  # each rank's random state
    stdout = finish(launch(*args, "--init_from=resume", "--max_iters=30", cwd=tmp_path, launcher=torchrun))
    assert sorted(losses(stdout)) == [25, 30] and evals(out) == [10, 20, 30]
