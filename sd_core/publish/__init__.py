"""Publishing: the export and dataset pushed to the Hugging Face Hub with their cards (``emoji-sd push``).

The model pushed and drawn by ``emoji-sd app`` is :func:`~sd_core.diffusion.champion.served_model`'s: the
champion's export, verified, never another run's."""

from sd_core.diffusion.champion import served_model

__all__ = ["served_model"]
