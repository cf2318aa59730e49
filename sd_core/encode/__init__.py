"""Encode stage: VAE latents and text-encoder states, computed once per item and cached; the pairs the
trainer reads."""
