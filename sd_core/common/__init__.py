"""Lowest layer: the config base class, image helpers, devices and dtypes, plots."""
