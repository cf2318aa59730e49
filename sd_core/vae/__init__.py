"""vae stage: the offline default trains a small AutoencoderKL on the dataset's own images."""
