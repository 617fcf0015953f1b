"""Generative halves, one file per family. Importing this package registers their short names."""

from pyrovae.models.vae import GaussianVAE, GaussianVAEConfig

__all__ = ["GaussianVAE", "GaussianVAEConfig"]
