"""Baselines to compare the VAEs with, on the same splits and metrics, their settings tuned on the
validation rows: closed-form recommenders (:func:`pyrovae.analysis.ranking.evaluate_ranking`): item
popularity, and EASE (Steck 2019) with its L2 weight tuned on validation NDCG; multi-label: one-vs-rest
logistic regression with C tuned by a validation criterion (Hamming loss by default), label frequencies."""

from pyrovae.baselines.multilabel import label_frequencies, one_vs_rest, tune_one_vs_rest
from pyrovae.baselines.recommenders import EASE, Popularity, tune_ease

__all__ = ["EASE", "Popularity", "label_frequencies", "one_vs_rest", "tune_ease", "tune_one_vs_rest"]
