"""bench.py end to end at tiny sizes: the fields of every suite's JSON lines, the PNG, and answers to bad input.
Timings are noisy on a shared machine, so only structural facts are checked."""
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import data
from conftest import run, tiny_model
from cli import UsageError
from config import Config
from test_data import idx_images, server  # noqa: F401  (a fixture)


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
    step_s = {(r["method"], r["seq_len"]): r["step_s"] for r in steps}
    for method, r in ratios.items():  # the ratio of the step times printed, long over short
        assert r["ratio"] == pytest.approx(step_s[method, 32] / step_s[method, 16], rel=1e-9)
    # the paper's claim, SMT's step at the longest length at most 1.5x the shortest's: said for SMT alone
    assert ratios["smt"]["paper_max_ratio"] == 1.5 and ratios["smt"]["meets_paper"] == (ratios["smt"]["ratio"] <= 1.5)
    assert "paper_max_ratio" not in ratios["bptt"] and "meets_paper" not in ratios["bptt"]


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
    assert ratio["ratio"] == pytest.approx(expected) and ratio["paper_min_ratio"] == 10
    assert ratio["meets_paper"] == (ratio["ratio"] >= 10)


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
    (reach,) = [r for r in out if "smt_reach" in r]  # train.py's CPU defaults: context 64, 2 encoder layers
    assert reach["smt_reach"] == 2 + 3 * 63 and (reach["context_len"], reach["encoder_depth"]) == (64, 2)
    for values in norms.values():
        assert sorted(values) == list(range(1, 13))  # every distance listed, all within SMT's reach at T = 12
        assert all(math.isfinite(v) and v > 0 for v in values.values())
    (png,) = [r["png"] for r in out if "png" in r]
    data = (tmp_path / "plots" / "gradients.png").read_bytes()
    assert png.endswith("gradients.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"


def test_smt_gradient_stops_at_its_reach_and_bptt_does_not():
    """One RNN step from the teacher's m_{T-2}: d = 1 through the step's input; then m_{T-2}, which a 1-layer causal
    encoder with context 4 computes from x_{T-2-3} .. x_{T-2} in its layer and 3 more back in its registers' read:
    x_{T-8} at the farthest, d = 8. Beyond it SMT's gradient is exactly 0; BPTT's, through the unroll, is not."""
    model = tiny_model(context_len=4)  # encoder_depth 1
    assert bench.smt_reach(Config(context_len=4, encoder_depth=1)) == 8
    x = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(1))
    norms = bench.gradient_norms(model, x, y)
    assert len(norms["smt"]) == len(norms["bptt"]) == 12
    assert all(v > 0 for v in norms["smt"][:8]) and all(v == 0 for v in norms["smt"][8:])
    assert all(v > 0 for v in norms["bptt"])
    model.encoder.context_len = 6  # a longer context reaches further: 2 + 2 * 5 = 12, every input
    assert all(v > 0 for v in bench.gradient_norms(model, x, y)["smt"])


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def lanes_raced(out, suite, key, lanes=("smt+dmt", "bptt")):
    """The records of a race: SMT then DMT in one lane, BPTT in another (and the torch lane), each with a score and
    iterations."""
    scores = {r["method"]: r for r in out if key in r}
    assert set(scores) == set(lanes)
    for r in scores.values():
        assert r["suite"] == suite and r["iters"] > 0 and r["seconds"] > 0 and math.isfinite(r[key])
    return scores


def test_probes_race_smt_then_dmt_against_bptt(tmp_path):
    """SMT then DMT train once on short tasks and are scored at every length; BPTT trains at each length, and its
    run at the training length is scored at every length too."""
    out = records(tmp_path, "--suite=probes", "--tasks=retrieval", "--lengths=16,24", "--train_len=16",
                  "--budget=5", "--out=runs", "--lanes=smt,bptt")
    trained = {(r["method"], r["task_len"], r["trained_len"]): r for r in out if "rnn_acc" in r}
    assert set(trained) == {("smt+dmt", 16, 16), ("smt+dmt", 24, 16), ("bptt", 16, 16), ("bptt", 24, 16),
                            ("bptt", 24, 24)}
    runs = tmp_path / "runs"
    assert trained["bptt", 24, 16]["rnn_acc"] == bench.score_at_length(runs / "retrieval-16-bptt", 24)["rnn_acc"]
    scores = {(method, L): r for (method, L, length), r in trained.items() if method == "smt+dmt" or L == length}
    assert not (runs / "retrieval-24-smt").exists()  # one SMT run, at the training length
    for (method, L), r in scores.items():
        assert r["suite"] == "probes" and r["task"] == "retrieval" and 0 <= r["rnn_acc"] <= 1 and r["iters"] > 0
        assert ("teacher_acc" in r) == (method == "smt+dmt") and r["seconds"] > 0
    for method, run in (("smt+dmt", "retrieval-16-dmt"), ("bptt", "retrieval-16-bptt")):  # as train.py scored it
        last = json.loads((runs / run / "log.jsonl").read_text().splitlines()[-1])
        assert scores[method, 16]["rnn_acc"] == last["val_rnn_acc"] == scores[method, 16]["curve"][-1][1]
        assert bench.score_at_length(runs / run, 16) == {k[4:]: v for k, v in last.items() if k.startswith("val_")}
    dmt = [json.loads(line) for line in (runs / "retrieval-16-dmt" / "log.jsonl").read_text().splitlines()]
    assert dmt[0]["iter"] == 0 and dmt[-1]["iter"] > 0  # DMT went on from the SMT run's RNN
    smt_last = json.loads((runs / "retrieval-16-smt" / "log.jsonl").read_text().splitlines()[-1])
    assert scores["smt+dmt", 24]["seconds"] == pytest.approx(smt_last["elapsed"] + dmt[-1]["elapsed"], abs=0.01)
    assert scores["smt+dmt", 24]["iters"] == smt_last["iter"] + dmt[-1]["iter"]
    assert png_size(runs / "probe-retrieval.png") == (720, 420)
    ckpt = torch.load(runs / "retrieval-16-dmt" / "ckpt.pt", weights_only=True)
    ckpt["config"]["knob_of_a_fork"] = 1  # a run saved by a fork with settings of its own is still scored
    (runs / "fork").mkdir()
    torch.save(ckpt, runs / "fork" / "ckpt.pt")
    assert bench.score_at_length(runs / "fork", 16) == bench.score_at_length(runs / "retrieval-16-dmt", 16)


def test_text_race(tmp_path, text_file):
    """All three lanes, two at a time: SMT then DMT, BPTT of the same cell, torch's nn.GRU by BPTT (its settings as
    bench.TORCH_RNN says)."""
    out = records(tmp_path, "--suite=text", f"--dataset={text_file}", "--budget=6", "--out=runs")
    scores = lanes_raced(out, "text", "rnn_bpb", ("smt+dmt", "bptt", "nn.gru"))
    runs = tmp_path / "runs"
    for method, run_dir in (("bptt", "text-bptt"), ("smt+dmt", "text-dmt"), ("nn.gru", "text-torch")):
        last = json.loads((runs / run_dir / "log.jsonl").read_text().splitlines()[-1])
        assert scores[method]["rnn_bpb"] == last["val_rnn_bpb"]
    # tokens seen: batch 32 of train.py's CPU defaults; BPTT reads 64 tokens a sequence, SMT and DMT 64 + 8
    assert scores["bptt"]["tokens"] == scores["bptt"]["iters"] * 32 * 64
    assert scores["smt+dmt"]["tokens"] == scores["smt+dmt"]["iters"] * 32 * 72
    assert scores["nn.gru"]["tokens"] == scores["nn.gru"]["iters"] * 32 * 128
    config = torch.load(runs / "text-torch" / "ckpt.pt", weights_only=True)["config"]
    assert (config["method"], config["cell"], config["readout"], config["mem_tokens"], config["lr"]) == \
        ("bptt", "nn_gru", "linear", 4, 3e-3)
    assert {Path(r["png"]).name for r in out if "png" in r} == {"text.png", "text-tokens.png"}
    for name in ("text.png", "text-tokens.png"):
        assert png_size(runs / name) == (720, 420)
        assert drawn_colors(runs / name) == {"blue", "red", "green"}  # one curve per lane


def test_the_torch_lane_is_named_by_its_cell():
    lane = bench.Lane("torch", "text", [], {})
    assert bench.lane_label(bench.BenchConfig(), lane) == "nn.gru"
    assert bench.lane_label(bench.BenchConfig(torch_args="--cell=nn_lstm --mem_tokens=8"), lane) == "nn.lstm"
    assert bench.lane_label(bench.BenchConfig(dmt_share=0), bench.Lane("smt", "text", [], {})) == "smt"


def drawn_colors(path):
    """Which of the lanes' colors (bench.COLORS) a plot has pixels of."""
    pixels = np.round(pytest.importorskip("matplotlib.image").imread(path)[..., :3] * 255)
    return {name for name, rgb in (("blue", bench.BLUE), ("red", bench.RED), ("green", bench.GREEN))
            if (np.abs(pixels - rgb).max(axis=-1) < 8).sum() > 50}


def test_longrange_race_scores_each_kind_of_fact(tmp_path):
    """SMT then DMT against BPTT on the long-range probe at one gap: BPTT unrolls over gap + 32 bytes, SMT's past
    targets reach gap + 16 bytes back, both train on mixed gaps; each lane's scores are its last evaluation's and its
    final RNN's per kind of fact."""
    out = records(tmp_path, "--suite=longrange", "--lengths=8", "--budget=6", "--out=runs", "--lanes=smt,bptt")
    scores = lanes_raced(out, "longrange", "rnn_acc")
    runs = tmp_path / "runs"
    for method, run_dir in (("bptt", "longrange-8-bptt"), ("smt+dmt", "longrange-8-dmt")):
        last = json.loads((runs / run_dir / "log.jsonl").read_text().splitlines()[-1])
        assert scores[method]["rnn_acc"] == last["val_rnn_acc"] and scores[method]["gap"] == 8
        assert all(0 <= scores[method][f"{k}_acc"] <= 1 for k in ("key", "name", "bracket"))
    config = torch.load(runs / "longrange-8-bptt" / "ckpt.pt", weights_only=True)["config"]
    assert (config["seq_len"], config["min_gap"], config["batch_size"]) == (40, 1, 8)
    config = torch.load(runs / "longrange-8-smt" / "ckpt.pt", weights_only=True)["config"]
    assert (config["past_targets"], config["past_horizon"], config["min_gap"]) == (16, 24, 1)


def test_longrange_scores_each_kind_on_its_own_answers():
    x, y = data.TextProbe(data.DataConfig(dataset="longrange", gap=8), 300).get("val")
    text = [bytes(row).decode() for row in x.tolist()]
    keys = torch.tensor([t.startswith("key=") for t in text])
    names = torch.tensor([t.startswith("I am ") for t in text])
    right = torch.where(keys[:, None], y.clamp(min=0), (y.clamp(min=0) + 1) % 256)  # right on key episodes only
    logits = torch.nn.functional.one_hot(right, 256).float()
    assert bench.accuracy_by_kind(logits, x, y) == dict(key_acc=1.0, name_acc=0.0, bracket_acc=0.0)
    half = names[:, None] & (torch.arange(x.size(1)) % 2 == 0)  # names: right on even positions only
    logits = torch.nn.functional.one_hot(torch.where(half, y.clamp(min=0), (y.clamp(min=0) + 1) % 256), 256).float()
    scores = bench.accuracy_by_kind(logits, x, y)
    assert 0.3 < scores["name_acc"] < 0.7 and scores["key_acc"] == scores["bracket_acc"] == 0.0


def test_without_matplotlib_the_suites_still_run(tmp_path):
    """A matplotlib that cannot be imported (first on the path): one line says so, the numbers still come."""
    (tmp_path / "fake" / "matplotlib").mkdir(parents=True)
    (tmp_path / "fake" / "matplotlib" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(Path(bench.__file__)), "--suite=gradients", "--lengths=8", "--json",
                             f"--out={tmp_path / 'plots'}"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert len([r for r in out if "grad_norm" in r]) == 2 * 8 and not any("png" in r for r in out)
    assert result.stderr.count('pip install -e ".[plot]"') == 1 and not (tmp_path / "plots" / "gradients.png").exists()


def test_race_on_cuda_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the race would run")
    result = run("bench.py", "--suite=text", "--device=cuda", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert "CUDA is not available" in result.stderr


def test_images_race_draws_and_completes_digits(tmp_path, server):
    rng = np.random.default_rng(0)
    digits = np.zeros((12, 28, 28), np.uint8)
    for i, d in enumerate(digits):
        d[4:24, 10 + i % 5: 14 + i % 5] = rng.integers(200, 256, (20, 4))
    server.files.update({"train-images-idx3-ubyte.gz": idx_images(digits[:9]),
                         "t10k-images-idx3-ubyte.gz": idx_images(digits[9:])})
    data.prepare(data.DataConfig("mnist", str(tmp_path / "data"), url=server.url, image_size=14, binarize=True))
    out = records(tmp_path, "--suite=images", "--dataset=mnist", "--budget=6", "--out=runs", "--smt_args=--context_len"
                  "=32 --future_len=8 --batch_size=8", "--bptt_args=--seq_len=64 --batch_size=4",
                  "--lanes=smt,bptt")  # 14x14, 0/1
    lanes_raced(out, "images", "rnn_bpb")
    pngs = {Path(r["png"]).name for r in out if "png" in r}
    assert pngs == {"images.png", "images-tokens.png"} | {f"images-{lane}-{kind}.png" for lane in ("smt", "bptt")
                                                          for kind in ("completions", "samples")}
    assert png_size(tmp_path / "runs" / "images-bptt-completions.png") == (8 * (2 * 16 + 2), 8 * (8 * 16 + 2))
    assert png_size(tmp_path / "runs" / "images-smt-samples.png") == (8 * 18, 8 * (8 * 16 + 2))


def test_gpu_suite_rehearsal_on_cpu(tmp_path):
    """--suite=gpu's code at tiny shapes on CPU: every measurement and its fields (the real suite needs CUDA)."""
    out = records(tmp_path, "--suite=gpu", "--device=cpu")
    steps = {(r["method"], r["seq_len"]): r for r in out if "step_s" in r}
    assert set(steps) == {(m, L) for m in ("smt", "bptt") for L in (16, 32)}
    for (method, L), r in steps.items():
        assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * L / r["step_s"])
        assert r["tflops_per_s"] > 0 and r["mfu"] is None and r["peak_mem_gib"] is None  # CPU: no peak, no GPU memory
    (ev,) = [r for r in out if r.get("measure") == "evaluate_rnn"]
    assert ev["rnn_steps"] == 16 + 8 and ev["first_s"] > 0 and ev["rnn_steps_per_s"] > 0
    gen = {(r["batch_size"], r["graphed"]): r for r in out if r.get("measure") == "generate"}
    assert set(gen) == {(1, False), (2, False)} and all(r["tokens_per_s"] > 0 for r in gen.values())


def test_gpu_suite_goes_on_past_a_failed_measurement(monkeypatch, capsys):
    """A measurement that fails (a compiler or CUDA error) is printed as a record; the others still run; the suite
    then ends with an error (exit 2 from the command line)."""
    def broken(*args):
        raise RuntimeError("no graph today\nsecond line")
    monkeypatch.setattr(bench, "gpu_generation", broken)
    with pytest.raises(bench.UsageError, match=r"1 measurement\(s\) failed \(generate\)"):
        bench.main(["--suite=gpu", "--quick", "--device=cpu", "--json"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"suite": "gpu", "failed": "generate", "error": "RuntimeError: no graph today"} in out
    assert len([r for r in out if "step_s" in r]) == 4 and any(r.get("measure") == "evaluate_rnn" for r in out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the answer where there is no CUDA")
def test_gpu_suite_says_so_without_cuda(tmp_path):
    result = run("bench.py", "--suite=gpu", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --suite=gpu --device=cuda: CUDA is not available here")


def test_table_output(tmp_path, capsys):
    bench.main(["--suite=gradients", "--lengths=8", f"--out={tmp_path}"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("suite=gradients  method=bptt  distance=1  grad_norm=")
    assert [line.split()[2] for line in lines[:8:2]] == ["distance=1", "distance=2", "distance=4", "distance=8"]
    assert lines[8] == "suite=gradients  smt_reach=191  context_len=64  encoder_depth=2"


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
    (["--suite=probes", "--tasks=retrieval,sorting"], "--tasks takes probes among"),
    (["--suite=probes", "--train_len=4"], "--train_len must be 0"),
    (["--suite=text", "--dmt_share=1"], r"--dmt_share in \[0, 1\)"),
    (["--suite=images", "--budget=0"], "--budget and --eval_interval must be positive"),
    (["--suite=text", "--lanes=smt,lstm"], "--lanes takes some of smt, bptt, torch"),
    (["--suite=gpu", "--device=cpu"], "on CPU only its tiny rehearsal runs"),
    (["--suite=scaling", "--device=tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--suite=gpu", "--quick", "--device=cpu", "--act_ckpt=some"], "--act_ckpt must be one of"),
    (["--suite=recall"], "--suite must be one of"),  # moved to dev/recall.py
])
def test_bad_input(args, message):
    with pytest.raises(UsageError, match=message):  # run_cli turns it into one line and exit 2, as above
        bench.main(args)
