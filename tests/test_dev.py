"""dev/: the research diagnostics' scripts. dev/recall.py on a stand-in whose memory is a shift register (exact
answers), on an untrained model, and end to end on a tiny trained long-range run."""
import importlib.util
import json

import pytest
import torch

import data
import smt
from cli import UsageError
from conftest import ROOT, run, tiny_model

spec = importlib.util.spec_from_file_location("recall", ROOT / "dev" / "recall.py")
recall = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recall)


class ShiftRegister(torch.nn.Module):
    """A stand-in model whose memory token k is the one-hot byte read k + 1 steps ago (the RNN keeps 3, the
    teacher 1), and whose decoder names the byte s back from token s - 1: what memory_record must find."""

    def __init__(self):
        super().__init__()
        self.decoder = self
        self.encoder = self
        self.cell = None  # no fused run(): smt.read steps it with step()

    def empty(self, batch):
        return torch.zeros(batch, 3, 256)

    def step(self, memory, token):
        return torch.cat([torch.nn.functional.one_hot(token, 256).float()[:, None], memory[:, :2]], dim=1)

    def memories(self, x, positions):
        last = torch.nn.functional.one_hot(x[:, positions], 256).float()[:, :, None]
        return torch.cat([last, torch.zeros(*last.shape[:2], 2, 256)], dim=2)

    def readout(self, m):  # names the byte just read
        return m[:, 0]

    def at_offsets(self, m, offsets):
        kept = [m[:, -r - 1] if -r <= m.size(1) else torch.zeros(m.size(0), 256) for r in offsets.tolist()]
        return torch.stack(kept, dim=1)


def episodes(gap=8, count=16):
    return data.TextProbe(data.DataConfig(dataset="longrange", gap=gap), count).get("val")


def test_memory_record_names_the_byte_s_back_within_reach_only():
    record = recall.memory_record(ShiftRegister(), episodes()[0], [1, 2, 3, 4, 8])
    assert record["rnn"] == {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 8: 0.0}
    assert record["teacher"] == {1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0, 8: 0.0}


def test_answer_logits_and_scores_of_a_model_that_names_the_last_byte():
    """A readout that names the byte just read answers y_t = x_{t+1} only where the answer repeats the byte before
    it: scores must agree with that count, for the RNN and the teacher alike, and per kind add up to it."""
    x, y = episodes(count=64)
    logits = recall.answer_logits(ShiftRegister(), x)
    assert set(logits) == {"rnn", "teacher"} and logits["rnn"].shape == (*x.shape, 256)
    valid = y >= 0
    expected = ((x == y) & valid).sum().item() / valid.sum().item()
    for name in ("rnn", "teacher"):
        s = recall.scores(logits[name], x, y)
        assert s["acc"] == pytest.approx(expected) and 0 <= s["whole_acc"] <= 1
        kinds = dict(key=x[:, 0] == ord("k"), name=x[:, 0] == ord("I"))
        kinds["bracket"] = ~(kinds["key"] | kinds["name"])
        right = {k: ((x == y) & valid)[rows].sum().item() for k, rows in kinds.items()}
        total = {k: valid[rows].sum().item() for k, rows in kinds.items()}
        assert s["key_acc"] == pytest.approx(right["key"] / total["key"])
        assert sum(s[f"{k}_acc"] * total[k] for k in kinds) == pytest.approx(expected * valid.sum().item())


def test_direction_record_splits_the_rnns_error_and_patches_it_by_direction():
    """On an untrained model (32 memory coordinates), with answers set to what the teacher's readout names: the
    bands' shares of the variance add up to 1; over all directions the errors are the plain squared distances over
    the variance (a rotation keeps them); patched in all directions the RNN's memories are the teacher's (every
    answer named), in the leading eighth alone they are not."""
    model = tiny_model(mem_tokens=2, d_model=16).eval()
    x = torch.randint(0, 32, (64, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher = model.memories(x, torch.arange(12)).flatten(2)
        y = model.readout(teacher.view(-1, 2, 16)).argmax(-1).view(64, 12)
        own = torch.stack([m for _, m in smt.rollout(model, model.empty(64), x)], dim=1).flatten(2)
    assert smt.accuracy(smt.rnn_logits(model, x), y, whole=False) < 0.5
    record = recall.direction_record(model, x, y)
    assert list(record) == ["0-4", "4-16", "16-32", "0-32"]
    assert sum(record[b]["variance"] for b in ("0-4", "4-16", "16-32")) == pytest.approx(1, abs=1e-5)
    variance = torch.cov(teacher.reshape(-1, 32).T).trace()
    assert record["0-32"]["rollout_error"] == pytest.approx((((own - teacher) ** 2).sum(-1).mean() / variance).item(),
                                                            rel=1e-3)
    assert record["0-32"]["patched_acc"] == 1.0 and record["0-4"]["patched_acc"] < 0.9


def test_recall_scores_a_trained_run_as_train_py_does(tmp_path):
    """At the run's own gap, on the episodes train.py evaluates (its seed, one batch of 32), the scores are
    train.py's last evaluation; at another gap it scores too; the record covers both kinds of memory."""
    result = run("train.py", "--dataset=longrange", "--gap=8", "--min_gap=1", "--past_targets=4", "--past_horizon=12",
                 "--batch_size=8", "--eval_iters=1", "--max_iters=20", "--eval_interval=20", "--seed=5",
                 "--out_dir=lr", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    last = json.loads((tmp_path / "lr" / "log.jsonl").read_text().splitlines()[-1])
    result = run("dev/recall.py", "--run=lr", "--lengths=8,12", "--episodes=32", "--seed=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    scores = {(r["gap"], r["memories"]): r for r in out if "acc" in r}
    assert set(scores) == {(8, "rnn"), (8, "teacher"), (12, "rnn"), (12, "teacher")}
    assert scores[8, "rnn"]["acc"] == pytest.approx(last["val_rnn_acc"], abs=1e-6)
    assert scores[8, "rnn"]["whole_acc"] == pytest.approx(last["val_rnn_whole_acc"], abs=1e-6)
    assert scores[8, "teacher"]["acc"] == pytest.approx(last["val_teacher_acc"], abs=1e-6)
    assert all(0 <= r[f"{k}_acc"] <= 1 for r in scores.values() for k in ("key", "name", "bracket"))
    record = {r["memories"]: r for r in out if "back_1" in r}
    assert set(record) == {"rnn", "teacher"} and all(r["gap"] == 8 for r in record.values())
    assert all(0 <= r[f"back_{s}"] <= 1 for r in record.values() for s in recall.BYTES_BACK if s < 31)
    assert {r["directions"] for r in out if "directions" in r} == {"0-32", "32-128", "128-256", "0-256"}
    result = run("train.py", "--dataset=retrieval", "--task_len=16", "--max_iters=2", "--eval_interval=2",
                 "--out_dir=probe", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with pytest.raises(UsageError, match="scores long-range runs, and .*probe trained on retrieval"):
        recall.main([f"--run={tmp_path / 'probe'}"])


@pytest.mark.parametrize("args, message", [
    ([], "--run is missing"),
    (["--run=nowhere"], "no ckpt.pt in nowhere: give the out_dir"),
    (["--run=nowhere", "--episodes=0"], "--episodes must be positive"),
    (["--run=nowhere", "--lengths=8,x"], "--lengths takes comma-separated gaps"),
    (["--runs=out"], "unknown option --runs; did you mean --run?"),
])
def test_bad_input(args, message):
    with pytest.raises(UsageError, match=message):
        recall.main(args)


def test_help_and_errors_from_the_command_line(tmp_path):
    result = run("dev/recall.py", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "python dev/recall.py --run=out/lr --lengths=16,32" in result.stdout
    assert "--episodes=512" in result.stdout
    result = run("dev/recall.py", "--run=nowhere", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: no ckpt.pt in nowhere: give the out_dir")
