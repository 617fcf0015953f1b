"""Inference halves, one file per family. Importing this package registers their short names."""

from pyrovae.guides.normal import DiagonalNormalGuide, DiagonalNormalGuideConfig

__all__ = ["DiagonalNormalGuide", "DiagonalNormalGuideConfig"]
