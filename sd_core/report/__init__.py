"""The report page of a data directory, headline first: alerts, the served model (pictures, figures, load
code), prompt following, training and evaluation history, the dataset as a sample with counts, the stages."""
