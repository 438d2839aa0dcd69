"""Prepare a dataset ahead of training (train.py prepares it on first use too); prints where it went and how big.

    python prepare.py shakespeare                        # Shakespeare's bytes
    python prepare.py tinystories --max_bytes=20000000   # the first 20 MB of each TinyStories file
    python prepare.py mnist                              # MNIST as pixels, 784 tokens per image
    python prepare.py mnist5k --image_size=14 --binarize=True   # 5,000 digits, 14x14, black or white (vocab 2)
    python prepare.py notes/ --tokenizer=gpt2            # any text file or folder, as GPT-2 BPE (tiktoken fetches
                                                         # its files on first use)
    python prepare.py retrieval                          # a probe: nothing to prepare; shows one sequence
"""
from cli import options_help, parse_overrides, run_cli
from data import PROBES, TEXT_PROBES, DataConfig, Probe, TextProbe, load_meta, prepare


def main(argv):
    cfg, _ = parse_overrides(DataConfig(), argv, positional="dataset")
    if cfg.dataset in PROBES:
        probe = Probe(cfg, 1)
        x, y = probe.get("train")
        print(f"{cfg.dataset} is generated per batch, nothing to prepare: sequences of {cfg.task_len} tokens, vocab "
              f"{probe.meta['vocab_size']}; one of them:\nx {x[0].tolist()}\ny {y[0].tolist()}")
        return
    if cfg.dataset in TEXT_PROBES:
        x, y = TextProbe(cfg, 1).get("val")
        print(f"{cfg.dataset} is generated per batch, nothing to prepare: bytes, gap {cfg.gap}; one held-out "
              f"episode, its answer in brackets:\n" + "".join(f"[{chr(c)}]" if t >= 0 else chr(c) for c, t in
                                                          zip(x[0].tolist(), [-1] + y[0, :-1].tolist())))
        return
    folder = prepare(cfg)
    meta = load_meta(folder)
    size = sum((folder / f).stat().st_size for f in ("train.bin", "val.bin"))
    print(f"{folder}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, {size / 1e6:.2f} MB, "
          f"vocab {meta['vocab_size']} ({meta['tokenizer']})")


if __name__ == "__main__":
    run_cli(main, lambda: options_help(DataConfig, __doc__))
