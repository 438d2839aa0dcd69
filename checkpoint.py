"""A run's files on disk: out_dir/ckpt.pt (everything, for resuming), out_dir/rnn.pt (only what the RNN needs to
generate), both written atomically and holding tensors and plain config only, so that loading runs no code."""
import dataclasses
import os
from pathlib import Path

import torch

from cli import UsageError
from config import Config

RUN_FILES = ("ckpt.pt", "rnn.pt", "log.jsonl")  # a folder holding any of these holds a run


def save_atomic(obj, path):
    """torch.save to a temporary file, fsync, rename: a crash or failed write leaves the previous file intact."""
    tmp = Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_run(out, config, model, meta, **state):
    """out/ckpt.pt with the whole model and the training `state`; out/rnn.pt with the RNN's part of the model."""
    save_atomic(dict(config=config, model=model.state_dict(), meta=meta, **state), Path(out) / "ckpt.pt")
    save_atomic(dict(config=config, model=model.rnn_state_dict(), meta=meta), Path(out) / "rnn.pt")


def complete_config(config, path):
    """A checkpoint's config with the keys that earlier versions did not have set to Config's defaults (which leave
    the newer features off, as those runs trained); one line if a value is not of its key's type."""
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a checkpoint this can use: its config is not a dict")
    defaults = dataclasses.asdict(Config())
    for key, value in config.items():
        kind = type(defaults.get(key, value))
        if not (type(value) is kind or (kind is float and type(value) is int)):
            raise UsageError(f"{path} is not a checkpoint this can use: its config has {key}={value!r}, not a "
                             f"{kind.__name__}")
    return {**defaults, **config}


def load_checkpoint(path, what, keys=("config", "model", "meta")):
    """A checkpoint's tensors and plain config (weights_only: nothing in the file can run code); one clear line if
    it is missing, damaged or lacks `keys`."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"no {path.name} in {path.parent}: {what}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted or not a checkpoint at all
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}); it is damaged or not ours") from None
    if not isinstance(ckpt, dict) or not set(keys) <= set(ckpt):
        raise UsageError(f"{path} is not a checkpoint this can use: it needs {', '.join(keys)}")
    ckpt["config"] = complete_config(ckpt["config"], path)
    # a torch.compile(model) wrapper prefixes every key; the weights are the same as the plain model's
    ckpt["model"] = {k.replace("_orig_mod.", ""): v for k, v in ckpt["model"].items()}
    return ckpt


def load_weights(model, weights, source, prefix=""):
    """model.load_state_dict of the weights whose names start with `prefix` (stripped), with one line instead of
    the list of every mismatched tensor."""
    if prefix:
        weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise UsageError(f"the weights in {source} do not fit this model; were they trained on another dataset, "
                         "or by another version?") from None
