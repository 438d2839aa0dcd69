"""train.py, sample.py and data.py end to end, as a user runs them, and their answers to bad input."""
import json

import pytest
import torch

from conftest import run

TINY = ["--d_model=16", "--n_heads=2", "--mem_tokens=2", "--encoder_depth=1", "--decoder_depth=1", "--rnn_depth=1",
        "--context_len=16", "--future_len=4", "--seq_len=16", "--batch_size=4", "--eval_iters=1", "--log_interval=5",
        "--warmup_iters=5", "--dmt_steps=12", "--dmt_every=4"]


def train(tmp_path, text_file, out, *args):
    result = run("train.py", f"--dataset={text_file}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}",
                 *TINY, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result


def evals(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["smt", "bptt", "tbptt"])
def test_train_then_sample(tmp_path, text_file, method):
    out = tmp_path / "out"
    result = train(tmp_path, text_file, out, f"--method={method}", "--max_iters=30", "--eval_interval=15",
                   "--lr=3e-3", "--bptt_window=4")
    assert "tok/s" in result.stdout and "ETA" in result.stdout
    log = evals(out)
    assert [e["iter"] for e in log] == [15, 30]
    assert log[-1]["val_rnn_bpb"] < 8.0  # 8 bits per byte is a uniform guess: it learned something
    assert log[-1]["val_rnn_bpb"] < log[0]["val_rnn_bpb"] + 0.05
    if method == "smt":
        assert {"val_rnn_primed_bpb", "val_dec", "val_dyn", "val_teacher_bpb"} <= set(log[-1])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 30 and ckpt["config"]["method"] == method
    rnn = torch.load(out / "rnn.pt", weights_only=True)
    assert not any(k.startswith("encoder.") for k in rnn["model"])  # the RNN stands alone

    sample = run("sample.py", f"--out_dir={out}", "--prompt=Line 1", "--num_tokens=40", "--num_samples=2",
                 cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.count("Line 1") >= 2 and len(sample.stdout) > 80
    if method == "smt":
        primed = run("sample.py", f"--out_dir={out}", "--prime=teacher", "--prompt=Line 2", "--num_tokens=20",
                     cwd=tmp_path)
        assert primed.returncode == 0, primed.stderr


def test_evaluations_by_seconds_and_tokens_seen(tmp_path, text_file):
    out = tmp_path / "out"
    train(tmp_path, text_file, out, "--method=bptt", "--max_iters=3", "--eval_interval=1000", "--eval_seconds=1e-6")
    log = evals(out)
    assert [e["iter"] for e in log] == [1, 2, 3]  # each step's seconds made an evaluation due
    assert [e["tokens"] for e in log] == [4 * 16 * i for i in (1, 2, 3)]  # batches of 4 sequences of 16


def test_dmt_after_smt_and_resume(tmp_path, text_file):
    smt_out, dmt_out = tmp_path / "smt", tmp_path / "dmt"
    train(tmp_path, text_file, smt_out, "--max_iters=20", "--eval_interval=20", "--lr=3e-3")
    train(tmp_path, text_file, dmt_out, "--method=dmt", f"--init_from={smt_out}", "--max_iters=10",
          "--eval_interval=10")
    log = evals(dmt_out)
    assert [e["iter"] for e in log] == [0, 10]
    assert len(log[0]["drift"]) == 12 and len(log[-1]["drift"]) == 12  # drift per step, before and after DMT
    resumed = train(tmp_path, text_file, smt_out, "--init_from=resume", "--max_iters=30", "--eval_interval=10")
    assert "iter 30/30" in resumed.stdout
    assert [e["iter"] for e in evals(smt_out)] == [20, 30]


@pytest.mark.parametrize("args, message", [
    (["--no_such_key=1"], "unknown option --no_such_key; valid options:"),
    (["--max_iters=ten"], "--max_iters takes a int"),
    (["--compile=maybe"], "--compile takes True or False"),
    (["--method=magic"], "--method must be one of"),
    (["--dataset=missing.txt"], "unknown dataset 'missing.txt'"),
    (["--dataset=EMPTY"], "is empty"),
    (["--dataset=BINARY"], "does not look like text"),
    (["--context_len=4096"], "fewer than the"),
    (["--d_model=30", "--n_heads=4"], "must divide --d_model"),
    (["--cell=lstm", "--mem_tokens=3"], "--mem_tokens must be even"),
    (["--positions=some"], "--positions must be 'all' or a positive number"),
    (["--init_from=resume"], "nothing to resume"),
    (["--method=dmt"], "--init_from=<its out_dir>"),
])
def test_bad_input_gives_one_clear_line(tmp_path, text_file, args, message):
    (tmp_path / "EMPTY").write_bytes(b"")
    (tmp_path / "BINARY").write_bytes(bytes(range(256)) * 4)
    args = [a.replace("EMPTY", str(tmp_path / "EMPTY")).replace("BINARY", str(tmp_path / "BINARY")) for a in args]
    if not any(a.startswith("--dataset") for a in args):
        args.append(f"--dataset={text_file}")
    result = run("train.py", f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}", "--max_iters=1",
                 *args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_sample_without_a_run(tmp_path):
    result = run("sample.py", f"--out_dir={tmp_path / 'nothing'}", cwd=tmp_path)
    assert result.returncode == 2 and "no rnn.pt" in result.stderr and "Traceback" not in result.stderr


def test_data_cli_prepares_a_file(tmp_path, text_file):
    result = run("data.py", str(text_file), f"--data_dir={tmp_path / 'data'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "val" in result.stdout and "MB" in result.stdout
    folder = next((tmp_path / "data").glob("tiny-*"))
    assert (folder / "train.bin").stat().st_size + (folder / "val.bin").stat().st_size == text_file.stat().st_size


def test_overrides_take_both_spellings():
    """`--key=value` and `--key value` (the README's `python train.py --method smt`), typed by the defaults."""
    from data import UsageError, parse_overrides
    from train import Config
    cfg = parse_overrides(Config(), ["--method", "bptt", "--max_iters=5", "--lr", "0.5", "--detach_target"])
    assert (cfg.method, cfg.max_iters, cfg.lr, cfg.detach_target) == ("bptt", 5, 0.5, True)
    with pytest.raises(UsageError, match="unknown option --nope"):
        parse_overrides(Config(), ["--nope", "1"])
    with pytest.raises(UsageError, match="cannot read argument '--method'"):
        parse_overrides(Config(), ["--method"])
