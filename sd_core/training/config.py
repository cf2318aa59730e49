"""Settings of a training run: the model (``model``, ``schedule``), what shapes the optimisation
(learning rate, batch, dropout, EMA, loss), and run knobs (logging, saving, sampling, speed)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sd_core.common.config_base import StrictModel
from sd_core.diffusion.config import ModelConfig, ScheduleConfig

MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Attention = Literal["sdpa", "math", "xformers"]


class TrainConfig(StrictModel):
    """One training run. Exactly one of ``steps`` and ``epochs`` sets its length (``epochs`` is turned into
    optimizer steps with ``len(train split) // global batch`` steps per epoch, the last partial batch
    dropped; the global batch is ``batch_size · processes · gradient_accumulation_steps``)."""

    # length
    steps: int | None = Field(10_000, ge=1, description="optimizer steps of a run (giving epochs alone unsets it)")
    epochs: int | None = Field(None, ge=1, description="the run's length in passes over the training split, "
                               "instead of steps")
    # the optimisation
    batch_size: int = Field(32, ge=1, description="per process and micro-step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW): linear warm-up to it, then cosine "
                      "annealing to lr_min at the last step")
    lr_min: float = Field(1e-5, ge=0, description="cosine annealing floor (seed: 1e-4 → 1e-5)")
    warmup_steps: int = Field(0, ge=0, description="steps of linear learning-rate warm-up")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW's weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's (beta1, beta2)")
    grad_clip: float | None = Field(1.0, gt=0, description="the gradients' global norm is clipped to this; null: "
                                    "not clipped")
    caption_dropout: float = Field(0.5, ge=0, le=1, description="probability a caption is replaced by \"\"")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="decay of the exponential moving average of the "
                             "weights; the average is what is exported, evaluated and sampled")
    ema_warmup: bool = Field(True, description="decay min(ema_decay, (1+n)/(10+n)) at the n-th update after the "
                                               "first, which copies the weights (diffusers' EMAModel); false: "
                                               "ema_decay from the first update")
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR-gamma loss weighting: each timestep's "
                                        "loss weighted min(SNR, gamma) / SNR (diffusers' compute_snr); null: "
                                        "unweighted")
    noise_offset: float = Field(0.0, ge=0, description="offset noise: a per-channel constant drawn from N(0, this^2) "
                                "is added to each item's training noise, so that the model can learn to shift an "
                                "image's overall brightness and colour")
    timestep_sampling: Literal["uniform", "logit_normal"] = Field(
        "uniform", description="how training timesteps are drawn: uniformly, or t/T = sigmoid(N(timestep_logit_mean, "
                               "timestep_logit_std)) (SD3's logit-normal; a positive mean trains more at high noise, "
                               "where an image's colours and layout are decided)")
    timestep_logit_mean: float = Field(0.0, description="mean of the logit-normal timestep density "
                                       "(timestep_sampling = 'logit_normal')")
    timestep_logit_std: float = Field(1.0, gt=0, description="standard deviation of the logit-normal timestep "
                                      "density")
    seed: int = Field(0, description="seed of the initial weights (a new UNet, LoRA adapters), the data order and "
                      "every draw of the training steps")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of the items held out of training, each placed "
                                "by a hash of its id and split_seed (so no trained item moves to the held-out side "
                                "as the data grows); the held-out loss and the eval stage score this side")
    split_seed: int = Field(42, description="seed of the held-out split's hash")
    val_min_items: int = Field(48, ge=0, description="the held-out split holds at least this many items where the "
                                                     "data allows it (only items whose split hash is below 0.25, so "
                                                     "training keeps about 3/4 or more); the same setting as "
                                                     "eval.min_items, which sets it in a pipeline config")
    model: ModelConfig = Field(ModelConfig(), description="what is trained")
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="only for model.kind = 'scratch' (refused "
                                     "otherwise)")
    # speed (results are the same up to floating-point rounding)
    mixed_precision: MixedPrecision = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp16 with a gradient scaler on older ones, "
                            "float32 on the CPU")
    gradient_checkpointing: bool = Field(False, description="recompute the UNet's activations in the backward "
                                         "pass: less memory, slower steps")
    attention: Attention = Field("sdpa", description="attention kernels: sdpa (PyTorch's "
                                 "scaled_dot_product_attention), math (diffusers' plain processor, the reference) or "
                                 "xformers (when installed)")
    data_memory_gb: float = Field(4.0, gt=0, description="cached pairs held in memory; a larger data set is "
                                                          "read in windows of shards")
    # what the run records
    val_every: int = Field(250, ge=1, description="the held-out loss of the raw and the EMA weights every this "
                           "many steps and at the end (metrics.csv, loss_curve.png)")
    val_repeats: int = Field(4, ge=1, description="fixed timesteps per held-out item")
    val_seed: int = Field(1234, description="seed of the held-out loss's fixed noise")
    log_every: int = Field(
        100, ge=1, description="steps between reads of the losses from the device (one sync; every step still gets "
                               "its row in metrics.csv) and progress reports (progress.json, callbacks); reads also "
                               "happen where the run evaluates, saves or samples. One read and log costs about 2 ms "
                               "of CPU time (benchmarks/train.py log, seed-size UNet, CPU); a seed-size step "
                               "(configs/scratch-gpu.toml, batch 128, 1.5 TFLOP) is an estimated 3-8 ms on an H100 "
                               "(20-50 % of its bf16 peak), so logging every step would cost 25-65 % there and "
                               "every 100th step under 1 % (on the CPU, a 3 s step, 0.06 % even at 1). A NaN is "
                               "caught at the next read, before anything after it is saved")
    save_every: int = Field(500, ge=1, description="a checkpoint (weights, EMA, optimizer, RNG, data position) every "
                            "this many steps and at the end; a stopped run resumes from its latest")
    keep_last: int | None = Field(3, ge=1, description="checkpoints kept per run, the newest; null: all")
    sample_every: int | None = Field(None, ge=1, description="a validation grid of the EMA weights "
                                     "(samples/step-N.png in the run folder) every this many steps; null: none")
    sample_prompts: tuple[str, ...] = Field(
        (), description="prompts of the validation grids; empty: captions of the held-out split (the example "
                        "prompts when there is none)")
    sample_seeds: tuple[int, ...] = Field((0, 1, 2, 3), description="seeds of the validation grids' columns")
    trackers: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = Field(
        (), description="accelerate trackers for loss, held-out loss, LR and validation images")
    export_merged: bool = Field(False, description="fine-tunes: also export a complete merged pipeline")

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
        if self.model.pretrained and self.schedule != ScheduleConfig():
            raise ValueError(f"schedule: only for model.kind = 'scratch' ({self.model.kind} trains with the base "
                             "model's own scheduler)")
        return self


class TrainStageConfig(TrainConfig):
    """The trainer's settings plus what to do when the dataset grew since the last run."""

    on_new_data: Literal["continue", "retrain"] = Field(
        "continue", description="continue: start from the last run's weights and train continue_steps more; "
                                "retrain: train from scratch on the whole dataset")
    continue_steps: int = Field(500, ge=1, description="length in steps of a continuation (on_new_data = "
                                "'continue')")
    ema_on_continue: Literal["adapt", "rewarm", "keep"] = Field(
        "adapt", description="the EMA of a continuation: rewarm restarts its warm-up (decay (1+n)/(10+n)), adapt "
                              "caps its decay at 1 - 3/continue_steps (the old weights end at most 5% of it), keep "
                              "carries on (with ema_decay 0.999 and 500 steps the export is then 61% the old weights)")
    keep_runs: int = Field(2, ge=1, description="run folders kept in models/unet (the latest is never removed)")
    processes: int = Field(1, ge=1, description="processes the train stage launches through accelerate (one per "
                                                "GPU); batch_size is per process")

    def trainer_config(self, *, steps: int | None = None, epochs: int | None = None) -> TrainConfig:
        """The trainer's own settings, with the run length a plan gives (the configured one by default)."""
        data = self.model_dump(exclude={"on_new_data", "continue_steps", "ema_on_continue", "keep_runs", "processes"})
        if steps is not None or epochs is not None:
            data.update(steps=steps, epochs=epochs)
        return TrainConfig.model_validate(data)
