"""Analyses of a trained pair and data."""

from pyrovae.analysis.likelihood import importance_log_likelihood
from pyrovae.analysis.conditional import class_grid, completion_grid, generated_label_accuracy, label_samples
from pyrovae.analysis.plots import observation_distributions, observation_means, sample_grid, sample_rows, training_curves

__all__ = [
    "class_grid",
    "completion_grid",
    "generated_label_accuracy",
    "label_samples",
    "importance_log_likelihood",
    "observation_distributions",
    "observation_means",
    "sample_grid",
    "sample_rows",
    "training_curves",
]
