"""Sample stage: text → emoji grids and a guidance sweep from the trained model."""
