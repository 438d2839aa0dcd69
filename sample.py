"""Generate text with a trained RNN: constant memory and compute per token, streamed as it goes.

    python sample.py                                   # from out/rnn.pt: the RNN alone reads the prompt
    python sample.py --prompt="ROMEO:" --num_tokens=300
    python sample.py --prompt=FILE:prompt.txt --prime=teacher   # the teacher encoder primes the memory (needs ckpt.pt)
    python sample.py --out_dir=out-mnist --num_samples=8   # images: completes held-out digits, out_dir/samples.png
"""
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import smt
from checkpoint import load_checkpoint, load_weights
from cli import UsageError, options_help, parse_overrides, run_cli
from data import StreamDecoder, check_text, encode


@dataclass
class SampleConfig:
    out_dir: str = "out"  # the training run's out_dir
    prompt: str = "\n"  # the text to continue, or FILE:path to read it from a file
    num_samples: int = 2  # texts (or images) generated
    num_tokens: int = 400  # tokens generated per sample
    temperature: float = 0.8  # < 1 sharper, > 1 more random
    top_k: int = 40  # sample among the k most likely tokens; 0 = all
    seed: int = 1337  # the random draws of sampling (and which held-out images prompt)
    device: str = "auto"  # auto | cpu | cuda
    prime: str = "rnn"  # rnn: the RNN reads the prompt from m_empty (needs rnn.pt only) | teacher: encoder primes
    prompt_rows: int = -1  # images: rows of a held-out image given as the prompt (-1: the top half; 0: drawn from the
    #                        empty memory)


def load_model(cfg, device):
    """The RNN (and, for teacher priming, the encoder) rebuilt from the checkpoint's plain config and tensors."""
    name = "ckpt.pt" if cfg.prime == "teacher" else "rnn.pt"
    ckpt = load_checkpoint(Path(cfg.out_dir) / name, "train first (python train.py --out_dir=...)")
    c = ckpt["config"]
    if cfg.prime == "teacher" and not smt.METHODS[c["method"]].teacher:
        raise UsageError(f"--prime=teacher needs a teacher, but {cfg.out_dir} is a {c['method']} run: "
                         "use --prime=rnn")
    vocab_size = ckpt["model"]["rnn_embed.weight"].size(0)
    model = smt.build_model(c, vocab_size, with_encoder=cfg.prime == "teacher")
    load_weights(model, ckpt["model"], Path(cfg.out_dir) / name)
    return model.to(device).eval(), ckpt["meta"]


def sampler(cfg, generator):
    def sample(logits):
        logits = logits.float() / max(cfg.temperature, 1e-6)
        if cfg.top_k > 0:
            kth = torch.topk(logits, min(cfg.top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
    return sample


def write_png(path, pixels):
    """An 8-bit grayscale PNG of a (H, W) uint8 array, with zlib and struct only."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)  # each row: filter type 0 (none), then the pixels
    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 8, 0, 0, 0, 0)  # 8-bit, grayscale
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                           + chunk(b"IEND", b""))


def sample_images(cfg, model, meta, sample, device):
    """Image datasets (pixels in raster order): the RNN completes held-out images from their first prompt_rows rows
    (or, with 0, draws them from the empty memory). Writes out_dir/samples.png, a grid with one sample per row (the
    held-out image, then the completion), and prints the same as text."""
    H, W = meta["image_shape"]
    if cfg.prime == "teacher":
        raise UsageError("--prime=teacher is for text; the RNN completes images from its own reading of the rows")
    if cfg.prompt_rows == -1:
        cfg.prompt_rows = H // 2
    if not 0 <= cfg.prompt_rows < H:
        raise UsageError(f"--prompt_rows must be -1 (half) or between 0 and {H - 1}, not {cfg.prompt_rows}")
    real = torch.zeros(cfg.num_samples, H * W, dtype=torch.long)
    if cfg.prompt_rows:
        val = Path(meta["folder"]) / "val.bin"
        if not val.exists():
            raise UsageError(f"the held-out images are gone from {val}: prepare the dataset again (python prepare.py), "
                             "or draw from scratch with --prompt_rows=0")
        images = np.memmap(val, dtype=np.uint8, mode="r")
        pick = torch.randint(len(images) // (H * W), (cfg.num_samples,),
                             generator=torch.Generator().manual_seed(cfg.seed))
        real = torch.from_numpy(np.stack([images[i * H * W: (i + 1) * H * W] for i in pick.tolist()]).astype(np.int64))
    # a window's first pixel has no target, so no RNN predicts it: it is given (drawing: black, as MNIST's corner is)
    prompt = real[:, : max(1, cfg.prompt_rows * W)].to(device)
    run = smt.rollout(model, model.empty(cfg.num_samples), prompt, sample=sample, num_new=H * W - prompt.size(1))
    made = torch.stack([token for token, _ in run], dim=1).cpu()
    pairs = torch.stack([real, made], dim=1) if cfg.prompt_rows else made[:, None]  # (N, 1 or 2, H * W)
    white = 255 // (meta["vocab_size"] - 1)  # binarized pixels (vocab 2): 0 and 1 become black and white
    pairs = (pairs.view(cfg.num_samples, -1, H, W) * white).to(torch.uint8).numpy()
    shades = " .:-=+*#%@"
    for sample_pixels in pairs:
        for r in range(H):
            print("   ".join("".join(2 * shades[int(p) * len(shades) // 256] for p in img[r]) for img in sample_pixels))
        print()
    gap = 2  # pixels of mid-gray between images
    grid = np.full((len(pairs) * (H + gap) + gap, pairs.shape[1] * (W + gap) + gap), 128, np.uint8)
    for i, sample_pixels in enumerate(pairs):
        for j, img in enumerate(sample_pixels):
            grid[gap + i * (H + gap): gap + i * (H + gap) + H, gap + j * (W + gap): gap + j * (W + gap) + W] = img
    path = Path(cfg.out_dir) / "samples.png"
    zoom = max(1, 112 // H)  # a 28-pixel digit 4x, a 14-pixel one 8x: tiny on screen otherwise
    write_png(path, grid.repeat(zoom, axis=0).repeat(zoom, axis=1))
    print(f"wrote {path}" + (f": held-out images (left) and the RNN's completions of their first {cfg.prompt_rows}"
                             " rows (right)" if cfg.prompt_rows else ": images the RNN drew from its empty memory"))


@torch.no_grad()
def main(argv):
    cfg, given = parse_overrides(SampleConfig(), argv)
    if cfg.prime not in ("rnn", "teacher"):
        raise UsageError(f"--prime must be rnn or teacher, not '{cfg.prime}'")
    for key in ("num_samples", "num_tokens", "temperature"):
        if getattr(cfg, key) <= 0:
            raise UsageError(f"--{key} must be positive, not {getattr(cfg, key)}")
    if cfg.top_k < 0:
        raise UsageError(f"--top_k must be 0 (all tokens) or positive, not {cfg.top_k}")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={cfg.device} but CUDA is not available here; use --device=cpu")
    prompt = cfg.prompt
    if prompt.startswith("FILE:"):
        path = Path(prompt[5:])
        if not path.is_file():
            raise UsageError(f"no prompt file {path}")
        raw = path.read_bytes()
        check_text(f"prompt file {path}", raw)
        prompt = raw.decode("utf-8", errors="replace")
    model, meta = load_model(cfg, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if meta["tokenizer"] == "pixels":
        if "prompt" in given:  # an image run is prompted by rows of a held-out image, not by text
            raise UsageError(f"{cfg.out_dir} is an image run: it takes --prompt_rows, not --prompt")
        sample_images(cfg, model, meta, sampler(cfg, generator), device)
        return
    tokens = torch.tensor(encode(meta, prompt), dtype=torch.long, device=device)
    if cfg.prime == "teacher" and tokens.numel() == 0:
        raise UsageError("--prime=teacher needs a non-empty --prompt")
    if cfg.prime == "teacher" and tokens.numel() > model.encoder.context_len:  # it would silently drop the rest
        raise UsageError(f"--prime=teacher reads at most context_len={model.encoder.context_len} tokens; the prompt "
                         f"has {tokens.numel()}: shorten it or use --prime=rnn (any length)")
    sample = sampler(cfg, generator)
    for i in range(cfg.num_samples):
        if cfg.prime == "teacher":  # the teacher reads the prompt; the RNN goes on from there
            memory = model.memories(tokens[None], torch.tensor([tokens.numel() - 1], device=device))[:, 0]
            run = smt.rollout(model, memory, tokens[None, :0], sample=sample, num_new=cfg.num_tokens)
        else:
            run = smt.rollout(model, model.empty(1), tokens[None], sample=sample, num_new=cfg.num_tokens)
        decoder = StreamDecoder(meta)
        sys.stdout.write(prompt)
        for step, (token, _) in enumerate(run):
            if step >= tokens.numel() or cfg.prime == "teacher":
                sys.stdout.write(decoder.push(token.item()))
                sys.stdout.flush()
        sys.stdout.write("\n" + ("-" * 40 + "\n" if i < cfg.num_samples - 1 else ""))


if __name__ == "__main__":
    run_cli(main, lambda: options_help(SampleConfig, __doc__))
