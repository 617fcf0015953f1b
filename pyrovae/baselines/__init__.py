"""Closed-form recommenders to compare the collaborative-filtering VAEs with, on the same splits and
the same ranking metrics (:func:`pyrovae.analysis.ranking.evaluate_ranking`): item popularity, and
EASE (Steck 2019) with its L2 weight tuned on validation NDCG."""

from pyrovae.baselines.recommenders import EASE, Popularity, tune_ease

__all__ = ["EASE", "Popularity", "tune_ease"]
