"""Generative halves, one file per family. Importing this package registers their short names."""

from pyrovae.models.vae import GaussianVAE, GaussianVAEConfig
from pyrovae.models.cvae import (
    CVAEBaseline,
    CVAEBaselineConfig,
    LabelConditionedVAE,
    LabelConditionedVAEConfig,
    StructuredOutputCVAE,
    StructuredOutputCVAEConfig,
)

__all__ = ["GaussianVAE", "GaussianVAEConfig", "CVAEBaseline", "CVAEBaselineConfig", "LabelConditionedVAE", "LabelConditionedVAEConfig", "StructuredOutputCVAE", "StructuredOutputCVAEConfig"]
