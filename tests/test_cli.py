"""train.py, sample.py and prepare.py end to end, as a user runs them, and their answers to bad input."""
import json
import re

import pytest
import torch

from cli import UsageError
from conftest import run
from sample import main as sample_main
from train import main as train_main

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
    assert re.search(rf"resuming {smt_out} at iter 20/30: \d+s trained, \d+s of --time_budget=600 left",
                     resumed.stdout)
    assert [e["iter"] for e in evals(smt_out)] == [20, 30]


def test_smt_trains_a_fresh_rnn_of_another_shape_on_a_runs_teacher(tmp_path, text_file):
    """SMT with --init_from=<an SMT run>: the run's encoder and decoder exactly (frozen: they stay so), a new RNN of
    the depth the command line gives, and it learns; the teacher's own shape cannot change, nor BPTT take one."""
    source, fresh = tmp_path / "smt", tmp_path / "fresh"
    train(tmp_path, text_file, source, "--max_iters=20", "--eval_interval=20", "--lr=3e-3")
    train(tmp_path, text_file, fresh, f"--init_from={source}", "--rnn_depth=2", "--freeze=teacher",
          "--max_iters=40", "--eval_interval=20", "--lr=3e-3")
    before = torch.load(source / "ckpt.pt", weights_only=True)["model"]
    after = torch.load(fresh / "ckpt.pt", weights_only=True)
    teacher = [k for k in before if k.startswith(("encoder.", "decoder."))]
    assert teacher and all(torch.equal(before[k], after["model"][k]) for k in teacher)
    assert after["config"]["rnn_depth"] == 2 and "cell.body.blocks.1.attn.q.weight" in after["model"]
    assert "cell.body.blocks.1.attn.q.weight" not in before
    log = evals(fresh)
    assert log[-1]["val_dyn"] < log[0]["val_dyn"]  # the new RNN learns the teacher's steps
    untrained = tmp_path / "untrained"  # the same shape as the run's RNN, no step taken: a new RNN, not the run's
    train(tmp_path, text_file, untrained, f"--init_from={source}", "--lr=0", "--max_iters=1", "--eval_interval=1")
    weights = torch.load(untrained / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], weights[k]) for k in teacher)
    assert not any(torch.equal(before[k], weights[k]) for k in ("rnn_embed.weight", "m_empty",
                                                                 "cell.body.blocks.0.attn.q.weight"))
    for args, message in ((["--d_model=32"], "--d_model=32 differs from the checkpoint's 16"),
                          (["--method=bptt"], "--method=bptt has no teacher to take from --init_from")):
        result = run("train.py", f"--dataset={text_file}", f"--data_dir={tmp_path / 'data'}", f"--init_from={source}",
                     f"--out_dir={tmp_path / 'bad'}", "--max_iters=1", *args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_dmt_refines_on_the_smt_runs_data_bar_what_the_command_line_changes(tmp_path):
    """Naming the SMT run's dataset again does not reset its data settings (a long-range run's gaps) to the
    defaults; a data setting given on the command line wins."""
    smt_out = tmp_path / "smt"
    tiny = [a for a in TINY if not a.startswith(("--context_len", "--seq_len"))] + ["--max_iters=1"]
    result = run("train.py", "--dataset=longrange", "--gap=6", "--min_gap=2", f"--out_dir={smt_out}", *tiny,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for out, args, gaps in (("dmt", [], (6, 2)), ("dmt-min3", ["--min_gap=3"], (6, 3))):
        result = run("train.py", "--method=dmt", "--dataset=longrange", f"--init_from={smt_out}",
                     f"--out_dir={tmp_path / out}", *tiny, *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        config = torch.load(tmp_path / out / "ckpt.pt", weights_only=True)["config"]
        assert (config["gap"], config["min_gap"]) == gaps


@pytest.mark.parametrize("args, message", [
    (["--no_such_key=1"], "unknown option --no_such_key; --help lists the options"),
    (["--max_iter=1"], "unknown option --max_iter; did you mean --max_iters"),
    (["--max_iters=ten"], "--max_iters takes a int"),
    (["--compile=maybe"], "--compile takes True or False"),
    (["--method=magic"], "--method must be one of"),
    (["--act_ckpt=some"], "--act_ckpt must be one of none, cell, all"),
    (["--peak_flops=-1"], "--peak_flops must not be negative"),
    (["--dataset=missing.txt"], "unknown dataset 'missing.txt'"),
    (["--dataset=EMPTY"], "is empty"),
    (["--dataset=BINARY"], "does not look like text"),
    (["--context_len=4096"], "fewer than the"),
    (["--d_model=30", "--n_heads=4"], "must divide --d_model"),
    (["--cell=lstm", "--mem_tokens=3"], "--mem_tokens must be even"),
    (["--positions=some"], "--positions must be 'all' or a positive number"),
    (["--past_targets=9", "--past_horizon=8"], "raise --past_horizon or lower --past_targets"),
    (["--init_from=resume"], "nothing to resume"),
    (["--method=dmt"], "--init_from=<its out_dir>"),
    (["--dmt_readout_grad=True", "--freeze=rnn"], "which --freeze=rnn holds fixed"),
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


def test_prepare_cli_prepares_a_file(tmp_path, text_file):
    result = run("prepare.py", str(text_file), f"--data_dir={tmp_path / 'data'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "val" in result.stdout and "MB" in result.stdout
    folder = next((tmp_path / "data").glob("tiny-*"))
    assert (folder / "train.bin").stat().st_size + (folder / "val.bin").stat().st_size == text_file.stat().st_size


def test_overrides_take_both_spellings():
    """`--key=value` and `--key value` (the README's `python train.py --method smt`), typed by the defaults."""
    from cli import parse_overrides
    from config import Config
    cfg, given = parse_overrides(Config(), ["--method", "bptt", "--max_iters=5", "--lr", "0.5", "--overwrite"])
    assert (cfg.method, cfg.max_iters, cfg.lr, cfg.overwrite) == ("bptt", 5, 0.5, True)
    assert given == {"method", "max_iters", "lr", "overwrite"}
    with pytest.raises(UsageError, match="unknown option --nope"):
        parse_overrides(Config(), ["--nope", "1"])
    with pytest.raises(UsageError, match="cannot read argument '--method'"):
        parse_overrides(Config(), ["--method"])


def in_process(tmp_path, text_file, out, *args):
    """train.py's main in this process (faster than a new one): the arguments of train() above."""
    train_main([f"--dataset={text_file}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}", *TINY,
                "--device=cpu", *args])


def test_a_run_is_not_written_over_by_accident(tmp_path, text_file, capsys):
    out = tmp_path / "out"
    in_process(tmp_path, text_file, out, "--max_iters=4", "--eval_interval=2")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for args in ([], ["--method=bptt"], ["--method=dmt", f"--init_from={out}"]):  # DMT into its own SMT run, too
        with pytest.raises(UsageError) as error:  # before any work: the dataset is not even prepared
            train_main([f"--dataset={text_file}", f"--data_dir={tmp_path / 'fresh'}", f"--out_dir={out}", *args])
        assert str(error.value) == (f"--out_dir={out} already holds a run (ckpt.pt, rnn.pt, log.jsonl): continue it "
                                    "with --init_from=resume, pass another --out_dir, or start afresh over it with "
                                    "--overwrite=True")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not (tmp_path / "fresh").exists()
    (tmp_path / "a_file").write_text("notes")
    with pytest.raises(UsageError, match="--out_dir=.*a_file is a file, not a folder: pass another --out_dir"):
        train_main([f"--out_dir={tmp_path / 'a_file'}"])
    with pytest.raises(UsageError, match="--overwrite=True starts afresh; --init_from=resume continues"):
        train_main([f"--out_dir={out}", "--init_from=resume", "--overwrite=True"])
    in_process(tmp_path, text_file, out, "--max_iters=3", "--eval_interval=3", "--overwrite=True", "--seed=7")
    assert [e["iter"] for e in evals(out)] == [3]  # the old run's evaluations are gone with it
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ckpt["iter"], ckpt["config"]["seed"]) == (3, 7)
    in_process(tmp_path, text_file, out, "--init_from=resume", "--max_iters=5", "--eval_interval=5")
    assert [e["iter"] for e in evals(out)] == [3, 5]  # a run started with --overwrite resumes as any other


def test_checkpoints_of_earlier_versions_load_with_todays_defaults(tmp_path, text_file):
    """A run saved before coef_recall, memory_noise, dyn_weighting and overwrite existed resumes, is refined by DMT
    and samples; a config that cannot be read as ours is refused in one line."""
    old = tmp_path / "old"
    in_process(tmp_path, text_file, old, "--max_iters=4", "--eval_interval=4")
    newer = ("coef_recall", "memory_noise", "dyn_weighting", "overwrite")
    for name in ("ckpt.pt", "rnn.pt"):
        ckpt = torch.load(old / name, weights_only=True)
        ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in newer}
        torch.save(ckpt, old / name)
    in_process(tmp_path, text_file, old, "--init_from=resume", "--max_iters=6", "--eval_interval=6")
    config = torch.load(old / "ckpt.pt", weights_only=True)["config"]
    assert (config["coef_recall"], config["memory_noise"], config["dyn_weighting"]) == (0.0, 0.0, "uniform")
    for name in ("ckpt.pt", "rnn.pt"):  # the resumed run wrote today's config: take the keys out again
        ckpt = torch.load(old / name, weights_only=True)
        ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in newer}
        torch.save(ckpt, old / name)
    in_process(tmp_path, text_file, tmp_path / "dmt", "--method=dmt", f"--init_from={old}", "--max_iters=2",
               "--eval_interval=2")
    assert [e["iter"] for e in evals(tmp_path / "dmt")] == [0, 2]
    for prime in ("rnn", "teacher"):
        sample_main([f"--out_dir={old}", "--num_tokens=5", "--num_samples=1", "--device=cpu", f"--prime={prime}"])
    ckpt["config"]["d_model"] = "wide"
    torch.save(ckpt, old / "rnn.pt")
    with pytest.raises(UsageError, match=r"rnn.pt is not a checkpoint this can use: its config has "
                                         r"d_model='wide', not a int$"):
        sample_main([f"--out_dir={old}", "--device=cpu"])


def test_cuda_out_of_memory_is_one_line_naming_the_knobs(tmp_path, text_file):
    """A CUDA OOM raised inside a training step (here by a forward hook on the RNN cell, on its 4th call: past the
    FLOP count, inside the loop) ends train.py with one line naming what lowers memory, not a traceback."""
    from model import TransformerCell
    calls = []

    def hook(module, args, output):
        if isinstance(module, TransformerCell):
            calls.append(1)
            if len(calls) == 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with pytest.raises(UsageError, match=r"CUDA out of memory: lower --batch_size \(with --grad_accum.*"
                                             r"--act_ckpt=cell"):
            train_main([f"--dataset={text_file}", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}",
                        *TINY, "--max_iters=10", "--device=cpu"])
    finally:
        handle.remove()
    assert len(calls) == 4


def test_train_logs_flops_and_checkpoints_activations(tmp_path, text_file):
    result = train(tmp_path, text_file, tmp_path / "out", "--max_iters=5", "--act_ckpt=cell", "--device=cpu")
    line = next(line for line in result.stdout.splitlines() if line.startswith("iter 5/5"))
    assert "FLOP" not in line and "MFU" not in line and "peak mem" not in line  # CPU: no peak to compare with
    result = train(tmp_path, text_file, tmp_path / "out2", "--max_iters=5", "--peak_flops=1e9", "--device=cpu")
    mfu = next(line for line in result.stdout.splitlines() if line.startswith("iter 5/5")).split(" | MFU ")[1]
    assert float(mfu.split("%")[0]) > 0 and "peak mem" not in mfu


class GatedCell(torch.nn.Module):
    """A cell written outside model.py: m' = rms(m + tanh(W [m; e])), registered below with one entry."""

    def __init__(self, d, n_heads, depth, mem_tokens):
        super().__init__()
        self.mix = torch.nn.Linear((mem_tokens + 1) * d, mem_tokens * d)

    def forward(self, m, e):
        from model import rms
        return rms(m + torch.tanh(self.mix(torch.cat([m.flatten(1), e], dim=1))).view_as(m))


def test_a_cell_registered_outside_model_py_trains_samples_and_refines(tmp_path, text_file, monkeypatch, capsys):
    """One entry in model.CELLS makes a new --cell: SMT, BPTT and DMT train it through train.py's entry point (its
    weights move, its losses fall), and its run samples."""
    import model
    monkeypatch.setitem(model.CELLS, "gated", GatedCell)
    for method, args in (("smt", []), ("bptt", []), ("dmt", [f"--init_from={tmp_path / 'smt'}"])):
        out = tmp_path / method
        in_process(tmp_path, text_file, out, f"--method={method}", "--cell=gated", "--max_iters=30",
                   "--eval_interval=30", "--lr=1e-2", *args)
        logged = [float(line.split(" | loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
                  if line.startswith("iter ")]
        assert logged[-1] < logged[0], (method, logged)
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        assert ckpt["config"]["cell"] == "gated" and "cell.mix.weight" in ckpt["model"]
    sample_main([f"--out_dir={tmp_path / 'dmt'}", "--num_tokens=5", "--num_samples=1", "--device=cpu"])
    assert capsys.readouterr().out.strip()


def test_dmt_with_a_frozen_teacher_keeps_the_teachers_readout(tmp_path, text_file):
    """--method=dmt --freeze=teacher: only the RNN trains; the decoder, which is the RNN's readout, stays as SMT left
    it (the paper's DMT). Without it the readout's CE retrains the decoder."""
    smt_out = tmp_path / "smt"
    in_process(tmp_path, text_file, smt_out, "--max_iters=4", "--eval_interval=4")
    before = torch.load(smt_out / "ckpt.pt", weights_only=True)["model"]
    for freeze, kept in (("teacher", True), ("none", False)):
        out = tmp_path / freeze
        in_process(tmp_path, text_file, out, "--method=dmt", f"--init_from={smt_out}", f"--freeze={freeze}",
                   "--max_iters=4", "--eval_interval=4")
        after = torch.load(out / "ckpt.pt", weights_only=True)["model"]
        decoder = [k for k in before if k.startswith("decoder.")]
        assert all(torch.equal(before[k], after[k]) for k in decoder) == kept, freeze
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
        assert not torch.equal(before["cell.body.blocks.0.mlp.up.weight"], after["cell.body.blocks.0.mlp.up.weight"])


def test_progress_shows_where_the_time_budget_ends_the_run(tmp_path, text_file):
    """With a time budget that ends the run long before max_iters, the progress line says about where (iter N/~M)
    and how much of the budget is spent; without a budget, max_iters."""
    timed = train(tmp_path, text_file, tmp_path / "timed", "--max_iters=100000", "--time_budget=4",
                  "--eval_interval=100000")
    lines = [line for line in timed.stdout.splitlines() if line.startswith("iter ")]
    ends = [int(re.match(r"iter \d+/~(\d+) ", line)[1]) for line in lines[:-1]]
    last = int(lines[-1].split()[1].split("/")[0])
    assert ends and all(end < 100000 for end in ends) and 0.3 * last < ends[-1] < 3 * last, lines
    assert all(re.search(r"\| \d+s of 4s \| ETA \d+s", line) for line in lines), lines
    untimed = train(tmp_path, text_file, tmp_path / "untimed", "--max_iters=10", "--time_budget=0")
    assert [line.split(" | ")[0] for line in untimed.stdout.splitlines() if line.startswith("iter ")] == \
        ["iter 5/10", "iter 10/10"]
