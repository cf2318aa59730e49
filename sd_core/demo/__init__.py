"""Offline demo emoji listing site (a discords.com look-alike) for crawler tests."""

from .emoji_art import SiteItem, available_glyph_count, build_demo_items, build_growth_items
from .site import DemoSite

__all__ = [
    "DemoSite",
    "SiteItem",
    "available_glyph_count",
    "build_demo_items",
    "build_growth_items",
]
