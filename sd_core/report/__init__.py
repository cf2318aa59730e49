"""The report page of a data directory: what each stage did, the dataset, curves and samples."""
