"""Inference halves, one file per family. Importing this package registers their short names."""

from pyrovae.guides.normal import DiagonalNormalGuide, DiagonalNormalGuideConfig
from pyrovae.guides.auto import AutoGuide, AutoGuideConfig
from pyrovae.guides.ladder import BottomUpGuide, BottomUpGuideConfig, LadderGuide, LadderGuideConfig
from pyrovae.guides.categorical import CategoricalGuide, CategoricalGuideConfig
from pyrovae.guides.m2 import M2Guide, M2GuideConfig
from pyrovae.guides.gmvae import GMVAEGuide, GMVAEGuideConfig, GMVAEMarginalGuide, GMVAEMarginalGuideConfig
from pyrovae.guides.cvae import (
    ConditionalEncoderConfig,
    LabelConditionedEncoder,
    NoLatentsConfig,
    NoLatentsGuide,
    RecognitionGuide,
)
from pyrovae.guides.multvae import MultVAEEncoder, MultVAEEncoderConfig
from pyrovae.guides.sentence import SentenceLSTMGuide, SentenceLSTMGuideConfig
from pyrovae.guides.multilabel import JointEncoder, JointEncoderConfig, OutputVAEEncoder, OutputVAEEncoderConfig

__all__ = [
    "AutoGuide", "AutoGuideConfig",
    "DiagonalNormalGuide", "DiagonalNormalGuideConfig", "M2Guide", "M2GuideConfig",
    "GMVAEGuide", "GMVAEGuideConfig", "GMVAEMarginalGuide", "GMVAEMarginalGuideConfig",
    "BottomUpGuide", "BottomUpGuideConfig", "LadderGuide", "LadderGuideConfig", "CategoricalGuide", "CategoricalGuideConfig",
    "ConditionalEncoderConfig", "LabelConditionedEncoder", "NoLatentsConfig", "NoLatentsGuide", "RecognitionGuide",
    "MultVAEEncoder", "MultVAEEncoderConfig",
    "SentenceLSTMGuide", "SentenceLSTMGuideConfig",
    "JointEncoder", "JointEncoderConfig", "OutputVAEEncoder", "OutputVAEEncoderConfig",
]
