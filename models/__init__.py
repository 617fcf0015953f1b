"""Generative halves, one file per family. Importing this package registers their short names."""

from pyrovae.models.vae import GaussianVAE, GaussianVAEConfig
from pyrovae.models.ladder import LadderVAE, LadderVAEConfig
from pyrovae.models.categorical import CategoricalVAE, CategoricalVAEConfig
from pyrovae.models.m2 import M2, M2Config
from pyrovae.models.gmvae import GMVAE, GMVAEConfig
from pyrovae.models.cvae import (
    CVAEBaseline,
    CVAEBaselineConfig,
    LabelConditionedVAE,
    LabelConditionedVAEConfig,
    StructuredOutputCVAE,
    StructuredOutputCVAEConfig,
)
from pyrovae.models.multvae import MultDAE, MultDAEConfig, MultVAE, MultVAEConfig
from pyrovae.models.sentence import LanguageModel, LanguageModelConfig, SentenceVAE, SentenceVAEConfig
from pyrovae.models.multilabel import JointClassifierVAE, JointClassifierVAEConfig, OutputVAE, OutputVAEConfig
from pyrovae.models.graph import GraphModel, GraphModelConfig

__all__ = ["GaussianVAE", "GaussianVAEConfig", "M2", "M2Config", "GMVAE", "GMVAEConfig", "LadderVAE", "LadderVAEConfig", "CategoricalVAE", "CategoricalVAEConfig", "CVAEBaseline", "CVAEBaselineConfig", "LabelConditionedVAE", "LabelConditionedVAEConfig", "StructuredOutputCVAE", "StructuredOutputCVAEConfig", "MultVAE", "MultVAEConfig", "MultDAE", "MultDAEConfig", "LanguageModel", "LanguageModelConfig", "SentenceVAE", "SentenceVAEConfig", "JointClassifierVAE", "JointClassifierVAEConfig", "OutputVAE", "OutputVAEConfig"]
