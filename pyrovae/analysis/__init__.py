"""Analyses of a trained pair and data."""

import importlib

# The ArviZ-based analysis (pyrovae analyze) is imported on first use: arviz takes seconds to
# import, which `pyrovae train` need not pay.
_ARVIZ_PARTS = {
    "to_inference_data": "posterior",
    "draw_posterior": "posterior",
    "PosteriorDraws": "posterior",
    "psis_diagnostics": "diagnostics",
    "importance_weights": "diagnostics",
    "elpd_data": "compare",
    "compare_runs": "compare",
    "diagnose_collapse": "collapse",
    "kl_per_dimension": "latents",
    "mutual_information": "latents",
    "aggregate_posterior_moments": "latents",
    "latent_summary": "latents",
    "write_analysis": "report",
    "Analysis": "report",
    "latent_traversals": "posterior_plots",
    "latent_scatter": "posterior_plots",
    "kl_bars": "posterior_plots",
    "pareto_k_plot": "posterior_plots",
    "forest_plot": "posterior_plots",
    "posterior_plot": "posterior_plots",
    # Sentence decoding (no ArviZ; listed here so it loads only when a text run asks for it).
    "greedy_decode": "decoding",
    "sample_decode": "decoding",
    "beam_search": "decoding",
    "reconstruct": "decoding",
    "prior_sentences": "decoding",
    "homotopy": "decoding",
    "write_text_samples": "decoding",
}


def __getattr__(name):
    if name in _ARVIZ_PARTS:
        return getattr(importlib.import_module(f"pyrovae.analysis.{_ARVIZ_PARTS[name]}"), name)
    raise AttributeError(f"module 'pyrovae.analysis' has no attribute {name!r}")


from pyrovae.analysis.active_units import ActiveUnits, active_units, posterior_means
from pyrovae.analysis.likelihood import importance_log_likelihood
from pyrovae.analysis.classification import clustering_accuracy, label_metrics
from pyrovae.analysis.conditional import class_grid, completion_grid, generated_label_accuracy, label_samples
from pyrovae.analysis.quadrature import GridPosterior, grid_posterior
from pyrovae.analysis.plots import (
    observation_distributions,
    observation_means,
    sample_grid,
    sample_rows,
    sample_rows_figure,
    training_curves,
)

__all__ = [
    "ActiveUnits",
    "active_units",
    "posterior_means",
    "class_grid",
    "completion_grid",
    "generated_label_accuracy",
    "label_samples",
    "clustering_accuracy",
    "label_metrics",
    "GridPosterior",
    "grid_posterior",
    "importance_log_likelihood",
    "observation_distributions",
    "observation_means",
    "sample_grid",
    "sample_rows",
    "sample_rows_figure",
    "training_curves",
    *_ARVIZ_PARTS,
]
