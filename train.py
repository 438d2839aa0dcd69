"""Train an RNN with Supervised Memory Training (or BPTT, truncated BPTT, DMT).

    python train.py --method smt                      # SMT on the default dataset (Shakespeare, bytes)
    python train.py --method bptt                     # the baseline: same cell and readout, backprop through time
    python train.py --method dmt --init_from=out      # drift correction of an SMT run's RNN, into --out_dir
    python train.py --init_from=out --out_dir=new     # a fresh RNN on out's teacher (with --freeze=teacher)
    python train.py --init_from=resume                # continue the run in --out_dir

Every knob is a field of config.Config, with its default; set any with --key=value, list them with --help. On CUDA,
for DMT and on a probe some defaults change (config.py; --help shows them) unless you set them. Writes
out_dir/ckpt.pt (everything, for resuming), out_dir/rnn.pt (only what the RNN needs to generate) and
out_dir/log.jsonl (one line per evaluation); an out_dir that holds a run is not written over without --overwrite.
"""
import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

import smt
from checkpoint import RUN_FILES, load_checkpoint, load_weights, save_run
from cli import UsageError, run_cli
from config import ARCH_KEYS, RNN_KEYS, check_config, config_help, known_settings, load_config, with_defaults
from data import DATA_KEYS, PROBES, TEXT_PROBES, Batches, Probe, TextProbe, prepare


def train_len(cfg):
    """Length of one training sequence: the method's, a probe's task, or for SMT on the long-range probe at least
    one whole episode (fact and answer)."""
    if cfg.dataset in PROBES:
        return cfg.task_len
    length = smt.METHODS[cfg.method].seq_len(cfg)
    if cfg.dataset in TEXT_PROBES and cfg.method == "smt":
        return max(length, TextProbe.longest(cfg.gap) + 1)
    return length


def lr_at(cfg, it, elapsed):
    """Linear warmup, then constant or cosine decay to lr/10. The cosine runs over max_iters or time_budget, whichever
    ends the run first: a CPU run stopped by its time budget would otherwise stop before its decay has begun."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    if cfg.time_budget > 0:
        progress = max(progress, min(1.0, elapsed / cfg.time_budget))
    return cfg.lr / 10 + 0.5 * (cfg.lr - cfg.lr / 10) * (1 + math.cos(math.pi * progress))


def restore(cfg, given):
    """For resume: the checkpoint and the run's config, with what the command line gives on top (the architecture
    cannot change). For dmt, or smt on a trained teacher: the SMT run's checkpoint, with its architecture and data
    settings (bar those the command line gives; only the RNN's own shape, RNN_KEYS, may differ, and only for smt)."""
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", f"nothing to resume in --out_dir={cfg.out_dir}",
                               keys=("config", "model", "meta", "optimizer", "iter", "elapsed", "rng"))
        if "method" in given and ckpt["config"]["method"] != cfg.method:
            raise UsageError(f"{cfg.out_dir}/ckpt.pt is a {ckpt['config']['method']} run, not {cfg.method}: "
                             f"pass --method={ckpt['config']['method']} or another --out_dir")
    else:
        ckpt = load_checkpoint(Path(cfg.init_from) / "ckpt.pt", f"--init_from={cfg.init_from} must be the "
                               "out_dir of an SMT run")
        if not smt.METHODS[ckpt["config"]["method"]].teacher:
            raise UsageError(f"--init_from={cfg.init_from} is a {ckpt['config']['method']} run; "
                             f"{cfg.method.upper()} needs a teacher, from an SMT run")
    for key in ARCH_KEYS:
        if key in given and getattr(cfg, key) != ckpt["config"][key] and not (fresh_rnn(cfg) and key in RNN_KEYS):
            raise UsageError(f"--{key}={getattr(cfg, key)} differs from the checkpoint's {ckpt['config'][key]}; "
                             f"the architecture of a run cannot change")
    if cfg.init_from == "resume":  # the same run goes on: its settings, bar what the command line changes
        kept = {k: v for k, v in known_settings(ckpt["config"]).items()
                if k not in given | {"init_from", "out_dir", "overwrite"}}
        return dataclasses.replace(cfg, **kept), ckpt
    arch = {k: ckpt["config"][k] for k in ARCH_KEYS if k not in given}
    if "dataset" not in given or cfg.dataset == ckpt["config"]["dataset"]:  # dmt refines on the SMT run's data,
        arch.update({k: ckpt["config"][k] for k in DATA_KEYS  # bar what the command line changes (older runs lack
                     if k in ckpt["config"] and k not in given})  # newer keys)
    # the defaults that the run's own data call for (a probe's), as load_config would have set them had it known
    return with_defaults(dataclasses.replace(cfg, **arch), given | set(arch)), ckpt


def fresh_rnn(cfg):
    """SMT from another run: a new RNN trained on that run's teacher (encoder and decoder weights taken)."""
    return cfg.method == "smt" and cfg.init_from not in ("scratch", "resume")


def all_reduce_mean(params, numbers):
    """Averages the gradients of `params` and a few `numbers` over all ranks in one collective; returns the numbers.
    Done by hand, once per optimizer step (after the last micro-batch), because the losses call the model's parts,
    not its forward, which DistributedDataParallel would need. Every rank has gradients for the same parameters
    (unused ones, like the linear readout in SMT, have none anywhere)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads] + [torch.tensor(numbers, dtype=grads[0].dtype,
                                                                  device=grads[0].device)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[offset:].tolist()


def warm_up(model, loss_fn, cfg, batches, L, device, autocast):
    """One compiled forward and backward before training, so that compiling is not counted as training time; on a
    batch of its own, torch's random state restored and the gradients discarded. Returns seconds."""
    start = time.time()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x, y = batches.get("train", seq_len=L, generator=torch.Generator().manual_seed(cfg.seed))
        with autocast:
            loss, _ = loss_fn(model, x, y, cfg)
        loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time() - start


def check_out_dir(cfg):
    """Before any work: out_dir must be a folder, and a new run does not go over one already there unless asked."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out_dir={cfg.out_dir} is a file, not a folder: pass another --out_dir")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and cfg.init_from != "resume" and not cfg.overwrite:
        raise UsageError(f"--out_dir={cfg.out_dir} already holds a run ({', '.join(held)}): continue it with "
                         "--init_from=resume, pass another --out_dir, or start afresh over it with --overwrite=True")


def configure(argv):
    """The run's config, checked, and for resume or DMT the checkpoint it starts from."""
    cfg, given = load_config(argv)
    check_config(cfg)
    check_out_dir(cfg)
    ckpt = None
    if cfg.init_from != "scratch":
        cfg, ckpt = restore(cfg, given)
        check_config(cfg)
    if cfg.init_from == "resume":
        check_not_spent(cfg, ckpt)
    return cfg, ckpt


def check_not_spent(cfg, ckpt):
    """A resumed run that has used up its iterations or its time stops here, its files untouched."""
    if ckpt["iter"] >= cfg.max_iters:
        raise UsageError(f"{cfg.out_dir} has done its {ckpt['iter']} iterations (--max_iters={cfg.max_iters}): "
                         "raise --max_iters to train on")
    if 0 < cfg.time_budget <= ckpt["elapsed"]:
        raise UsageError(f"{cfg.out_dir} has trained {ckpt['elapsed']:.0f}s of its --time_budget="
                         f"{cfg.time_budget:g}: raise --time_budget (total seconds, counting those) to train on")


class Trainer:
    """One training run: set up (processes, data, model, optimizer, the state resumed), then train() steps,
    logs, evaluates and checkpoints until max_iters, time_budget, a signal or too many non-finite steps."""

    def __init__(self, cfg, ckpt):
        self.cfg, self.start_iter, self.elapsed_before, self.skipped, self.bad_in_a_row = cfg, 0, 0.0, 0, 0
        self.seen = 0  # training tokens read so far, over all ranks (a GPU race compares methods by it)
        self.method = smt.METHODS[cfg.method]  # its loss, and whether it has (or refines) a teacher
        self.start_processes()
        self.load_data()
        self.build(ckpt)
        if ckpt is not None and cfg.init_from == "resume":
            self.resume(ckpt)
        self.out = Path(cfg.out_dir)
        self.measure_and_compile()
        if self.master:
            self.prepare_out_dir()

    def measure_and_compile(self):
        """FLOPs of one step for the logged MFU (on CUDA, or against a given --peak_flops; a plain CPU run counts
        none and makes no extra step), then torch.compile on CUDA with a warm-up step, timed apart from training."""
        cfg, device, L, loss = self.cfg, self.device, train_len(self.cfg), self.method.loss
        self.peak = smt.peak_flops(cfg.peak_flops, device)
        self.flops = (smt.step_flops(self.model, loss, cfg, self.meta["vocab_size"], L, device, self.autocast)
                      if device.type == "cuda" or self.peak else 0)
        if cfg.compile and device.type == "cuda":
            self.model.compile_parts()
            seconds = warm_up(self.model, loss, cfg, self.batches, L, device, self.autocast)
            if self.master:
                print(f"compiled in {seconds:.1f}s (a warm-up step, not counted as training time)", flush=True)

    def start_processes(self):
        """Under torchrun: one process per GPU (or CPU process), each on its own batches, gradients averaged."""
        cfg = self.cfg
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.master = self.rank == 0  # the one that prints, evaluates and writes
        if self.world > 1:
            if cfg.device.startswith("cuda"):
                cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
                torch.cuda.set_device(cfg.device)
            dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        torch.manual_seed(cfg.seed)  # the same on every rank: the same initial weights
        self.device = torch.device(cfg.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def load_data(self):
        cfg, world = self.cfg, self.world
        if world > 1 and not self.master:
            dist.barrier()  # rank 0 prepares the dataset alone
        self.folder = None if cfg.dataset in PROBES + TEXT_PROBES else prepare(cfg)
        if world > 1 and self.master:
            dist.barrier()
        if self.folder is None:  # a probe: its sequences are generated per batch
            kind = TextProbe if cfg.dataset in TEXT_PROBES else Probe
            self.batches = kind(cfg, cfg.batch_size, cfg.seed, rank=self.rank, device=self.device)
        else:
            self.batches = Batches(self.folder, max(train_len(cfg), 2 * cfg.context_len), cfg.batch_size, cfg.seed,
                                   rank=self.rank, device=self.device)
        self.meta = self.batches.meta

    def build(self, ckpt):
        """The model (with the checkpoint's weights), what of it trains, and the optimizer."""
        cfg, vocab_size = self.cfg, self.meta["vocab_size"]
        model = smt.build_model(dataclasses.asdict(cfg), vocab_size, self.method.teacher).to(self.device)
        if ckpt is not None:
            source = f"{cfg.init_from} (this model: vocab {vocab_size} of {cfg.dataset}, {cfg.method})"
            if fresh_rnn(cfg):  # only the teacher's weights; the RNN (and a linear readout) start afresh
                load_weights(model.encoder, ckpt["model"], source, prefix="encoder.")
                load_weights(model.decoder, ckpt["model"], source, prefix="decoder.")
            else:
                load_weights(model, ckpt["model"], source)
        model.set_act_ckpt(cfg.act_ckpt)
        if self.method.refines:  # DMT: the teacher's memories are its fixed targets
            model.encoder.requires_grad_(False)
        if cfg.freeze == "teacher" and model.encoder is not None:
            model.encoder.requires_grad_(False)
            model.decoder.requires_grad_(False)
        if cfg.freeze == "rnn":
            model.cell.requires_grad_(False)
            model.rnn_embed.requires_grad_(False)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in self.params if p.dim() >= 2], weight_decay=cfg.weight_decay),
                  dict(params=[p for p in self.params if p.dim() < 2], weight_decay=0.0)]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    def resume(self, ckpt):
        """The optimizer, iteration, training seconds and this rank's random streams, where the run stopped."""
        cfg = self.cfg
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError:
            raise UsageError(f"the optimizer state in {cfg.out_dir}/ckpt.pt does not fit this run's trained "
                             "parameters (was --freeze changed?)") from None
        self.start_iter, self.elapsed_before, self.skipped = ckpt["iter"], ckpt["elapsed"], ckpt.get("skipped", 0)
        self.seen = ckpt.get("tokens", 0)
        if self.rank < len(ckpt["rng"]):  # each rank goes on with its own random streams (new ranks start fresh)
            rng = ckpt["rng"][self.rank]
            torch.set_rng_state(rng["torch"])
            self.batches.generator.set_state(rng["batches"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.master:
            left = (f"{max(0.0, cfg.time_budget - self.elapsed_before):.0f}s of --time_budget={cfg.time_budget:g} "
                    "left" if cfg.time_budget > 0 else "no time budget")
            print(f"resuming {cfg.out_dir} at iter {self.start_iter}/{cfg.max_iters}: {self.elapsed_before:.0f}s "
                  f"trained, {left}", flush=True)

    def prepare_out_dir(self):
        """A fresh run (--overwrite) clears the old one; a resumed one drops the evaluations past its checkpoint,
        which it redoes. Then the run's header line."""
        cfg, out = self.cfg, self.out
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        if self.start_iter > 0 and (out / "log.jsonl").exists():
            lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
            (out / "log.jsonl").write_text("".join(line for line in lines if line.endswith("\n")
                                                   and json.loads(line)["iter"] <= self.start_iter))
        n_params = sum(p.numel() for p in self.model.parameters())
        print(f"{cfg.method} on {self.folder or cfg.dataset}, {cfg.device} {cfg.dtype}, {n_params / 1e6:.2f}M "
              f"parameters, memory {cfg.mem_tokens}x{cfg.d_model}, sequences of {train_len(cfg)}, batch "
              f"{cfg.batch_size}x{cfg.grad_accum}" + (f"x{self.world} processes" if self.world > 1 else ""),
              flush=True)

    def train(self):
        """The loop; returns the iteration it ended at and the signal that stopped it (None if none did)."""
        cfg, it = self.cfg, self.start_iter
        refines = self.method.refines
        if refines and it == 0 and self.master:  # the drift before refining, to compare with the drift after
            self.log_eval(0, 0.0, with_drift=True)
        stop = []  # signals received; the loop saves a checkpoint and ends at the next step
        def on_signal(signum, frame):
            stop.append(signum)
            signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
        handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.model.train()
        self.t_start = self.t_last = time.time()
        self.tokens_done = 0
        signalled, last_eval = False, self.elapsed_before
        while it < cfg.max_iters:
            loss, stats, elapsed, out_of_time, signalled = self.step(it, stop)
            it += 1
            if self.master and (it % cfg.log_interval == 0 or it == cfg.max_iters or out_of_time or
                                self.bad_in_a_row):
                self.log_line(it, loss, stats, elapsed)
            if self.bad_in_a_row >= cfg.max_bad_steps:
                break  # without a checkpoint: the last one written holds the last good state
            due = cfg.eval_seconds > 0 and elapsed - last_eval >= cfg.eval_seconds
            if it % cfg.eval_interval == 0 or it == cfg.max_iters or out_of_time or due:
                t_eval, last_eval = time.time(), elapsed
                if self.master:
                    last = it == cfg.max_iters or out_of_time
                    self.log_eval(it, elapsed, with_drift=refines and last)
                self.checkpoint(it, elapsed)
                paused = time.time() - t_eval  # evaluation does not count as training time
                self.t_start, self.t_last = self.t_start + paused, self.t_last + paused
            elif signalled:
                self.checkpoint(it, elapsed)
            if out_of_time or signalled:
                break
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        return it, (stop[0] if stop else signal.SIGTERM) if signalled else None  # another rank's: as SIGTERM

    def step(self, it, stop):
        """One optimizer step over grad_accum micro-batches; a step with a non-finite loss or gradient is skipped.
        Returns the loss, the losses' numbers, the training seconds, and whether time is up or a signal came (on
        any rank: `stop` holds this one's)."""
        cfg = self.cfg
        L = train_len(cfg)
        loss_sum, stats_sum = 0.0, {}
        for _ in range(cfg.grad_accum):
            x, y = self.batches.get("train", seq_len=L)
            with self.autocast:
                loss, stats = self.method.loss(self.model, x, y, cfg)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v / cfg.grad_accum
        elapsed = self.elapsed_before + time.time() - self.t_start
        out_of_time, signalled = cfg.time_budget > 0 and elapsed >= cfg.time_budget, bool(stop)
        if self.world > 1:  # every rank gets the mean gradient, logged numbers and clock, and stops when any must
            loss_sum, *values, elapsed, out_of_time, signalled = all_reduce_mean(
                self.params, [loss_sum, *stats_sum.values(), elapsed, out_of_time, signalled])
            stats_sum = dict(zip(stats_sum, values))
            out_of_time, signalled = out_of_time > 0, signalled > 0
        self.lr = lr_at(cfg, it, elapsed)  # from the clock every rank shares, so that all take the same step
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        # with max_norm=inf, clip_grad_norm_ only measures: the norm tells whether every gradient is finite
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if math.isfinite(loss_sum) and torch.isfinite(norm):
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:  # an overflow or a bad batch must not reach the weights
            self.skipped, self.bad_in_a_row = self.skipped + 1, self.bad_in_a_row + 1
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_done += cfg.batch_size * cfg.grad_accum * L * self.world
        self.seen += cfg.batch_size * cfg.grad_accum * L * self.world
        return loss_sum, stats_sum, elapsed, out_of_time, signalled

    def log_line(self, it, loss, stats, elapsed):
        cfg, now = self.cfg, time.time()
        rate = self.tokens_done / (now - self.t_last)
        eta = (cfg.max_iters - it) * (now - self.t_start) / (it - self.start_iter)
        if cfg.time_budget > 0:
            eta = min(eta, cfg.time_budget - elapsed)
        shown = " ".join(f"{k} {v:.4f}" for k, v in stats.items())
        speed = rate * self.flops / self.world  # FLOP/s of each process
        speed = (f" | MFU {100 * speed / self.peak:.1f}%" if self.peak else f" | {speed / 1e12:.3g} TFLOP/s"
                 if self.flops else "") + (f" | peak mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.1f}"
                                           " GiB" if self.device.type == "cuda" else "")
        last, done = f"{cfg.max_iters}", f"{elapsed:.0f}s"
        if cfg.time_budget > 0:  # the run ends where its time does, if that comes before max_iters: an estimate
            done += f" of {cfg.time_budget:g}s"
            per_second = (it - self.start_iter) / max(elapsed - self.elapsed_before, 1e-9)
            at_end = it + per_second * (cfg.time_budget - elapsed)
            last = f"~{at_end:.0f}" if at_end < cfg.max_iters else last
        print(f"iter {it}/{last} | loss {loss:.4f} | {shown} | lr {self.lr:.2e} | {rate:,.0f} tok/s{speed} | "
              f"{done} | ETA {max(0, eta):.0f}s"
              + (f" | skipped {self.skipped} (non-finite)" if self.skipped else ""), flush=True)
        self.t_last, self.tokens_done = now, 0

    def log_eval(self, it, elapsed, with_drift=False):
        cfg = self.cfg
        stats = smt.evaluate(self.model, cfg, self.batches, self.autocast)
        record = dict(iter=it, elapsed=round(elapsed, 2), tokens=self.seen, **stats, skipped=self.skipped)
        if with_drift:  # dmt: the drift per step over the same held-out window before and after
            x, _ = self.batches.get("val", seq_len=cfg.dmt_steps, generator=torch.Generator().manual_seed(cfg.seed))
            record["drift"] = smt.drift(self.model, x)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " | ".join(f"{k} {v:.4f}" for k, v in stats.items())
        print(f"eval {it}: {shown}", flush=True)

    def checkpoint(self, it, elapsed):
        """Everything an exact resume needs: weights, optimizer, iteration and every rank's random states (torch's,
        which the losses draw from, and the batch sampler's). Called on every rank; rank 0 writes."""
        rng = dict(torch=torch.get_rng_state(), batches=self.batches.generator.get_state())
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs = [rng]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng)
        if self.master:
            save_run(self.out, dataclasses.asdict(self.cfg), self.model, self.meta, iter=it, elapsed=elapsed,
                     optimizer=self.optimizer.state_dict(), skipped=self.skipped, tokens=self.seen, rng=rngs)

    def finish(self, it, signum):
        """Closing words; returns the exit code: 128 + the signal's number if one stopped the run (130 for Ctrl-C,
        as shells expect), else 0."""
        if self.world > 1:
            dist.barrier()  # no rank tears the group down while another still talks to it (gloo can abort the rank)
            dist.destroy_process_group()
        out = self.out
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            kept = f"{out / 'ckpt.pt'} keeps the last good state" if (out / "ckpt.pt").exists() else "no checkpoint yet"
            raise UsageError(f"stopped at iter {it}: {self.bad_in_a_row} steps in a row had a non-finite loss or "
                             f"gradient (skipped); {kept}. Lower --lr (now {self.cfg.lr}) or check the data")
        if self.master and signum:
            print(f"stopped by {signal.Signals(signum).name} at iter {it}: checkpoint in {out / 'ckpt.pt'}; continue "
                  "with --init_from=resume", flush=True)
        elif self.master:
            print(f"done: {it} iterations, checkpoint in {out / 'ckpt.pt'}, RNN for sampling in {out / 'rnn.pt'}")
        return 128 + signum if signum else 0


def main(argv):
    try:
        trainer = Trainer(*configure(argv))
        return trainer.finish(*trainer.train())
    except torch.cuda.OutOfMemoryError:  # most GPUs people own have 24-48 GB: say what lowers memory
        raise UsageError("CUDA out of memory: lower --batch_size (with --grad_accum to keep the batch), set "
                         "--act_ckpt=cell (or all), or shorten --context_len/--future_len/--seq_len") from None


if __name__ == "__main__":
    run_cli(main, lambda: config_help(__doc__))
