"""Effect handlers: how sample sites are scored, without touching model code."""

from __future__ import annotations

from typing import Mapping, Union

from pyro.poutine.messenger import Messenger

Beta = Union[float, Mapping[str, float]]


class kl_scale(Messenger):
    """Multiply the log-density scale of unobserved sample sites by beta.

    Applied around both the model and the guide run of an objective, it turns
    ``log p(x|z) + log p(z) - log q(z|x)`` into
    ``log p(x|z) + beta * (log p(z) - log q(z|x))``: the reconstruction is
    untouched and exactly the KL part is weighted, for every objective built on
    traces (Monte Carlo or analytic KL, which reads the guide site's scale).

    ``beta`` is one float, or a dict ``{site_name: beta}`` for per-layer warm-up;
    sites missing from the dict keep scale 1.
    """

    def __init__(self, beta: Beta):
        super().__init__()
        if isinstance(beta, Mapping):
            self.beta_by_site = {name: float(value) for name, value in beta.items()}
            self.beta = None
        else:
            self.beta_by_site = None
            self.beta = float(beta)
        for value in [self.beta] if self.beta_by_site is None else self.beta_by_site.values():
            if not value >= 0.0:
                raise ValueError(f"kl_scale needs beta >= 0, got {value}")

    def _process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        beta = self.beta if self.beta_by_site is None else self.beta_by_site.get(msg["name"], 1.0)
        if beta != 1.0:
            msg["scale"] = beta * msg["scale"]
