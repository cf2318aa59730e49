"""Caption stage: Qwen2.5-VL (or the offline captioner) writes one templated caption per image."""
