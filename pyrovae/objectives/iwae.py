"""The importance weighted bound, with DReG for reparameterized guides and VIMCO for
score-function (e.g. categorical) sites."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from pyrovae.errors import UnsupportedPairError
from pyrovae.objectives.base import Objective
from pyrovae.registry import OBJECTIVES
from pyrovae.traces import PairInfo, auxiliary_terms, latent_sites, log_mean_exp, log_weight_terms, per_datapoint


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``holder["weights"]``, which the
    objective fills in after the forward pass (the weights depend on the model run)."""

    @staticmethod
    def forward(ctx, value, holder, shape):
        ctx.holder, ctx.shape = holder, shape
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.holder["weights"].reshape(ctx.shape), None, None


def detach_parameters(fn: dist.Distribution) -> dist.Distribution:
    """The same distribution with its parameters cut from the graph (values still carry gradients)."""
    if hasattr(fn, "detached"):
        return fn.detached()
    if isinstance(fn, dist.Independent):
        return dist.Independent(detach_parameters(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.ExpandedDistribution):
        return detach_parameters(fn.base_dist).expand(fn.batch_shape)
    params = {
        key: value.detach()
        for key, value in vars(fn).items()
        if key in fn.arg_constraints and torch.is_tensor(value)
    }
    if "logits" in params:
        params.pop("probs", None)
    try:
        return type(fn)(**params, validate_args=False)
    except TypeError as error:
        raise NotImplementedError(
            f"DReG cannot detach the parameters of {type(fn).__name__} ({error}); use dreg = false"
        ) from None


def vimco_learning_signals(log_weights: torch.Tensor) -> torch.Tensor:
    """Mnih and Rezende 2016, per datapoint: with L = log (1/K) sum_j w_j,

        L_{-k} = log (1/K) (sum_{j != k} w_j + exp(mean_{j != k} log w_j)),   signal_k = L - L_{-k},

    the local learning signal of particle k (the others' geometric mean stands in for w_k as a
    control variate). ``log_weights`` is ``(K, B)``; returns ``(K, B)``, detached. With K = 1 the
    signal is L itself (plain REINFORCE, no baseline)."""
    log_weights = log_weights.detach()
    particles = log_weights.shape[0]
    bound = log_mean_exp(log_weights, 0)
    if particles == 1:
        return bound.unsqueeze(0)
    others_mean = (log_weights.sum(0, keepdim=True) - log_weights) / (particles - 1)
    # Row k of the (K, K, B) stack replaces log w_k by the others' mean.
    eye = torch.eye(particles, dtype=torch.bool, device=log_weights.device).unsqueeze(-1)
    replaced = torch.where(eye, others_mean.unsqueeze(0), log_weights.unsqueeze(0))
    leave_one_out = torch.logsumexp(replaced, 1) - math.log(particles)
    return bound.unsqueeze(0) - leave_one_out


@OBJECTIVES.register("iwae")
class IWAE(Objective):
    """Importance weighted bound (Burda et al. 2016), per datapoint x:

        L_K(x) = log (1/K) sum_k w_k,   w_k = p(x, z_k) / q(z_k | x),   z_1..z_K ~ q(z | x),

    with the K particles vectorized by ``pyro.plate("particles", K)`` and the log-mean-exp
    taken over particles for each datapoint separately.

    Guide sites without ``rsample`` (categorical, Bernoulli, ...) get VIMCO's gradient
    (Mnih and Rezende 2016): the surrogate adds sum_k signal_k * log q(z_k) (see
    :func:`vimco_learning_signals`), so  grad = sum_k wtilde_k grad log w_k
    + sum_k (L - L_{-k}) grad log q(z_k),  unbiased for grad L_K. Reparameterized sites keep
    their pathwise gradient.

    ``dreg=True`` gives the doubly reparameterized guide gradient of Tucker et al. 2018,

        grad_phi = sum_k  wtilde_k^2 * d log w_k / d z_k * d z_k / d phi,   wtilde = softmax_k(log w),

    by evaluating log q with detached parameters and scaling the gradient that reaches each
    z_k (where the model and log q read it) by wtilde_k; model gradients are the IWAE ones.
    For guides whose site parameters depend on upstream latents, that dependence is treated
    as stop-gradient in log q. DReG needs every guide site reparameterized.

    Enumerated sites are refused: use ``enum_elbo`` to train such pairs (the importance-sampled
    log-likelihood still sums them out exactly).
    """

    name = "iwae"
    selection_metric = "iwae"

    def __init__(self, particles: int = 5, dreg: bool = False, max_plate_nesting: int | None = None):
        super().__init__(max_plate_nesting)
        if particles < 1:
            raise ValueError(f"iwae needs particles >= 1, got {particles}")
        self.particles = particles
        self.dreg = dreg

    def check_pair(self, info: PairInfo) -> None:
        super().check_pair(info)
        if self.dreg and info.score_function_sites:
            raise UnsupportedPairError(
                f"objective 'iwae' with dreg = true needs reparameterized guide sites, but "
                f"{info.score_function_sites[0]!r} of {info.model_name} has no rsample; set dreg = false (VIMCO)"
            )

    def _dreg_hook(self, holder):
        nesting = self.max_plate_nesting

        def prepare(guide_trace):
            for _, site in latent_sites(guide_trace):
                data_dim = [f.dim for f in site["cond_indep_stack"] if f.name == "data"][0]
                shape = [1] * (nesting + 1) + [1] * len(site["fn"].event_shape)
                shape[0] = self.particles
                shape[nesting + 1 + data_dim] = -1
                site["fn"] = detach_parameters(site["fn"])
                site["value"] = _ScaleGradient.apply(site["value"], holder, tuple(shape))

        return prepare

    def __call__(self, model, guide, batch):
        info = self.prepare(model, guide, batch)
        nesting = info.max_plate_nesting
        holder: dict[str, torch.Tensor] = {}
        use_dreg = self.dreg and torch.is_grad_enabled()
        model_trace, guide_trace = self._trace(
            model, guide, batch, before_model=self._dreg_hook(holder) if use_dreg else None
        )
        reconstruction, latent_terms = log_weight_terms(model_trace, guide_trace, nesting, True, scaled=True)
        log_weights = reconstruction + sum(latent_terms.values())  # (K, B)
        bound = log_mean_exp(log_weights, 0)
        # Auxiliary training terms are added to the bound, averaged over the particles, not inside it.
        auxiliary = {name: term.mean(0) for name, term in auxiliary_terms(model_trace, nesting, True).items()}
        surrogate = bound + sum(auxiliary.values()) if auxiliary else bound
        if info.score_function_sites and torch.is_grad_enabled():
            signals = vimco_learning_signals(log_weights)
            for name in info.score_function_sites:
                site = guide_trace.nodes[name]
                score = per_datapoint(site, site["score_parts"].score_function, nesting, True)
                # Adds the score-function gradient; its value is zero, so the loss stays -L_K.
                surrogate = surrogate + (signals * (score - score.detach())).sum(0)
        if use_dreg:
            holder["weights"] = torch.softmax(log_weights.detach(), 0)
        with torch.no_grad():
            if any("unannealed_scale" in site["infer"] for t in (model_trace, guide_trace) for _, site in latent_sites(t)):
                # Annealing: report the unannealed bound.
                plain_reconstruction, plain_terms = log_weight_terms(model_trace, guide_trace, nesting, True, scaled=False)
                plain_log_weights = plain_reconstruction + sum(plain_terms.values())
                plain_bound = log_mean_exp(plain_log_weights, 0)
            else:  # nothing annealed: the terms above are already the reported ones
                plain_reconstruction, plain_terms, plain_log_weights = reconstruction, latent_terms, log_weights
                plain_bound = bound
            per_datapoint_terms = [plain_log_weights, plain_reconstruction, *(-term for term in plain_terms.values())]
            values = torch.stack(per_datapoint_terms).mean((1, 2)).unbind()
        metrics = {"iwae": plain_bound.detach().mean(), "elbo": values[0], "reconstruction": values[1]}
        metrics.update({f"kl/{name}": value for name, value in zip(plain_terms, values[2:])})
        metrics.update({f"auxiliary/{name}": term.detach().mean() for name, term in auxiliary.items()})
        return -surrogate.mean(), metrics
