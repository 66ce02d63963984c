"""The training loop: AdamW with warmup + cosine, loop-count sampling, per-iteration or final
loss, periodic held-out evaluation at several loop counts, TensorBoard, atomic checkpoints.
Data-parallel over torchrun processes (DDP or FSDP2) when given a DistEnv with world size > 1;
see looped.training.distributed for what keeps that identical to a 1-rank run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from looped.data import IGNORE, build_task
from looped.errors import ConfigError, NonFiniteError
from looped.model import LoopedLM
from looped.model.exit import build_exit, relative_change
from looped.model.kernels import check_kernel
from looped.model.parallelize import apply_activation_checkpointing, apply_compile
from looped.training.device import autocast, pick_device
from looped.training.flops import train_flops_per_token
from looped.training.checkpoint import (METRICS_FILE, CheckpointError, load_sharded, load_state,
                                        load_weights, resolve_checkpoint, save_checkpoint,
                                        save_run_config)
from looped.training.distributed import (DistEnv, FullStateView, all_reduce_sum, barrier,
                                         check_parallel, full_model_state, full_optimizer_state,
                                         is_fsdp, load_optimizer_state, local_batch_size,
                                         loss_weight, setup, shard_batch, to_float, wrap_model)
from looped.training.loop_sampling import sample_loops, step_generator
from looped.training.losses import Step, build_objective
from looped.training.optim import build_optimizer, lr_at
from looped.training.scoring import check_fits, eval_loops, level_task, score_grid, task_accuracy
from looped.training.sharded_checkpoint import PendingSave, save_sharded
from looped.training.throughput import ThroughputMeter, device_peak

DATA_STREAM = 7919  # keeps the data's per-step seeds apart from the loop sampler's
OBJECTIVE_STREAM = 104729  # and the objective's own draws (the progressive loss's n, k)
DIAGNOSTIC_ROWS = 64  # held-out rows the depth-weight diagnostics read at each evaluation


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Trainer:
    def __init__(self, cfg, run_dir: Path, env: Optional[DistEnv] = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.env = env or DistEnv()
        # every user error is raised here before any process group exists, on every rank
        check_parallel(cfg.train.parallel)
        rows = local_batch_size(cfg.train.batch_size, self.env)
        micro = cfg.train.micro_batch_size
        if micro and rows % micro:
            raise ConfigError(f"train.micro_batch_size={micro} must divide each rank's batch "
                              f"of {rows} rows (train.batch_size / world size)")
        self.task = build_task(cfg.task)
        self.eval_task = build_task(cfg.task, split="eval")  # may be harder than training
        m = cfg.model
        for task in (self.task, self.eval_task):
            if task.vocab_size > m.vocab_size:
                raise ConfigError(f"task '{cfg.task.name}' needs model.vocab_size >= "
                                  f"{task.vocab_size}, got {m.vocab_size}")
            if task.seq_len > m.max_seq_len:
                raise ConfigError(f"task '{cfg.task.name}' makes sequences of {task.seq_len} "
                                  f"tokens; model.max_seq_len is {m.max_seq_len}")
        grid = cfg.eval.grid  # the difficulty x R grid scored after training
        self.grid_tasks = {level: level_task(cfg.task, grid.knob, level, " (eval.grid.knob)")
                           for level in grid.levels}
        for level, task in self.grid_tasks.items():
            check_fits(task, m, f"eval.grid {grid.knob}={level}")
        self.device = pick_device(cfg.device, self.env.local_rank if self.env.enabled else None)
        check_kernel(m.kernel, self.device)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = LoopedLM(cfg.model, loop=cfg.loop).to(self.device)
        apply_activation_checkpointing(self.model, cfg.train.activation_checkpointing)
        if cfg.train.compile:  # per block, so that a new R does not recompile
            apply_compile(self.model)
        # what training forwards run through: the model, DDP around it, or it sharded by FSDP
        self.train_model = self.model
        if self.env.enabled:
            setup(self.env, self.device)
            self.train_model = wrap_model(self.model, self.env, cfg.train.parallel, self.device)
        self.autocast = autocast(self.device)  # bf16 on GPU; CPU trains in fp32
        self.fsdp = is_fsdp(self.model)
        self.opt = build_optimizer(self.model, cfg.train)  # decay on weight matrices only
        self.exit = build_exit(cfg.exit)
        self.objective = build_objective(cfg.train.objective)
        self.row_loops = cfg.train.loop_sampling.sampler == "task"
        if self.row_loops and self.task.sample(1, torch.Generator().manual_seed(0)).loops is None:
            raise ConfigError(f"train.loop_sampling.sampler=task, but task '{cfg.task.name}' as "
                              f"configured gives no per-row loop counts (see its knobs)")
        self.step = 0
        self.skipped = 0  # steps skipped for a non-finite loss or gradient
        self.last_checkpoint: Optional[Path] = None
        self.pending_save: Optional[PendingSave] = None  # an asynchronous checkpoint in flight
        self._ckpt_group = None
        self.history: list[dict] = []  # one row per optimizer step: step, loss, loops
        self.forwards: list[tuple[int, Optional[int]]] = []  # this step's (R, grad_loops)
        self._flops_cache: dict[tuple, float] = {}

    # -- state -------------------------------------------------------------------------------

    @property
    def evaluates(self) -> bool:
        """Whether this rank runs evaluation: rank 0, or every rank under FSDP (whose forwards
        are collectives)."""
        return self.env.is_main or self.fsdp

    def start_run_dir(self) -> None:
        if not self.env.is_main:
            return
        save_run_config(self.run_dir, self.cfg)
        meta = {"git_commit": git_commit(), "seed": self.cfg.seed}
        (self.run_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    def save(self) -> Optional[Path]:
        """Write a checkpoint: every rank must call this. Full format: gathered onto rank 0,
        which writes it (None elsewhere). Sharded: every rank writes its shards; with
        async_checkpoint the write goes on in the background and the previous one is
        published here (or by `wait_for_checkpoint`), so what is returned is the newest
        checkpoint that is complete."""
        t = self.cfg.train
        if t.checkpoint_format == "sharded":
            done = self.wait_for_checkpoint()
            state = {"step": self.step, "skipped": self.skipped,
                     "torch_rng": torch.get_rng_state(), "history": list(self.history)}
            out = save_sharded(self.run_dir, self.step, self.model, self.opt, state,
                               keep=t.keep_checkpoints, is_main=self.env.is_main,
                               async_save=t.async_checkpoint,
                               process_group=self._checkpoint_group())
            if isinstance(out, PendingSave):
                self.pending_save = out
                return done
            return out
        model = self.model
        if self.fsdp:
            model = FullStateView(self.model, full_model_state(self.model))
        optimizer = full_optimizer_state(self.model, self.opt)
        if not self.env.is_main:
            return None
        state = {"step": self.step, "optimizer": optimizer, "skipped": self.skipped,
                 "torch_rng": torch.get_rng_state(), "history": self.history}
        return save_checkpoint(self.run_dir, self.step, model, state,
                               keep=self.cfg.train.keep_checkpoints)

    def wait_for_checkpoint(self) -> Optional[Path]:
        """Finish an asynchronous save in flight (every rank); its directory on rank 0."""
        pending, self.pending_save = self.pending_save, None
        return pending.wait() if pending is not None else None

    def _checkpoint_group(self):
        """Background saves talk over a gloo group of their own, so that their collectives do
        not interleave with training's (NCCL on GPUs)."""
        if not (self.cfg.train.async_checkpoint and self.env.enabled):
            return None
        if self._ckpt_group is None:
            self._ckpt_group = torch.distributed.new_group(backend="gloo")
        return self._ckpt_group

    def resume(self, path: Optional[Path] = None) -> Path:
        """Load a checkpoint (every rank reads it; any parallelism may have written it)."""
        ckpt = resolve_checkpoint(path or self.run_dir)
        state = load_state(ckpt)
        if "optimizer" not in state:  # sharded: weights and optimizer resharded to these ranks
            load_sharded(ckpt, self.model, self.opt)
            return self._restore(state, ckpt)
        load_weights(FullStateView(self.model) if self.fsdp else self.model, ckpt)
        saved_groups = len(state["optimizer"].get("param_groups", ()))
        if saved_groups != len(self.opt.param_groups):
            raise CheckpointError(
                f"{ckpt}: its optimizer state has {saved_groups} parameter group(s), this "
                f"version's recipe has {len(self.opt.param_groups)} (weight decay on weight "
                f"matrices only); it was written by an older looped: start a new run")
        load_optimizer_state(self.model, self.opt, state["optimizer"])
        return self._restore(state, ckpt)

    def _restore(self, state: dict, ckpt: Path) -> Path:
        torch.set_rng_state(state["torch_rng"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self.skipped = int(state.get("skipped", 0))  # absent in checkpoints of older versions
        return ckpt

    # -- steps -------------------------------------------------------------------------------

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, cfg.train)
        # every rank draws the whole global batch and keeps its own rows
        batch = self.task.sample(cfg.train.batch_size,
                                 step_generator(cfg.seed + DATA_STREAM, step))
        local = shard_batch(batch, self.env).to(self.device)
        loops = sample_loops(cfg.train.loop_sampling, cfg.loop, cfg.seed, step)
        if self.row_loops:  # rows that finish early freeze, as exited tokens do
            loops = int(batch.loops.max())
        # each micro-batch's mean loss, weighted by its share of the global batch's answer
        # tokens, so the accumulated gradient is that of the global mean (DDP / FSDP average
        # the ranks' gradients; loss_weight scales by the world size to undo that average)
        n_global = int((batch.targets != IGNORE).sum())
        self.forwards: list[tuple[int, Optional[int]]] = []
        self.opt.zero_grad(set_to_none=True)
        value = torch.zeros((), device=self.device)
        micro = self._micro_batches(local)
        for i, part in enumerate(micro):
            weight = loss_weight(int((part.targets != IGNORE).sum()), n_global, self.env)
            with self._gradient_sync(last=i == len(micro) - 1):
                loss = self._loss(part, loops, step)
                (loss * weight).backward()
            value += loss.detach() * (weight / self.env.world_size)
        value = all_reduce_sum(value).item()
        clip = cfg.train.grad_clip or float("inf")
        grad_norm = to_float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        # the same on every rank: the loss is all-reduced and the gradients are synchronised
        if not (math.isfinite(value) and math.isfinite(grad_norm)):
            self.opt.zero_grad(set_to_none=True)
            if not cfg.train.skip_nonfinite:
                raise NonFiniteError(
                    f"non-finite loss ({value}) or gradient norm ({grad_norm}) at step "
                    f"{step + 1}; stopped before updating the weights; last good checkpoint: "
                    f"{self.last_checkpoint or 'none yet'} (train.skip_nonfinite=true skips such "
                    f"steps)")
            self.skipped += 1
        else:
            self.opt.step()
        self.step += 1
        row = {"step": self.step, "loss": value, "loops": loops, "lr": lr_at(step, cfg.train),
               "grad_norm": grad_norm, "tokens": batch.inputs.numel(), "skipped": self.skipped,
               "flops": self._step_flops(batch.inputs.shape, len(micro))}
        self.history.append({k: row[k] for k in ("step", "loss", "loops")})
        return row

    def _step_flops(self, shape: torch.Size, n_micro: int) -> float:
        """Model FLOPs of the step's global batch: every micro-batch runs the same forwards."""
        rows, context = shape
        per_token = 0.0
        for r, grad_loops in self.forwards[:len(self.forwards) // n_micro]:
            key = (r, grad_loops, context)
            if key not in self._flops_cache:
                self._flops_cache[key] = train_flops_per_token(self.model, r, grad_loops, context)
            per_token += self._flops_cache[key]
        return per_token * rows * context

    def _micro_batches(self, local) -> list:
        size = self.cfg.train.micro_batch_size or local.inputs.shape[0]
        return [local.rows(lo, lo + size) for lo in range(0, local.inputs.shape[0], size)]

    def _loss(self, part, loops: int, step: int) -> torch.Tensor:
        """The objective's loss on some rows of the step's batch (a micro-batch). Its random
        draws (the progressive loss's n, k) are seeded by (seed, step): one draw per step,
        whatever the micro-batching."""
        cfg = self.cfg
        row_loops = part.loops if self.row_loops else None

        # DDP wraps the whole loss (distributed.LossForward), around the plain model
        ddp = self.train_model is not self.model and not self.fsdp
        model = self.model if ddp else self.train_model

        def forward(r: int, grad_loops: Optional[int]):
            grad_loops = grad_loops or cfg.train.grad_loops or None
            self.forwards.append((r, grad_loops))  # for the step's FLOPs
            # logits=False: the losses run the head in chunks, never holding (B, T, vocab)
            return model(part.inputs, loops=r, row_loops=row_loops, grad_loops=grad_loops,
                         return_states=True, logits=False)

        def loss() -> torch.Tensor:
            return self.objective(Step(self.model, forward, part, loops,
                                       step_generator(cfg.seed + OBJECTIVE_STREAM, step),
                                       cfg.train.gate_beta))

        with self.autocast:
            return self.train_model(loss) if ddp else loss()

    def _gradient_sync(self, last: bool):
        """Gradients are all-reduced after the last micro-batch only (DDP's no_sync; FSDP2
        reduce-scatters every backward, which sums the same gradients)."""
        if last or not hasattr(self.train_model, "no_sync"):
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def evaluate(self, loops: list[int]) -> dict[int, dict[str, float]]:
        """Held-out accuracy per loop count; {} on ranks that do not evaluate (see
        `evaluates`)."""
        if not self.evaluates:
            return {}
        ev = self.cfg.eval
        return {r: task_accuracy(self.model, self.eval_task, r, ev.n_samples, ev.batch_size,
                                 self.cfg.seed, exit=self.exit)
                for r in self.model.runnable_loops(loops)}

    def evaluate_grid(self, loops: list[int]) -> dict:
        """eval.grid's cells {level: {R: metrics}}; {} without a grid or where this rank does
        not evaluate."""
        if not (self.grid_tasks and self.evaluates):
            return {}
        ev = self.cfg.eval
        return score_grid(self.model, self.grid_tasks, self.model.runnable_loops(loops),
                          ev.grid.n_samples, ev.batch_size, self.cfg.seed, exit=self.exit)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, object]:
        """On one held-out batch, per depth position with earlier sources: the depth
        attention's entropy (nats) and the mean weight a position puts on its own value (1 would
        be vanilla: Depth-Attention collapsed); and the per-iteration residual."""
        self.model.eval()
        batch = self.eval_task.sample(DIAGNOSTIC_ROWS, torch.Generator().manual_seed(self.cfg.seed))
        out = self.model(batch.inputs.to(self.device), return_states=True,
                         return_depth_weights=True)
        self.model.train()
        mixing = {p: w.weights for p, w in out.depth_weights.items() if w.weights.shape[-1] > 1}
        entropy = {p: float(-(w * w.clamp_min(1e-12).log()).sum(-1).mean())
                   for p, w in mixing.items()}
        self_weight = {p: float(w[..., -1].mean()) for p, w in mixing.items()}  # self is last
        residual = [float(relative_change(b, a).mean())
                    for a, b in zip(out.states[:-1], out.states[1:])]
        return {"depth_entropy": entropy, "depth_self_weight": self_weight, "residual": residual}

    def _append_metrics(self, results, diag) -> None:
        """One JSON line per evaluation in <run>/metrics.jsonl: the learning curves a study
        reads. A resumed run may repeat a step; readers keep the last line of each step."""
        # train_loss: the mean over the steps since the previous evaluation
        since = [h["loss"] for h in self.history
                 if h["step"] > self.step - self.cfg.train.eval_every]
        row = {"step": self.step, "train_loss": sum(since) / len(since) if since else None,
               "eval": {str(r): res for r, res in results.items()},
               "depth_entropy": {str(p): h for p, h in diag["depth_entropy"].items()},
               "depth_self_weight": {str(p): w for p, w in diag["depth_self_weight"].items()}}
        with open(self.run_dir / METRICS_FILE, "ab+") as f:  # appends, whatever the position
            # a kill mid-write can leave a cut last line; start on a fresh one (reads 1 byte)
            cut = False
            if f.seek(0, os.SEEK_END):
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
            f.write((b"\n" if cut else b"") + json.dumps(row).encode() + b"\n")

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, writer: SummaryWriter, log=print) -> dict[int, dict[str, float]]:
        cfg = self.cfg
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=None if self.env.is_main else True)
        peak, peak_source = device_peak(self.device)
        if self.env.is_main:
            log(f"MFU against {'an unknown peak' if peak is None else f'{peak / 1e12:.3g} TFLOP/s'}"
                f" per device ({peak_source})")
        meter = ThroughputMeter(peak, self.env.world_size)
        tok_s = mfu = None
        results: dict[int, dict[str, float]] = {}
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            row = self.train_step()  # ends in .item() calls: the device has finished the step
            meter.add(time.perf_counter() - t0, row["tokens"], row["flops"])
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", R=row["loops"])
            for key in ("loss", "lr", "grad_norm", "loops", "skipped"):
                writer.add_scalar(f"train/{key}", row[key], self.step)
            if self.step % cfg.train.log_every == 0:
                tok_s, mfu = meter.read()  # over the training steps since the last line
                if tok_s is not None:
                    writer.add_scalar("train/tokens_per_s", tok_s, self.step)
                if mfu is not None:
                    writer.add_scalar("train/mfu", mfu, self.step)
                speed = "" if tok_s is None else f"  {tok_s:.0f} tok/s"
                speed += meter.describe(mfu)
                log(f"step {self.step:5d}  loss {row['loss']:.6f}  R {row['loops']:2d}  "
                    f"lr {row['lr']:.2e}{speed}"
                    + (f"  skipped {self.skipped}" if self.skipped else ""))
            if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps:
                results = self.evaluate(eval_loops(cfg))
                if self.evaluates:
                    self._log_eval(writer, results, log)
                self.last_checkpoint = self.save() or self.last_checkpoint
                barrier()  # under DDP the other ranks wait here for rank 0
        bar.close()
        return results

    def _log_eval(self, writer: SummaryWriter, results, log) -> None:
        for r, res in results.items():
            for key, value in res.items():  # accuracy, iterations (+ loss, bits_per_byte, ...)
                writer.add_scalar(f"eval/{key}_R{r}", value, self.step)
        diag = self.diagnostics()
        for p, h in diag["depth_entropy"].items():
            writer.add_scalar(f"depth_entropy/pos{p:03d}", h, self.step)
        for p, w in diag["depth_self_weight"].items():
            writer.add_scalar(f"depth_self_weight/pos{p:03d}", w, self.step)
        if self.env.is_main:  # under FSDP every rank evaluates; one writes
            self._append_metrics(results, diag)
        for r, res in enumerate(diag["residual"], start=2):
            writer.add_scalar(f"residual/iter{r:02d}", res, self.step)
        if self.exit is not None:
            batch = self.eval_task.sample(256, torch.Generator().manual_seed(self.cfg.seed + 1))
            with torch.no_grad():
                its = self.model(batch.inputs.to(self.device), exit=self.exit).iterations
            writer.add_histogram("exit/iterations", its.flatten(), self.step)
        accs = "  ".join(f"R={r}:{res['accuracy']:.3f}" + (f" ({res['bits_per_byte']:.3f} bpb)"
                                                           if "bits_per_byte" in res else "")
                         for r, res in results.items())
        log(f"eval @ step {self.step}: {accs}")
