import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, torch.get_num_threads()))

import smt  # noqa: E402


def tiny_cfg(**over):
    """The loss functions read their knobs off any object: train.py's defaults, with test overrides."""
    from config import Config
    import dataclasses
    return SimpleNamespace(**{**dataclasses.asdict(Config()), **over})


def tiny_model(cell="transformer", encoder="causal", readout="decoder", mem_tokens=2, context_len=8, seed=0,
               with_encoder=True, d_model=16):
    torch.manual_seed(seed)
    return smt.SMTModel(32, d_model, 2, mem_tokens, 1, 1, 1, context_len, cell=cell, encoder=encoder, readout=readout,
                        with_encoder=with_encoder)


def run(script, *args, cwd=None):
    """Runs one of the project's CLIs as a user would; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture
def text_file(tmp_path):
    """A small real text: a few paragraphs of English repeated with variations."""
    lines = [f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7} times.\n" for i in range(400)]
    path = tmp_path / "tiny.txt"
    path.write_text("".join(lines))
    return path
