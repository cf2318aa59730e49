"""Publishing: the export and dataset pushed to the Hugging Face Hub with their cards (``emoji-sd push``), and the
one lookup of the model that is shared and served (:func:`served_model`)."""

from __future__ import annotations

from pathlib import Path

from sd_core.store.catalog import Catalog


def served_model(catalog: Catalog) -> Path:
    """The export ``emoji-sd push`` uploads and ``emoji-sd app`` draws from: the champion's. The only call of the
    catalog's model lookup in this package and :mod:`sd_core.app`, so that it is switched in one place."""
    model = catalog.trained_model()
    if model is None:
        raise FileNotFoundError(f"no trained model in {catalog.train_dir}: run the pipeline (or its train stage) first")
    return model
