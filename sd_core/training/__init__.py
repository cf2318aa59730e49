"""Training: the denoiser's trainer (one readable step, EMA, LR schedule, checkpoints, metrics) and the
train stage that runs it on the cached pairs."""
