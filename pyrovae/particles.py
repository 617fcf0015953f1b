"""The particle dimension, and the layers that cannot take it.

pyrovae draws K samples per example as a leading dimension (``pyro.plate("particles", K)`` left
of the data plate): IWAE, ``elbo`` with ``particles > 1``, the importance-sampled log-likelihood and
the analysis all call a model with z of shape ``(K, B, D)``. Most torch layers take leading
dimensions; batch normalisation does not: ``BatchNorm1d`` reads ``(K, B, H)`` as
``(N, C, L)``, so it fails, or, when B equals H, silently normalises over the wrong axis.

:func:`make_batch_norm_particle_safe` hooks every batch-norm layer of a module so that, while a
particle plate is active, the extra leading dimensions are folded into the batch dimension and
unfolded afterwards. In evaluation mode (running statistics) this gives exactly what calling the
layer particle by particle gives. In training mode the batch statistics are those of all K x B
rows that the layer sees in one call. Enumeration dims (``enum_elbo``) are folded the same way.
"""

from __future__ import annotations

from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.indep_messenger import IndepMessenger
from pyro.poutine.runtime import _PYRO_STACK
from torch import nn

# Plates that hold particles: pyrovae's own, and Pyro's vectorized ELBO particles.
PARTICLE_PLATES = ("particles", "num_particles_vectorized")
_NATURAL_RANK = {nn.BatchNorm1d: 2, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}
_HOOKED = "_pyrovae_particle_safe"


def leading_dims_active() -> bool:
    """Whether a particle plate or parallel enumeration is on Pyro's stack: then networks may get
    extra dims left of the batch."""
    return any(
        (isinstance(frame, IndepMessenger) and frame.name in PARTICLE_PLATES) or isinstance(frame, EnumMessenger)
        for frame in _PYRO_STACK
    )


def _natural_rank(module: nn.Module) -> int:
    for kind, rank in _NATURAL_RANK.items():
        if isinstance(module, kind):
            return rank
    return 2


def _fold(module: nn.Module, args):
    (inputs, *rest) = args
    # Under particles or enumeration a layer is taken to see its natural input (BatchNorm1d:
    # (N, C)) with extra dims on the left; outside them the input is left as the user gives it
    # (a BatchNorm1d may also take (N, C, L)).
    extra = inputs.dim() - _natural_rank(module) if leading_dims_active() else 0
    if extra <= 0:
        module.__dict__["_pyrovae_leading"] = None
        return None
    leading = inputs.shape[: extra + 1]
    module.__dict__["_pyrovae_leading"] = leading
    return (inputs.reshape((-1,) + inputs.shape[extra + 1 :]), *rest)


def _unfold(module: nn.Module, args, output):
    leading = module.__dict__.get("_pyrovae_leading")
    if leading is None:
        return None
    return output.reshape(tuple(leading) + output.shape[1:])


def make_batch_norm_particle_safe(module: nn.Module) -> int:
    """Hook every batch-norm layer under ``module`` (once); returns how many layers it holds."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            count += 1
            if not layer.__dict__.get(_HOOKED):
                layer.register_forward_pre_hook(_fold)
                layer.register_forward_hook(_unfold)
                layer.__dict__[_HOOKED] = True
    return count
