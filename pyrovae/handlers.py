"""Effect handlers: how sample sites are scored, without touching model code."""

from __future__ import annotations

import contextlib
from typing import Mapping, Union

import torch
from pyro.poutine.messenger import Messenger

Beta = Union[float, torch.Tensor, Mapping[str, Union[float, torch.Tensor]]]

# kl_scale writes the scale a site had before beta multiplied it into ``msg["infer"]`` under
# this key, so reported numbers can undo beta (and only beta) even when beta is 0.
UNANNEALED_SCALE = "unannealed_scale"
# An auxiliary training term (pyrovae.pair.auxiliary_term) carries this key: objectives add it to
# the loss, and every reported number (elbo, reconstruction, log p(x)) leaves it out.
AUXILIARY_TERM = "pyrovae_auxiliary_term"


class kl_scale(Messenger):
    """Multiply the log-density scale of unobserved sample sites by beta.

    Applied around both the model and the guide run of an objective, it turns
    ``log p(x|z) + log p(z) - log q(z|x)`` into
    ``log p(x|z) + beta * (log p(z) - log q(z|x))``: the reconstruction is
    untouched and exactly the KL part is weighted, for every objective built on
    traces (Monte Carlo or analytic KL, which reads the guide site's scale).

    ``beta`` is one float, or a dict ``{site_name: beta}`` for per-layer warm-up;
    sites missing from the dict get ``default`` (1 unless given). A 0-dim tensor may stand for
    any float (the compiled step passes its weights so, as graph inputs); it always scales the
    site, even at 1, and is not checked (that would read it to the host).

    Each scaled site remembers its scale before beta in ``site["infer"]["unannealed_scale"]``;
    :func:`pyrovae.traces.reported_log_prob` reads it to report the unannealed bound.
    """

    def __init__(self, beta: Beta, default: float | torch.Tensor = 1.0):
        super().__init__()
        if isinstance(beta, Mapping):
            self.beta_by_site = {name: _weight(value) for name, value in beta.items()}
            self.beta = _weight(default)
        else:
            self.beta_by_site = None
            self.beta = _weight(beta)
        for value in [self.beta, *(self.beta_by_site or {}).values()]:
            if not torch.is_tensor(value) and not value >= 0.0:
                raise ValueError(f"kl_scale needs beta >= 0, got {value}")

    def _process_message(self, msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        beta = self.beta if self.beta_by_site is None else self.beta_by_site.get(msg["name"], self.beta)
        if torch.is_tensor(beta) or beta != 1.0:
            msg["infer"].setdefault(UNANNEALED_SCALE, msg["scale"])
            msg["scale"] = beta * msg["scale"]


def _weight(value):
    return value if torch.is_tensor(value) else float(value)


def kl_scale_unless_one(beta, by_site: Mapping[str, float] | None = None):
    """:class:`kl_scale` with ``beta`` and the per-site weights ``by_site``, or no handler at all
    when every weight is 1 (the unscaled objective, with nothing added to the stack)."""
    if by_site:
        if beta == 1.0 and all(value == 1.0 for value in by_site.values()):
            return contextlib.nullcontext()
        return kl_scale(dict(by_site), default=beta)
    return kl_scale(beta) if beta != 1.0 else contextlib.nullcontext()
