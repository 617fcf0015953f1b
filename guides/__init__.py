"""Inference halves, one file per family. Importing this package registers their short names."""

from pyrovae.guides.normal import DiagonalNormalGuide, DiagonalNormalGuideConfig
from pyrovae.guides.cvae import (
    ConditionalEncoderConfig,
    LabelConditionedEncoder,
    NoLatentsConfig,
    NoLatentsGuide,
    RecognitionGuide,
)

__all__ = [
    "DiagonalNormalGuide", "DiagonalNormalGuideConfig",
    "ConditionalEncoderConfig", "LabelConditionedEncoder", "NoLatentsConfig", "NoLatentsGuide", "RecognitionGuide",
]
