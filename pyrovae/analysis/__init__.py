"""Analyses of a trained pair and data."""

from pyrovae.analysis.likelihood import importance_log_likelihood
from pyrovae.analysis.plots import observation_means, sample_grid, training_curves

__all__ = ["importance_log_likelihood", "observation_means", "sample_grid", "training_curves"]
