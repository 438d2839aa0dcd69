"""config.py and cli.py: every CLI's --help, the answers to misspelt options, the defaults that depend on the device and method,
and the direction of imports between the project's files."""
import ast
import dataclasses
import math
import re
import subprocess
import sys

import pytest

import bench
import cli
import config
import data
import sample
import train
from cli import UsageError, parse_overrides
from config import Config, load_config
from conftest import ROOT, run

CLIS = {"train.py": Config, "sample.py": sample.SampleConfig, "prepare.py": data.DataConfig,
        "bench.py": bench.BenchConfig}


def options(help_text):
    """--help's option lines: {name: [default, type, comment]}, the comment's wrapped lines joined."""
    found, name = {}, None
    for line in help_text.splitlines():
        if m := re.match(r"^  --(\w+)=(\S+) +(\w+) +(\S.*)$", line):
            name, found[m[1]] = m[1], [m[2], m[3], m[4]]
        elif line.startswith(" " * 10) and name:
            found[name][2] += " " + line.strip()
        else:
            name = None
    return found


@pytest.mark.parametrize("script", CLIS)
def test_help_lists_every_option_with_its_type_default_and_comment(tmp_path, script):
    result = run(script, "-h", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert f"python {script}" in result.stdout  # the file's own examples come first
    shown = options(result.stdout)
    assert list(shown) == [f.name for f in dataclasses.fields(CLIS[script])]
    for f in dataclasses.fields(CLIS[script]):
        default, kind, comment = shown[f.name]
        assert default == cli.shown(f.default) and kind == type(f.default).__name__ and comment, f.name


def test_train_help_shows_the_defaults_that_apply_on_cuda_for_dmt_and_on_probes(tmp_path):
    result = run("train.py", "--help", "--max_iters=oops", cwd=tmp_path)  # help wins over what else is there
    assert result.returncode == 0
    lines = {name: comment for name, (_, _, comment) in options(result.stdout).items()}
    assert lines["lr"].endswith("[cuda: 0.0003; dmt: 0.002; cuda dmt: 3e-05; probe dmt on cpu: 0.0003]")
    assert lines["context_len"].endswith("[cuda: 256; probe (task_len 64): 64]")
    assert "\nschedule and logging:\n  --max_iters=" in result.stdout  # grouped by Config's section comments
    comments, sections = cli.field_comments(Config)
    assert not any(re.search(r"(cuda|dmt): \d", c) for c in comments.values())  # said once, from the dicts
    assert sections["lr"] == "optimisation" and sections["method"] == "run"


def test_help_piped_into_a_reader_that_stops_early_exits_quietly():
    """`python train.py --help | head -1`: the reader has closed the pipe (here before the help is written, as
    head does once it has its line); no traceback, exit 0."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0 and proc.stderr.read() == b""


def test_field_comments_read_continued_comments():
    comments, sections = cli.field_comments(bench.BenchConfig)
    assert comments["lengths"].startswith("comma-separated")
    assert comments["lengths"].endswith("probes: task lengths; longrange: the gaps")
    assert sections["lengths"] == "" and sections["dataset"].startswith("races")


@pytest.mark.parametrize("arg, message", [
    ("--max_iter=5", "unknown option --max_iter; did you mean --max_iters?"),
    ("--coef_dy=1", "unknown option --coef_dy; did you mean --coef_dyn or --coef_dec"),
    ("--zzz=1", "unknown option --zzz; --help lists the options"),
])
def test_a_misspelt_option_names_the_closest(arg, message):
    with pytest.raises(UsageError) as error:
        parse_overrides(Config(), [arg])
    assert str(error.value).startswith(message) and len(str(error.value)) < 100


def test_dmt_learning_rate_depends_on_the_device_and_the_task():
    """2e-3 on a CPU, the paper's 3e-5 on CUDA, on a probe on a CPU what the probes' results used (3e-4); the command
    line wins."""
    cpu, given = load_config(["--method=dmt", "--device=cpu", "--init_from=x"])
    assert (cpu.lr, cpu.lr_schedule, cpu.max_iters, given) == (2e-3, "cosine", 1500, {"method", "device", "init_from"})
    assert load_config(["--method=dmt", "--device=cpu", "--dataset=retrieval"])[0].lr == 3e-4
    assert load_config(["--method=smt", "--device=cpu", "--dataset=retrieval"])[0].lr == 3e-3
    assert load_config(["--method=dmt", "--device=cuda"])[0].lr == 3e-5
    assert load_config(["--method=smt", "--device=cuda"])[0].lr == 3e-4
    assert load_config(["--method=smt", "--device=cpu"])[0].lr == 3e-3
    assert load_config(["--method=dmt", "--device=cpu", "--lr=1e-5"])[0].lr == 1e-5
    assert bench.BenchConfig().dmt_args == ""  # the reproductions take train.py's default


def test_imports_flow_one_way():
    """At module level data.py and model.py import nothing of ours, smt.py only model.py, cli.py only data.py (its
    errors), the helpers (config.py, checkpoint.py) no CLI; no CLI imports another, no module itself, and there is
    no cycle."""
    mine = {p.stem for p in ROOT.glob("*.py")}
    imports = {}
    for name in mine:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imports[name] = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names} \
            | {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
        imports[name] &= mine
    clis = {"train", "sample", "bench", "prepare"}
    assert clis <= mine and not any(clis & found for found in imports.values())  # nothing imports a CLI
    expected = dict(data=set(), model=set(), smt={"model"}, cli={"data"}, config={"cli", "data", "model", "smt"},
                    checkpoint={"cli", "config"})
    assert {name: imports[name] for name in expected} == expected
    reach = {name: set(found) for name, found in imports.items()}
    for _ in mine:  # what each module imports, directly or through others
        reach = {name: found.union(*(reach[f] for f in found)) for name, found in reach.items()}
    assert not [name for name in mine if name in reach[name]]


def test_every_registry_is_a_choice_in_help_and_validation(monkeypatch):
    """A cell, encoder, readout or method named in its registry is valid for --cell, --encoder, --readout, --method
    and listed in --help; a name in none is refused, naming the choices."""
    import model
    monkeypatch.setitem(model.CELLS, "mine", model.ElmanCell)
    cfg, _ = load_config(["--cell=mine", "--device=cpu"])
    config.check_config(cfg)
    help_text = config.config_help("")
    for key, registry in config.REGISTRIES.items():
        assert f"--{key}=" in help_text and f"{' | '.join(registry)}:" in help_text, key
    assert "transformer | mlp | gru | lstm | elman | nn_gru | nn_lstm | mine:" in help_text
    with pytest.raises(UsageError, match="--cell must be one of transformer, .*, mine, not 'yours'"):
        config.check_config(load_config(["--cell=yours", "--device=cpu"])[0])


def test_cosine_decays_over_the_time_budget_when_it_ends_the_run_first():
    """A DMT run stopped by its time budget after a few hundred of its 1,500 iterations must still reach lr/10 at the
    end, and be halfway down at half the time; with no budget the iterations set the pace, as before."""
    cfg = Config(lr=1e-3, lr_schedule="cosine", warmup_iters=10, max_iters=1010, time_budget=100.0)
    assert train.lr_at(cfg, 5, 0.0) == pytest.approx(1e-3 * 6 / 10)  # warmup by iterations
    assert train.lr_at(cfg, 20, 50.0) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert train.lr_at(cfg, 20, 100.0) == pytest.approx(1e-4)
    assert train.lr_at(cfg, 510, 1.0) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # iterations ahead of the clock
    untimed = dataclasses.replace(cfg, time_budget=0.0)
    assert train.lr_at(untimed, 20, 1e6) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.01))))
    assert train.lr_at(dataclasses.replace(cfg, lr_schedule="constant"), 20, 100.0) == 1e-3


def test_bptt_decays_its_learning_rate_by_default():
    """The baseline gets its best schedule (cosine beat a constant lr at equal CPU time); SMT keeps a constant one,
    since its lane ends in DMT, which decays."""
    for method in ("bptt", "tbptt"):
        assert load_config([f"--method={method}", "--device=cpu"])[0].lr_schedule == "cosine"
    assert load_config(["--method=bptt", "--lr_schedule=constant"])[0].lr_schedule == "constant"
    assert load_config(["--method=smt", "--device=cpu"])[0].lr_schedule == "constant"


def test_dmt_trains_the_rnns_step_through_the_readout_unless_the_rnn_is_frozen():
    """The readout's CE reaches the RNN's step by default; a frozen RNN turns it off by itself, and only asking for
    both at once is refused (check_config)."""
    assert load_config(["--method=dmt", "--init_from=x"])[0].dmt_readout_grad is True
    assert load_config(["--method=dmt", "--init_from=x", "--freeze=rnn"])[0].dmt_readout_grad is False
    assert load_config(["--method=dmt", "--dmt_readout_grad=False"])[0].dmt_readout_grad is False
    both, _ = load_config(["--method=dmt", "--init_from=x", "--freeze=rnn", "--dmt_readout_grad=True"])
    with pytest.raises(UsageError, match="which --freeze=rnn holds fixed"):
        config.check_config(both)


def test_a_cpu_trains_a_few_transitions_a_step_a_gpu_and_the_probes_all():
    """8 random transitions a step is a CPU default (cheap steps); on CUDA every transition costs little more than one,
    and the probes' results were measured training all."""
    cpu = load_config(["--device=cpu"])[0]
    assert (cpu.positions, cpu.dec_positions, cpu.future_len) == ("8", 8, 8)
    cuda = load_config(["--device=cuda"])[0]
    assert (cuda.positions, cuda.dec_positions, cuda.future_len) == ("all", 16, 64)
    assert load_config(["--device=cpu", "--dataset=retrieval"])[0].positions == "all"
