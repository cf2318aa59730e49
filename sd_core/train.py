"""Latent-diffusion trainer on cached pairs: one loop for the from-scratch and the pretrained UNet.

The loop is a handful of named steps (:meth:`Trainer.run_step`, :meth:`Trainer.forward_backward`,
:meth:`Trainer.evaluate`, :meth:`Trainer.save`). Every random draw of training (latent sample,
noise, timesteps, caption dropout) comes from one CPU generator per process whose state is saved in
each checkpoint, and the data order of an epoch is a permutation seeded by ``(seed, epoch)``, so a
run killed and resumed from its latest checkpoint repeats the uninterrupted run's steps exactly.

``accelerate`` places the model, syncs gradients across processes (``accelerate launch``) and runs
bf16 autocast on CUDA; only the main process writes files.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from sd_core import checkpoint as ckpt
from sd_core.strict import StrictModel
from sd_core.encode import TextEncoderConfig, VAEConfig
from sd_core.fsio import atomic_write_json
from sd_core.models import ModelConfig, build_denoiser, load_trainable_state, trainable_state
from sd_core.pairs import InMemoryPairs, PairSource, split_ids
from sd_core.schedule import NoiseSchedule, ScheduleConfig

__all__ = [
    "TrainConfig",
    "EncoderRefs",
    "Trainer",
    "TrainResult",
    "EMA",
    "CosineLR",
    "ValidationSampler",
    "StepCallback",
    "PairSource",
    "InMemoryPairs",
    "read_metrics",
]

log = logging.getLogger(__name__)

METRIC_FIELDS = ("step", "train_loss", "val_loss", "ema_val_loss", "lr", "seconds")

DEFAULT_PROMPTS = (
    "Purple Blob emoji with a round head, small black eyes, smiling mouth, happy expression, purple skin color, "
    "waving action, with a white background.",
    "Pepe the frog emoji with a round head, big eyes, smiling mouth, happy expression, green skin color, "
    "no action, with a green background.",
    "Cat emoji with a round head, closed eyes, open mouth, sleepy expression, orange skin color, no action, "
    "with a white background.",
)


class TrainConfig(StrictModel):
    """Run knobs of a training run; the model's own shape lives in ``model`` and ``schedule``.

    Exactly one of ``steps`` and ``epochs`` sets the length (``epochs`` is turned into steps with
    ``len(train split) // (batch_size · processes)`` steps per epoch, the last partial batch dropped).
    """

    steps: int | None = Field(10_000, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1, description="per process")
    lr: float = Field(1e-4, gt=0)
    lr_min: float = Field(1e-5, ge=0, description="cosine annealing floor (seed: 1e-4 → 1e-5)")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(1e-2, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)
    caption_dropout: float = Field(0.5, ge=0, le=1, description="probability a caption is replaced by \"\"")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = Field(True, description="decay min(ema_decay, (1+n)/(10+n)) after n updates")
    mixed_precision: Literal["no", "bf16"] = Field("no", description="bf16 autocast, on CUDA only")
    seed: int = 0
    val_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: int = 42
    val_every: int = Field(250, ge=1)
    val_repeats: int = Field(4, ge=1, description="fixed timesteps per held-out item")
    val_seed: int = 1234
    log_every: int = Field(1, ge=1)
    save_every: int = Field(500, ge=1)
    keep_last: int | None = Field(3, ge=1)
    sample_every: int | None = Field(None, ge=1)
    sample_prompts: tuple[str, ...] = DEFAULT_PROMPTS
    sample_seeds: tuple[int, ...] = (0, 1, 2, 3)
    min_snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    model: ModelConfig = ModelConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_steps(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("epochs") is not None and "steps" not in data:
            return {**data, "steps": None}
        return data

    @model_validator(mode="after")
    def _one_length(self) -> "TrainConfig":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps and epochs")
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min}) must be <= lr ({self.lr})")
        return self


class EncoderRefs(StrictModel):
    """The encoders the cached pairs came from (recorded in exports so sampling can reload them)."""

    text_encoder: TextEncoderConfig | None = None
    vae: VAEConfig | None = None


class ValidationSampler(Protocol):
    """Draws a grid of ``prompts`` × ``seeds`` with ``denoiser`` and writes it to ``out_path``."""

    def __call__(self, denoiser: nn.Module, prompts: Sequence[str], seeds: Sequence[int], out_path: Path) -> None: ...


StepCallback = Callable[["Trainer", float], None]
"""Called after every completed step (and its logging / saving) with the step's train loss."""


class CosineLR:
    """Linear warm-up, then cosine from ``base`` to ``floor`` over ``total`` steps (closed form)."""

    def __init__(self, base: float, floor: float, total: int, warmup: int = 0) -> None:
        self.base, self.floor, self.total, self.warmup = base, floor, total, warmup

    def __call__(self, step: int) -> float:
        """The learning rate of the update that takes the model from ``step`` to ``step + 1``."""
        if step < self.warmup:
            return self.base * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + 0.5 * (self.base - self.floor) * (1.0 + math.cos(math.pi * progress))

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"kind": "cosine", "base": self.base, "floor": self.floor, "total": self.total,
                "warmup": self.warmup, "step": step, "next_lr": self(step)}


class EMA:
    """Exponential moving average of a model's trainable parameters (float32 shadow copies)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.num_updates = 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        if state.keys() != self.shadow.keys():
            raise KeyError("EMA state does not match the model's trainable parameters")
        for n, v in state.items():
            self.shadow[n].copy_(v)
        self.num_updates = num_updates

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model's parameters."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    ema_val_loss: float | None
    checkpoint: Path | None
    export_dir: Path | None


@dataclass
class _ValSet:
    """Held-out items with their fixed latent draws, noise and timesteps (one row per item × repeat)."""

    items: list[int]  # indices into the PairSource, repeated val_repeats times
    z: torch.Tensor  # (M, 4, h, w) latent-sample noise
    noise: torch.Tensor  # (M, 4, h, w)
    t: torch.Tensor  # (M,)


def _accelerator(mixed_precision: str) -> Any:
    from accelerate import Accelerator

    mp = mixed_precision if torch.cuda.is_available() else "no"
    if mp != mixed_precision:
        log.info("mixed_precision=%s needs CUDA; training in float32", mixed_precision)
    return Accelerator(mixed_precision=mp)


class Trainer:
    """ε-prediction training of a denoiser on a :class:`PairSource`, writing into ``out_dir``.

    ``out_dir`` receives ``metrics.csv``, ``loss_curve.png``, ``checkpoints/``, ``samples/`` and, at
    the end, the export ``model/``.
    """

    def __init__(
        self,
        config: TrainConfig,
        pairs: PairSource,
        out_dir: Path,
        *,
        encoders: EncoderRefs | None = None,
        sampler: ValidationSampler | None = None,
        callbacks: Sequence[StepCallback] = (),
        progress: bool = True,
    ) -> None:
        self.config = config
        self.pairs = pairs
        self.out_dir = Path(out_dir)
        self.encoders = encoders or EncoderRefs()
        self.sampler = sampler
        self.callbacks = list(callbacks)
        self.progress = progress
        self.accelerator = _accelerator(config.mixed_precision)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.device = acc.device
        self.schedule = NoiseSchedule(config.schedule)

        self.train_items, self.val_items = split_ids(pairs.ids(), config.val_fraction, config.split_seed)
        self.global_batch = config.batch_size * self.world
        if len(self.train_items) < self.global_batch:
            raise ValueError(
                f"the train split has {len(self.train_items)} items, fewer than one batch "
                f"({config.batch_size} × {self.world} processes); lower batch_size"
            )
        self.steps_per_epoch = len(self.train_items) // self.global_batch
        self.total_steps = config.steps if config.steps is not None else config.epochs * self.steps_per_epoch
        probe = pairs.batch([0])
        self.latent_shape: tuple[int, ...] = tuple(probe["mean"].shape[1:])  # (4, h, w)
        self.empty_text = pairs.empty_text.float()  # (T, D)
        self.empty_mask = pairs.empty_mask  # (T,)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = build_denoiser(config.model, report=acc.print)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay
        )
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.ema = EMA(self.net, config.ema_decay, config.ema_warmup)
        self.lr_schedule = CosineLR(config.lr, config.lr_min, self.total_steps, config.warmup_steps)

        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.rank)
        self.step = 0
        self.epoch = 0
        self.position = 0  # items of the current epoch's order already consumed (all processes)
        self.elapsed_s = 0.0
        self._val = self._build_val_set()
        self._pending_losses: list[float] = []
        self._order: tuple[int, list[int]] = (-1, [])
        self.last_val: tuple[float | None, float | None] = (None, None)

    # --- paths -------------------------------------------------------------------------------
    @property
    def net(self) -> nn.Module:
        """The model without any accelerate / DDP wrapper."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_csv(self) -> Path:
        return self.out_dir / "metrics.csv"

    @property
    def export_dir(self) -> Path:
        return self.out_dir / "model"

    # --- data --------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[int]:
        """The train split's order in ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7919 * epoch + 1)
        perm = torch.randperm(len(self.train_items), generator=g).tolist()
        return [self.train_items[i] for i in perm]

    def next_indices(self) -> list[int]:
        """This process's share of the next global batch; advances epoch / position."""
        if self._order[0] != self.epoch:
            self._order = (self.epoch, self.epoch_order(self.epoch))
        order = self._order[1]
        start = self.position + self.rank * self.config.batch_size
        indices = order[start : start + self.config.batch_size]
        self.position += self.global_batch
        if self.position + self.global_batch > len(order):
            self.epoch, self.position = self.epoch + 1, 0
        return indices

    def _build_val_set(self) -> _ValSet:
        k, n = self.config.val_repeats, self.schedule.num_train_timesteps
        items = [i for _ in range(k) for i in self.val_items]
        g = torch.Generator().manual_seed(self.config.val_seed)
        shape = (len(items), *self.latent_shape)
        t = torch.tensor([int((j + 0.5) * n / k) for j in range(k) for _ in self.val_items], dtype=torch.long)
        return _ValSet(items, torch.randn(shape, generator=g), torch.randn(shape, generator=g), t)

    # --- the step ----------------------------------------------------------------------------
    def _noisy_inputs(
        self, batch: dict[str, torch.Tensor], z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``(mean + std·z)·sf`` noised to ``t``: returns (x_t, noise) on the device."""
        x0 = (batch["mean"].float() + batch["std"].float() * z) * self.pairs.scaling_factor  # (B, 4, h, w)
        x_t = self.schedule.add_noise(x0, noise, t)
        return x_t.to(self.device), noise.to(self.device)

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss on a batch (fresh latent sample, noise, timesteps, caption dropout) and its backward."""
        cfg, g = self.config, self.generator
        b = batch["mean"].shape[0]
        z = torch.randn(batch["mean"].shape, generator=g)  # (B, 4, h, w)
        noise = torch.randn(batch["mean"].shape, generator=g)  # (B, 4, h, w)
        if cfg.noise_offset > 0:
            noise = noise + cfg.noise_offset * torch.randn(b, noise.shape[1], 1, 1, generator=g)
        t = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=g)  # (B,)
        drop = torch.rand(b, generator=g) < cfg.caption_dropout  # (B,)
        text = torch.where(drop[:, None, None], self.empty_text, batch["text"].float())  # (B, T, D)
        mask = torch.where(drop[:, None], self.empty_mask, batch["mask"])  # (B, T)
        if "mean_flip" in batch:  # mirrored latents are cached: each item mirrored with probability 1/2
            flip = (torch.rand(b, generator=g) < 0.5)[:, None, None, None]  # (B, 1, 1, 1)
            batch = {**batch, "mean": torch.where(flip, batch["mean_flip"], batch["mean"]),
                     "std": torch.where(flip, batch["std_flip"], batch["std"])}

        x_t, noise = self._noisy_inputs(batch, z, noise, t)
        with self.accelerator.autocast():
            eps = self.model(x_t, t.to(self.device), text.to(self.device), mask.to(self.device))
        per_item = F.mse_loss(eps.float(), noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if cfg.min_snr_gamma is not None:
            per_item = per_item * self.schedule.min_snr_weights(t, cfg.min_snr_gamma).to(self.device)
        loss = per_item.mean()
        self.accelerator.backward(loss)
        return loss.detach()

    def run_step(self, indices: Sequence[int]) -> float:
        """One optimizer update on the items ``indices``; returns the loss averaged over processes."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.forward_backward(self.pairs.batch(indices))
        if self.config.grad_clip is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.ema.update()
        self.step += 1
        return float(self.accelerator.reduce(loss, reduction="mean"))

    @torch.no_grad()
    def _val_loss(self) -> float | None:
        v = self._val
        if not v.items:
            return None
        net = self.net.eval()
        total, bs = 0.0, self.config.batch_size
        for s in range(0, len(v.items), bs):
            batch = self.pairs.batch(v.items[s : s + bs])
            x_t, noise = self._noisy_inputs(batch, v.z[s : s + bs], v.noise[s : s + bs], v.t[s : s + bs])
            with self.accelerator.autocast():
                eps = net(x_t, v.t[s : s + bs].to(self.device), batch["text"].float().to(self.device),
                          batch["mask"].to(self.device))
            total += F.mse_loss(eps.float(), noise, reduction="sum").item() / noise[0].numel()
        return total / len(v.items)

    def evaluate(self) -> tuple[float | None, float | None]:
        """Held-out ε-MSE of the raw and the EMA weights, at the fixed timesteps and noise."""
        raw = self._val_loss()
        with self.ema.swapped_in():
            ema = self._val_loss()
        self.last_val = (raw, ema)
        return raw, ema

    # --- state -------------------------------------------------------------------------------
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
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "data_seed": self.config.seed,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "num_processes": self.world,
            "ema_updates": self.ema.num_updates,
            "elapsed_s": self.elapsed_s,
            "scaling_factor": self.pairs.scaling_factor,
            "latent_shape": list(self.latent_shape),
            "encoders": self.encoders.model_dump(mode="json"),
        }

    def save(self) -> Path:
        """Write ``checkpoints/checkpoint-{step}`` (every process adds its RNG state; main the rest)."""
        acc, root = self.accelerator, self.checkpoint_root
        if acc.is_main_process:
            ckpt.begin_checkpoint(root, self.step)
        acc.wait_for_everyone()
        tmp = ckpt.staging_folder(root, self.step)
        ckpt.write_rng(tmp, self.rank, self._rng_states())
        acc.wait_for_everyone()
        folder = root / ckpt.checkpoint_name(self.step)
        if acc.is_main_process:
            ckpt.write_checkpoint_files(
                tmp,
                config=self.config.model_dump(mode="json"),
                model=trainable_state(self.net),
                ema=self.ema.state_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.lr_schedule.state_dict(self.step),
                trainer_state=self.trainer_state(),
            )
            folder = ckpt.commit_checkpoint(root, self.step, self.config.keep_last)
        acc.wait_for_everyone()
        return folder

    def load(self, folder: Path) -> None:
        """Restore model, EMA, optimizer, position and RNG from a checkpoint folder."""
        c = ckpt.load_checkpoint(folder)
        st = c.trainer_state
        mine = self.config.model_dump(mode="json")
        for key in ("model", "schedule"):
            if c.config[key] != mine[key]:
                raise ValueError(f"{folder} was trained with another {key} config: {c.config[key]} != {mine[key]}")
        if changed := sorted(k for k in mine if c.config.get(k) != mine[k]):
            log.warning("resuming %s with changed run settings %s: steps after this differ from the original run",
                        folder, changed)
        if st["num_processes"] != self.world:
            raise ValueError(f"{folder} was written by {st['num_processes']} processes, this run has {self.world}")
        if st["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"{folder}: the data set changed ({st['steps_per_epoch']} → {self.steps_per_epoch} steps/epoch)")
        load_trainable_state(self.net, c.model)
        self.ema.load_state_dict({n: v.to(self.device) for n, v in (c.ema or {}).items()}, st["ema_updates"])
        assert c.optimizer is not None
        self.optimizer.load_state_dict(c.optimizer)
        self._load_rng_states(c.rng(self.rank))
        self.step, self.epoch, self.position = st["step"], st["epoch"], st["position"]
        self.elapsed_s = float(st["elapsed_s"])

    def init_from(self, folder: Path) -> None:
        """Start from another run's weights (model and EMA of a checkpoint folder), e.g. to continue
        training on a grown data set; optimizer, schedule and position start fresh."""
        c = ckpt.load_checkpoint(folder)
        if c.config["model"] != self.config.model_dump(mode="json")["model"]:
            raise ValueError(f"{folder} holds another model config; cannot continue from it")
        load_trainable_state(self.net, c.model)
        self.ema.load_state_dict({n: v.to(self.device) for n, v in (c.ema or c.model).items()},
                                 int(c.trainer_state.get("ema_updates", 0)))
        self.accelerator.print(f"initialised from {folder} (step {c.step})")

    # --- metrics -----------------------------------------------------------------------------
    def _start_metrics(self, resumed: bool) -> None:
        if not self.accelerator.is_main_process:
            return
        rows = read_metrics(self.metrics_csv) if resumed and self.metrics_csv.exists() else []
        rows = [r for r in rows if int(r["step"]) <= self.step]
        self.metrics_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in METRIC_FIELDS} for r in rows)

    def _log_row(self, train_loss: float | None, val: tuple[float | None, float | None] | None) -> None:
        if not self.accelerator.is_main_process:
            return
        row = {
            "step": self.step,
            "train_loss": "" if train_loss is None else repr(train_loss),
            "val_loss": "" if val is None or val[0] is None else repr(val[0]),
            "ema_val_loss": "" if val is None or val[1] is None else repr(val[1]),
            "lr": repr(self.lr_schedule(self.step - 1)),
            "seconds": f"{self.elapsed_s:.3f}",
        }
        with open(self.metrics_csv, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=METRIC_FIELDS).writerow(row)

    def _plot(self) -> None:
        if self.accelerator.is_main_process:
            from sd_core.plots import plot_loss_curve

            plot_loss_curve(self.metrics_csv, self.out_dir / "loss_curve.png")

    def _sample(self) -> None:
        if self.sampler is not None and self.accelerator.is_main_process:
            out = self.out_dir / "samples" / f"step-{self.step:07d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            was_training = self.net.training
            devices = list(range(torch.cuda.device_count()))
            with torch.random.fork_rng(devices=devices), self.ema.swapped_in():
                self.sampler(self.net.eval(), self.config.sample_prompts, self.config.sample_seeds, out)
            self.net.train(was_training)
        self.accelerator.wait_for_everyone()

    # --- the loop ----------------------------------------------------------------------------
    def resume_latest(self) -> bool:
        """Load ``checkpoints/latest`` if there is one; True when a checkpoint was loaded."""
        folder = ckpt.latest_checkpoint(self.checkpoint_root)
        if folder is None:
            return False
        self.load(folder)
        self.accelerator.print(f"resumed from {folder} (step {self.step})")
        return True

    def _after_step(self, loss: float, stop: int) -> Path | None:
        """Log, evaluate, save, sample and call back as the step count says; returns a new checkpoint."""
        cfg = self.config
        self._pending_losses.append(loss)
        val = self.evaluate() if self.step % cfg.val_every == 0 or self.step == self.total_steps else None
        if val is not None or self.step % cfg.log_every == 0:
            self._log_row(sum(self._pending_losses) / len(self._pending_losses), val)
            self._pending_losses.clear()
        if val is not None:
            self._plot()
        folder = self.save() if self.step % cfg.save_every == 0 or self.step == stop else None
        if cfg.sample_every is not None and self.step % cfg.sample_every == 0:
            self._sample()
        for cb in self.callbacks:
            cb(self, loss)
        return folder

    def train(self, *, resume: bool = False, until_step: int | None = None) -> TrainResult:
        """Train to ``total_steps`` (or stop early at ``until_step``, saving there), then export.

        With ``resume=True`` training continues from the latest checkpoint exactly where it was.
        """
        resumed = self.resume_latest() if resume else False
        if not resume and ckpt.list_checkpoints(self.checkpoint_root):
            raise FileExistsError(
                f"{self.checkpoint_root} holds checkpoints of an earlier run: pass resume=True or use a new out_dir"
            )
        self._start_metrics(resumed)
        stop = self.total_steps if until_step is None else min(until_step, self.total_steps)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.progress and self.accelerator.is_main_process),
                   desc="train", dynamic_ncols=True)
        folder: Path | None = None
        last_loss: float | None = None
        while self.step < stop:
            t0 = time.perf_counter()
            last_loss = self.run_step(self.next_indices())
            self.elapsed_s += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{self.lr_schedule(self.step - 1):.2e}")
            folder = self._after_step(last_loss, stop) or folder
        bar.close()
        if folder is None:
            folder = ckpt.latest_checkpoint(self.checkpoint_root) if self.accelerator.is_main_process else None
        export = None
        if self.step >= self.total_steps:
            self._plot()
            export = self.export(self.export_dir)
        return TrainResult(self.step, last_loss, self.last_val[0], self.last_val[1], folder, export)

    # --- export ------------------------------------------------------------------------------
    def export(self, folder: Path) -> Path | None:
        """Write the EMA model where sampling expects it (main process; returns the folder)."""
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return None
        folder = Path(folder)
        tmp = folder.with_name(f".tmp-{folder.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        if self.config.model.kind == "scratch":
            export_scratch(
                tmp,
                weights=self.ema.state_dict(),
                config=self.config,
                encoders=self.encoders,
                scaling_factor=self.pairs.scaling_factor,
                latent_shape=self.latent_shape,
                step=self.step,
            )
        else:
            export_pretrained_attn2(tmp, weights=self.ema.state_dict(), config=self.config, step=self.step)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        self.accelerator.wait_for_everyone()
        return folder


def export_scratch(
    folder: Path,
    *,
    weights: dict[str, torch.Tensor],
    config: TrainConfig,
    encoders: EncoderRefs,
    scaling_factor: float,
    latent_shape: Sequence[int],
    step: int,
) -> None:
    """``model.safetensors`` (an :class:`EmojiUNet` state dict) + ``config.json`` describing its use."""
    from safetensors.torch import save_file

    assert config.model.unet is not None
    folder.mkdir(parents=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    atomic_write_json(folder / "config.json", {
        "format": "emoji-sd-scratch/1",
        "kind": "scratch",
        "unet": config.model.unet.to_dict(),
        "schedule": config.schedule.to_dict(),
        "text_encoder": None if encoders.text_encoder is None else encoders.text_encoder.model_dump(mode="json"),
        "vae": None if encoders.vae is None else encoders.vae.model_dump(mode="json"),
        "scaling_factor": scaling_factor,
        "latent_shape": list(latent_shape),
        "step": step,
    })


def export_pretrained_attn2(folder: Path, *, weights: dict[str, torch.Tensor], config: TrainConfig, step: int) -> None:
    """The original Stable Diffusion pipeline with the fine-tuned (EMA) cross-attention weights."""
    from diffusers import StableDiffusionPipeline

    from sd_core.models import DiffusersDenoiser, freeze_all_but_attn2

    m = config.model
    pipe = StableDiffusionPipeline.from_pretrained(
        m.pretrained_model_id, revision=m.revision, safety_checker=None,
        requires_safety_checker=False, use_safetensors=True,
    )
    freeze_all_but_attn2(pipe.unet)
    load_trainable_state(DiffusersDenoiser(pipe.unet), {k: v.cpu() for k, v in weights.items()})
    pipe.unet.requires_grad_(False)
    pipe.save_pretrained(folder, safe_serialization=True)
    atomic_write_json(folder / "emoji_sd_training.json", {"train_config": config.model_dump(mode="json"), "step": step})


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Rows of a ``metrics.csv`` as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
