"""Storage layer: where artifacts live (catalog), atomic files, the data-directory lock, stage records,
the per-item tensor cache and the dataset table."""
