"""bench.py end to end at tiny sizes: the fields of every suite's JSON lines, the PNG, and answers to bad input.
Timings are noisy on a shared machine, so only structural facts are checked."""
import json
import math

import pytest

import bench
from conftest import run
from data import UsageError


def records(tmp_path, *args):
    result = run("bench.py", "--json", "--quick", "--repeats=1", "--threads=1", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_scaling(tmp_path):
    out = records(tmp_path, "--suite=scaling", "--lengths=16,32", "--tokens=64")
    steps = [r for r in out if "step_s" in r]
    assert {(r["method"], r["seq_len"]) for r in steps} == {(m, L) for m in ("smt", "bptt") for L in (16, 32)}
    for r in steps:
        assert r["suite"] == "scaling" and r["step_s"] > 0 and r["tokens_per_batch"] == 64
        assert r["batch_size"] * r["seq_len"] == 64
    ratios = {r["method"]: r for r in out if "ratio" in r}
    assert set(ratios) == {"smt", "bptt"} and ratios["smt"]["long_len"] == 32 and ratios["smt"]["short_len"] == 16
    assert ratios["smt"]["ratio"] > 0 and isinstance(ratios["smt"]["met"], bool)


def test_throughput(tmp_path):
    out = records(tmp_path, "--suite=throughput", "--batch_size=1", "--lengths=16")
    rates = {r["method"]: r for r in out if "transitions_per_s" in r}
    assert set(rates) == {"smt_pos1_window", "smt_all_causal", "bptt", "tbptt"}
    for r in rates.values():
        assert r["seq_len"] == 32 and r["tokens_per_s"] > 0 and r["transitions_per_s"] > 0
    # one transition per sequence for the released recipe, every position for the others
    assert rates["smt_pos1_window"]["transitions_per_s"] == pytest.approx(rates["smt_pos1_window"]["tokens_per_s"] / 32)
    assert rates["smt_all_causal"]["transitions_per_s"] == pytest.approx(rates["smt_all_causal"]["tokens_per_s"])
    (ratio,) = [r for r in out if "ratio" in r]
    expected = rates["smt_all_causal"]["transitions_per_s"] / rates["smt_pos1_window"]["transitions_per_s"]
    assert ratio["ratio"] == pytest.approx(expected) and ratio["target"] == 10


def test_inference(tmp_path):
    out = records(tmp_path, "--suite=inference", "--lengths=8,16,32")
    by = {(r["method"], r["tokens"]): r for r in out}
    assert set(by) == {(m, n) for m in ("rnn", "teacher") for n in (8, 16, 32)}
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in out)
    rnn = [by["rnn", n]["state_bytes"] for n in (8, 16, 32)]
    teacher = [by["teacher", n]["state_bytes"] for n in (8, 16, 32)]
    assert rnn[0] == rnn[1] == rnn[2] == 4 * 64 * 4  # the RNN's memory: K x d float32, whatever the length
    assert teacher[0] < teacher[1] < teacher[2]  # the teacher's grows with its context


def test_gradients(tmp_path):
    out = records(tmp_path, "--suite=gradients", "--lengths=12", f"--out={tmp_path / 'plots'}")
    norms = {m: {r["distance"]: r["grad_norm"] for r in out if r.get("method") == m} for m in ("bptt", "smt")}
    for values in norms.values():
        assert sorted(values) == list(range(1, 13))  # every distance listed
        assert all(math.isfinite(v) and v >= 0 for v in values.values())
    assert all(v > 0 for v in norms["bptt"].values())  # every input reaches the loss through the unroll
    (png,) = [r["png"] for r in out if "png" in r]
    data = (tmp_path / "plots" / "gradients.png").read_bytes()
    assert png.endswith("gradients.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"


def test_table_output(tmp_path, capsys):
    bench.main(["--suite=gradients", "--lengths=8", f"--out={tmp_path}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("suite=gradients  method=bptt  distance=1  grad_norm=")
    assert [line.split()[2] for line in lines[:-1:2]] == ["distance=1", "distance=2", "distance=4", "distance=8"]


@pytest.mark.parametrize("args, message", [
    (["--suite=nope"], "--suite must be one of"),
    (["--suite=scaling", "--colour=red"], "unknown option --colour"),
])
def test_bad_input_cli(tmp_path, args, message):
    result = run("bench.py", *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--suite=scaling", "--lengths=64,abc"], "--lengths takes comma-separated"),
    (["--suite=scaling", "--lengths=128,64"], "--lengths must be increasing"),
    (["--suite=gradients", "--lengths=16,32"], "takes one length"),
    (["--suite=throughput", "--lengths=16,32"], "takes one length"),
    (["--suite=throughput", "--repeats=-1"], "--repeats must not be negative"),
])
def test_bad_input(args, message):
    with pytest.raises(UsageError, match=message):  # run_cli turns it into one line and exit 2, as above
        bench.main(args)
