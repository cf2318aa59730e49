"""Latent-diffusion training on cached pairs: one loop for the from-scratch UNet and the fine-tunes.

:meth:`Trainer.train_step` is one optimizer update, read top to bottom: draw a latent from its cached
distribution, noise it, drop captions, predict the noise, backpropagate, update, average. :meth:`Trainer.train`
is the step and then, when each is due, the NaN guard, evaluation, logging, a checkpoint and a sample grid.
The step's loss and gradient norm stay on the device until a log, evaluation, checkpoint or sample is due
(at least every ``log_every`` steps): then the steps since the last read are read in one device sync, checked
(a NaN or infinite loss stops the run before anything after it is saved) and every one of them gets its row
in ``metrics.csv``. The trainer only trains: the train stage (:mod:`sd_core.training.stage`) exports the
model from the final checkpoint. Every random draw of
training comes from one generator on the training device, seeded alike in every process (each keeps its
rows of the global batch's draws), whose state each checkpoint saves; each epoch's data order is fixed by
``(seed, epoch)``. A run killed and resumed from its latest checkpoint repeats the uninterrupted run's steps
exactly, and N processes train what one process does at the same global batch.

``accelerate`` places the model, synchronises gradients across processes (``accelerate launch``), runs
mixed precision (bf16, or fp16 with a gradient scaler) on CUDA and feeds the trackers; only the main
process writes files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sd_core.common.optim import adamw
from sd_core.common.config_base import StrictModel
from sd_core.diffusion.models import build_unet, load_trainable_state, noise_scheduler, set_attention, trainable_state
from sd_core.diffusion.schedulers import denoising_sse, min_snr_weights, prediction_target
from sd_core.encode.encoders import TextEncoderConfig, VAEConfig
from sd_core.encode.pairs import Pairs, PairSource, split_ids
from sd_core.training import checkpoint as ckpt
from sd_core.training.config import TrainConfig
from sd_core.training.data import BatchSource
from sd_core.training.ema import EMA
from sd_core.training.lr import CosineLR
from sd_core.training.metrics import MetricsLog, Progress, StepRecord

log = logging.getLogger(__name__)

ImageSampler = Callable[[nn.Module, Sequence[str], Sequence[int], Path], None]
"""Draws a grid of ``prompts`` × ``seeds`` with a UNet and writes it to a PNG path."""
ProgressCallback = Callable[[Progress], None]


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight became NaN or infinite; nothing after the last good checkpoint is kept."""


class EncoderRefs(StrictModel):
    """The encoders the cached pairs came from (a from-scratch export bundles them)."""

    text_encoder: TextEncoderConfig | None = None
    vae: VAEConfig | None = None


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    ema_val_loss: float | None
    checkpoint: Path | None  # the newest checkpoint (the final one when the run is finished; main process)


@dataclass
class StepOutput:
    """What one optimizer update leaves on the device (read back, with the other steps since the last read,
    when a log, evaluation, checkpoint or sample is due)."""

    step: int
    loss: torch.Tensor  # () mean loss over the micro-batches, this process
    grad_norm: torch.Tensor | None  # () gradient norm before clipping (all processes' gradients); None unclipped
    lr: float


@dataclass
class _ValSet:
    """Held-out items in memory with fixed latent draws, noise and timesteps (one row per item × repeat)."""

    pairs: Pairs
    rows: torch.Tensor  # (M,) rows of ``pairs``
    z: torch.Tensor  # (M, C, h, w) latent-sample noise
    noise: torch.Tensor  # (M, C, h, w)
    t: torch.Tensor  # (M,)


def resolve_mixed_precision(requested: str) -> str:
    """What accelerate should run: float32 on the CPU; 'auto' is bf16 where the GPU has it, else fp16."""
    if not torch.cuda.is_available():
        if requested in ("bf16", "fp16"):
            log.info("mixed_precision=%s needs CUDA; training in float32", requested)
        return "no"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def _accelerator(config: TrainConfig, out_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available

    if "tensorboard" in config.trackers and not is_tensorboard_available():
        raise ValueError("train.trackers: tensorboard is not installed (pip install tensorboard)")
    return Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision), cpu=not torch.cuda.is_available(),
                       log_with=list(config.trackers) or None, project_dir=str(out_dir))


class Trainer:
    """ε-prediction training of a UNet on a :class:`~sd_core.encode.pairs.PairSource`, writing into ``out_dir``:
    ``metrics.csv``, ``progress.json``, ``loss_curve.png``, ``checkpoints/`` and ``samples/``."""

    def __init__(
        self,
        config: TrainConfig,
        pairs: PairSource,
        out_dir: Path,
        *,
        encoders: EncoderRefs | None = None,
        sampler: ImageSampler | None = None,
        callbacks: Sequence[ProgressCallback] = (),
        progress: bool = True,
    ) -> None:
        self.config, self.pairs, self.out_dir = config, pairs, Path(out_dir)
        self.encoders = encoders or EncoderRefs()
        self.sampler, self.callbacks, self.progress = sampler, list(callbacks), progress
        acc = self.accelerator = _accelerator(config, self.out_dir)
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device

        self.train_items, self.val_items = split_ids(pairs.ids, config.val_fraction, config.split_seed,
                                                       config.val_min_items)
        self.global_batch = config.batch_size * self.world * config.gradient_accumulation_steps
        if len(self.train_items) < self.global_batch:
            raise ValueError(
                f"the train split has {len(self.train_items)} items, fewer than one batch ({config.batch_size} × "
                f"{self.world} processes × {config.gradient_accumulation_steps} accumulation steps); lower batch_size")
        self.steps_per_epoch = len(self.train_items) // self.global_batch
        self.total_steps = config.steps if config.steps is not None else config.epochs * self.steps_per_epoch
        self.latent_shape: tuple[int, ...] = tuple(pairs.latent_shape)  # (C, h, w)
        self.scaling_factor = float(pairs.scaling_factor)

        unet = build_unet(config.model, sample_size=self.latent_shape[-1], latent_channels=self.latent_shape[0],
                          seed=config.seed, report=acc.print)
        set_attention(unet, config.attention)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = adamw(params, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay)
        self.model, self.optimizer = acc.prepare(unet, optimizer)
        self.noise = noise_scheduler(config.model, config.schedule)
        self.num_timesteps = int(self.noise.config.num_train_timesteps)
        self.ema = EMA(self.net, config.ema_decay, config.ema_warmup)
        self.lr_schedule = CosineLR(config.lr, config.lr_min, self.total_steps, config.warmup_steps)

        self.generator = torch.Generator(device=self.device).manual_seed(config.seed * 1_000_003)
        self.data = BatchSource(pairs, self.train_items, batch_size=config.batch_size, world=self.world,
                                rank=self.rank, accumulation=config.gradient_accumulation_steps, seed=config.seed,
                                memory_bytes=config.data_memory_gb * 1e9, device=self.device)
        self.empty_text = pairs.empty_text.float().to(self.device)  # (T, D)
        self.step = self.epoch = self.position = 0  # position: items of this epoch's order consumed (all processes)
        self.elapsed_s = 0.0
        self._val = self._build_val_set()
        self.last_val: tuple[float | None, float | None] = (None, None)
        self.last_loss: float | None = None

    # --- paths --------------------------------------------------------------------------------------
    @property
    def net(self) -> nn.Module:
        """The UNet without any accelerate / DDP wrapper."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_csv(self) -> Path:
        return self.out_dir / "metrics.csv"

    # --- the step -----------------------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[dict[str, torch.Tensor]]) -> StepOutput:
        """One optimizer update on ``gradient_accumulation_steps`` micro-batches (tensors on the device).

        Returns the loss (the mean over micro-batches, this process only) and the gradient norm as device
        scalars: nothing here waits for the device.
        """
        cfg, g, acc, dev = self.config, self.generator, self.accelerator, self.device
        if not self.net.training:  # held-out loss and sampling switch the UNet to eval (and back)
            self.model.train()
        lr = self.lr_schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=dev)
        for i, batch in enumerate(micro_batches):
            b = batch["mean"].shape[0]
            draw = _RankDraws(g, dev, b, self.world, self.rank)  # this process's slice of the global batch's draws
            # a latent drawn from its cached distribution; mirrored for half the items when mirrors are cached
            mean, std = batch["mean"], batch["std"]  # (B, C, h, w)
            if "mean_flip" in batch:
                flip = (draw.rand() < 0.5)[:, None, None, None]
                mean = torch.where(flip, batch["mean_flip"], mean)
                std = torch.where(flip, batch["std_flip"], std)
            x0 = (mean + std * draw.randn(mean.shape[1:])) * self.scaling_factor
            # noised to random timesteps
            noise = draw.randn(x0.shape[1:])
            if cfg.noise_offset > 0:
                noise = noise + cfg.noise_offset * draw.randn((x0.shape[1], 1, 1))
            t = self._timesteps(draw)
            x_t = self.noise.add_noise(x0, noise, t)
            # caption dropout: the empty prompt's states, what classifier-free guidance samples against
            drop = draw.rand() < cfg.caption_dropout
            text = torch.where(drop[:, None, None], self.empty_text, batch["text"].float())  # (B, T, D)
            # predict the noise (or the velocity); gradients are synchronised across processes on the last
            # micro-batch only
            target = prediction_target(self.noise, x0, noise, t)
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                with acc.autocast():
                    pred = self.model(x_t, t, encoder_hidden_states=text).sample
                per_item = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
                if cfg.min_snr_gamma is not None:
                    per_item = per_item * min_snr_weights(self.noise, t, cfg.min_snr_gamma)
                loss = per_item.mean() / len(micro_batches)
                acc.backward(loss)
            total += loss.detach()
        # the update
        norm = acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip is not None else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step()
        self.step += 1
        return StepOutput(self.step, total, norm, lr)

    def _timesteps(self, draw: _RankDraws) -> torch.Tensor:
        cfg, n = self.config, self.num_timesteps
        if cfg.timestep_sampling == "uniform":
            return draw.randint(n)
        u = draw.density(cfg.timestep_sampling, cfg.timestep_logit_mean, cfg.timestep_logit_std)  # in (0, 1)
        return (u * n).long().clamp_(0, n - 1)

    # --- held-out loss ------------------------------------------------------------------------------
    def _build_val_set(self) -> _ValSet | None:
        if not self.val_items:
            return None
        k, n = self.config.val_repeats, self.num_timesteps
        pairs = self.pairs.load(self.val_items)
        pairs = Pairs(**{**pairs.__dict__, **{name: t.to(self.device) for name, t in pairs.tensors().items()}})
        rows = torch.arange(len(self.val_items)).repeat(k)
        g = torch.Generator().manual_seed(self.config.val_seed)
        shape = (len(rows), *self.latent_shape)
        t = torch.tensor([int((j + 0.5) * n / k) for j in range(k) for _ in self.val_items], dtype=torch.long)
        z, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        return _ValSet(pairs, rows, z.to(self.device), noise.to(self.device), t.to(self.device))

    @torch.no_grad()
    def _val_loss(self) -> float | None:
        v = self._val
        if v is None:
            return None
        net = self.net.eval()
        total, bs = 0.0, max(self.config.batch_size, 1)
        for s in range(0, len(v.rows), bs):
            batch = v.pairs.select(v.rows[s : s + bs])
            x0 = (batch["mean"] + batch["std"] * v.z[s : s + bs]) * self.scaling_factor
            noise, t = v.noise[s : s + bs], v.t[s : s + bs]
            with self.accelerator.autocast():
                total += denoising_sse(net, self.noise, x0, noise, t, batch["text"].float()) / noise[0].numel()
        return total / len(v.rows)

    def evaluate(self) -> tuple[float | None, float | None]:
        """Held-out ε-MSE (v-MSE for v-prediction) of the raw and the EMA weights, at fixed timesteps and noise
        (main process)."""
        if not self.accelerator.is_main_process:
            return self.last_val
        raw = self._val_loss()
        with self.ema.swapped_in():
            ema = self._val_loss()
        self.last_val = (raw, ema)
        return raw, ema

    # --- state --------------------------------------------------------------------------------------
    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {"trainer": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                states[f"cuda{i}"] = s
        return states

    def _load_rng_states(self, states: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(states["trainer"])
        torch.set_rng_state(states["torch_cpu"])
        cuda = [states[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in states]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step, "epoch": self.epoch, "position": self.position, "data_seed": self.config.seed,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "num_processes": self.world, "ema_updates": self.ema.optimization_step, "elapsed_s": self.elapsed_s,
            "scaling_factor": self.scaling_factor, "latent_shape": list(self.latent_shape),
            "encoders": self.encoders.model_dump(mode="json"),
        }

    def check_finite_weights(self) -> None:
        for name, p in self.net.named_parameters():
            if p.requires_grad and not torch.isfinite(p).all():
                raise NonFiniteError(f"weight {name} is not finite at step {self.step}; the run stopped and "
                                     "nothing from it is saved or exported")

    def save(self) -> Path:
        """Write ``checkpoints/checkpoint-{step}`` (every process adds its RNG state; main the rest)."""
        acc, root = self.accelerator, self.checkpoint_root
        self.check_finite_weights()
        if acc.is_main_process:
            ckpt.begin_checkpoint(root, self.step)
        acc.wait_for_everyone()
        tmp = ckpt.staging_folder(root, self.step)
        ckpt.write_rng(tmp, self.rank, self._rng_states())
        acc.wait_for_everyone()
        folder = root / ckpt.checkpoint_name(self.step)
        if acc.is_main_process:
            ckpt.write_checkpoint_files(
                tmp, config=self.config.model_dump(mode="json"), model=trainable_state(self.net),
                ema=self.ema.shadow_state(), optimizer=self.optimizer.state_dict(),
                scheduler=self.lr_schedule.state_dict(self.step), trainer_state=self.trainer_state(),
            )
            folder = ckpt.commit_checkpoint(root, self.step, self.config.keep_last)
        acc.wait_for_everyone()
        return folder

    def load(self, folder: Path) -> None:
        """Restore model, EMA, optimizer, data position and RNG from a checkpoint folder."""
        c = ckpt.load_checkpoint(folder)
        st = c.trainer_state
        mine = self.config.model_dump(mode="json")
        for key in ("model", "schedule"):
            if c.config.get(key) != mine[key]:
                raise ValueError(f"{folder} was trained with another {key} config: {c.config.get(key)} != {mine[key]}")
        if (c.config.get("steps"), c.config.get("epochs")) != (mine["steps"], mine["epochs"]):
            log.info("resuming %s (planned for %s steps) to %s steps", folder, c.config.get("steps") or
                     f"{c.config.get('epochs')} epochs of", self.total_steps)
        if changed := sorted(k for k in mine if c.config.get(k) != mine[k] and k not in ("steps", "epochs")):
            log.warning("resuming %s with changed run settings %s: steps after this differ from the original run",
                        folder, changed)
        if st["num_processes"] != self.world:
            raise ValueError(f"{folder} was written by {st['num_processes']} processes, this run has {self.world}")
        if st["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"{folder}: the data set changed ({st['steps_per_epoch']} → {self.steps_per_epoch} "
                             "steps/epoch)")
        load_trainable_state(self.net, {n: v.to(self.device) for n, v in c.model.items()})
        self.ema.load_shadow_state({n: v.to(self.device) for n, v in (c.ema or {}).items()}, st["ema_updates"])
        assert c.optimizer is not None
        self.optimizer.load_state_dict(c.optimizer)
        self._load_rng_states(c.rng(self.rank))
        self.step, self.epoch, self.position = st["step"], st["epoch"], st["position"]
        self.elapsed_s = float(st["elapsed_s"])

    def init_from(self, folder: Path, *, ema: str = "adapt") -> None:
        """Start from another run's weights (model and EMA of a checkpoint folder), e.g. to continue training
        on a grown data set; optimizer, LR schedule and data position start fresh. ``ema``: ``rewarm`` restarts
        the EMA's warm-up, ``adapt`` caps its decay at ``1 - 3 / total_steps``, ``keep`` carries it on."""
        c = ckpt.load_checkpoint(folder)
        if c.config["model"] != self.config.model_dump(mode="json")["model"]:
            raise ValueError(f"{folder} holds another model config; cannot continue from it")
        load_trainable_state(self.net, {n: v.to(self.device) for n, v in c.model.items()})
        updates = int(c.trainer_state.get("ema_updates", 0)) if ema in ("keep", "adapt") else 0
        self.ema.load_shadow_state({n: v.to(self.device) for n, v in (c.ema or c.model).items()}, updates)
        if ema == "adapt":
            self.adapt_ema()
        self.accelerator.print(f"initialised from {folder} (step {c.step}; EMA {ema}, decay {self.ema.decay:g})")

    def adapt_ema(self) -> None:
        """Cap the EMA decay at ``1 - 3 / total_steps``: after this (short) run the weights it started from
        are at most e⁻³ ≈ 5 % of the average, and the average still spans a third of the run."""
        self.ema.decay = min(self.config.ema_decay, 1.0 - 3.0 / max(self.total_steps, 6))

    def resume_latest(self) -> bool:
        """Load the newest usable checkpoint (a damaged one is moved aside with a warning naming the file and
        the previous one is used); True when a checkpoint was loaded."""
        if self.accelerator.is_main_process:  # only the main process moves damaged checkpoints aside
            ckpt.usable_checkpoint(self.checkpoint_root, log)
        self.accelerator.wait_for_everyone()
        folder = ckpt.usable_checkpoint(self.checkpoint_root, move_aside=False)
        if folder is None:
            return False
        self.load(folder)
        self.accelerator.print(f"resumed from {folder} (step {self.step})")
        return True

    # --- the loop -----------------------------------------------------------------------------------
    def train(self, *, resume: bool = False, until_step: int | None = None) -> TrainResult:
        """Train to ``total_steps`` (or stop early at ``until_step``, saving there).

        With ``resume=True`` training continues from the latest checkpoint exactly where it was.
        """
        cfg, acc = self.config, self.accelerator
        resumed = self.resume_latest() if resume else False
        if not resume and ckpt.list_checkpoints(self.checkpoint_root):
            raise FileExistsError(f"{self.checkpoint_root} holds checkpoints of an earlier run: pass resume=True "
                                  "or use a new out_dir")
        metrics = MetricsLog(self.metrics_csv, keep_until=self.step if resumed else None) if acc.is_main_process else None
        if acc.log_with:
            acc.init_trackers("emoji-sd", config=_flat(cfg.model_dump(mode="json")))
        stop = self.total_steps if until_step is None else min(until_step, self.total_steps)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.progress and acc.is_main_process))
        batches = self.data.batches(self.epoch, self.position)
        folder: Path | None = None
        unread: list[StepOutput] = []  # steps whose loss is still on the device
        start, seconds_before = time.perf_counter(), self.elapsed_s
        try:
            while self.step < stop:
                micro = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
                unread.append(self.train_step([m.tensors for m in micro]))
                self.epoch, self.position = micro[-1].epoch, micro[-1].position
                bar.update(1)
                evaluate = self._val is not None and (self.step % cfg.val_every == 0 or self.step == self.total_steps)
                save = self.step % cfg.save_every == 0 or self.step == stop
                sample = cfg.sample_every is not None and self.step % cfg.sample_every == 0
                if evaluate or save or sample or self.step % cfg.log_every == 0 or self.step == stop:
                    done, unread = self.read(unread), []  # one device sync for the steps since the last read
                    self.stop_if_not_finite(done)  # the NaN guard: nothing after a bad step is logged or saved
                    val = self.evaluate() if evaluate else None
                    self.elapsed_s = seconds_before + time.perf_counter() - start
                    self.log(done, val, metrics, bar)
                if save:
                    folder = self.save()
                if sample:
                    self._sample()
        finally:
            batches.close()
            bar.close()
        self.elapsed_s = seconds_before + time.perf_counter() - start
        if folder is None and acc.is_main_process:
            folder = ckpt.latest_checkpoint(self.checkpoint_root)
        if self.step >= self.total_steps and metrics is not None:
            metrics.plot(self.out_dir / "loss_curve.png")
        if acc.log_with:
            acc.end_training()
        return TrainResult(self.step, self.last_loss, self.last_val[0], self.last_val[1], folder)

    def read(self, steps: Sequence[StepOutput]) -> list[StepRecord]:
        """The losses (averaged over the processes) and gradient norms of ``steps``, read from the device in one
        sync (every process calls this at the same steps)."""
        losses = self.accelerator.reduce(torch.stack([s.loss.float() for s in steps]), reduction="mean")  # (N,)
        norms = [s.grad_norm for s in steps]
        if all(n is not None for n in norms):
            losses, read_norms = torch.stack([losses, torch.stack(norms).float()]).tolist()  # type: ignore[arg-type]
        else:
            losses, read_norms = losses.tolist(), [None] * len(steps)
        return [StepRecord(s.step, loss, norm, s.lr) for s, loss, norm in zip(steps, losses, read_norms)]

    def stop_if_not_finite(self, steps: Sequence[StepRecord]) -> None:
        """The NaN guard: a NaN or infinite loss, or gradient norm, stops the run (raises
        :class:`NonFiniteError`) before that step is logged, evaluated or saved. Under fp16 an infinite gradient
        norm is the gradient scaler's business (it skips the update and lowers its scale)."""
        fp16 = self.accelerator.mixed_precision == "fp16"
        for r in steps:
            if not math.isfinite(r.loss):
                raise NonFiniteError(f"the training loss is {r.loss} at step {r.step}; the run stopped and nothing "
                                     "after the last checkpoint is saved or exported")
            if r.grad_norm is not None and not math.isfinite(r.grad_norm) and not fp16:
                raise NonFiniteError(f"the gradient norm is {r.grad_norm} at step {r.step}; the run stopped and "
                                     "nothing after the last checkpoint is saved or exported")

    def log(self, steps: Sequence[StepRecord], val: tuple[float | None, float | None] | None,
            metrics: MetricsLog | None, bar: Any) -> None:
        """Record the steps just read: a row each in ``metrics.csv`` and a point each for the trackers (the
        held-out losses on the last), and one report of their mean loss to the progress bar,
        ``progress.json`` and the callbacks."""
        acc, last = self.accelerator, steps[-1]
        loss = sum(r.loss for r in steps) / len(steps)
        self.last_loss = loss
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{last.lr:.2e}")
        if metrics is not None:
            metrics.write(steps, val=val, seconds=self.elapsed_s)
            if val is not None:  # no held-out split: no held-out point, no replot of the curve
                metrics.plot(self.out_dir / "loss_curve.png")
        if acc.log_with:
            for r in steps:
                values = {"train/loss": r.loss, "train/lr": r.lr}
                if val is not None and r is last:
                    values.update({"val/loss": val[0], "val/ema_loss": val[1]})
                acc.log({k: v for k, v in values.items() if v is not None}, step=r.step)
        report = Progress(self.step, self.total_steps, loss, last.lr, self.elapsed_s,
                          *(val if val is not None else (None, None)))
        if metrics is not None:
            metrics.progress(report, self.out_dir / "progress.json")
        for callback in self.callbacks:
            callback(report)

    def _sample(self) -> None:
        acc = self.accelerator
        if self.sampler is not None and acc.is_main_process:
            out = self.out_dir / "samples" / f"step-{self.step:07d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            was_training = self.net.training
            with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))), self.ema.swapped_in():
                self.sampler(self.net.eval(), self.config.sample_prompts, self.config.sample_seeds, out)
            self.net.train(was_training)
            if acc.log_with:
                import numpy as np
                from PIL import Image

                for tracker in acc.trackers:
                    if hasattr(tracker, "log_images"):
                        tracker.log_images({"samples": np.asarray(Image.open(out).convert("RGB"))}, step=self.step,
                                           dataformats="HWC")
        acc.wait_for_everyone()


class _RankDraws:
    """Random draws for the global batch (every process draws them all, from the same generator state) of
    which this process keeps its rows: N processes draw exactly what one process does at the same global
    batch, so their runs agree up to floating-point summation order."""

    def __init__(self, generator: torch.Generator, device: torch.device, batch: int, world: int, rank: int) -> None:
        self.g, self.dev, self.n = generator, device, batch * world
        self.rows = slice(rank * batch, (rank + 1) * batch)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn((self.n, *shape), generator=self.g, device=self.dev)[self.rows]

    def rand(self) -> torch.Tensor:
        return torch.rand(self.n, generator=self.g, device=self.dev)[self.rows]

    def randint(self, high: int) -> torch.Tensor:
        return torch.randint(0, high, (self.n,), generator=self.g, device=self.dev)[self.rows]

    def density(self, scheme: str, mean: float, std: float) -> torch.Tensor:
        """Draws in (0, 1) from diffusers' timestep densities (``logit_normal``: sigmoid of a normal)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(scheme, self.n, logit_mean=mean, logit_std=std, device=self.dev,
                                                  generator=self.g)
        return u[self.rows]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → flat ``a/b`` keys of scalars (what trackers accept as hyperparameters)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out
