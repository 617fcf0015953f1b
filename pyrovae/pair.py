"""The model/guide pair contract.

A *model* is a :class:`Model`, a ``PyroModule`` whose ``forward(**batch)`` tells
the generative story p(x, z) inside ``pyro.plate("data", batch_size)``.
A *guide* is a :class:`Guide`, whose ``forward(**batch)`` samples q(z | x) under
the same plate. Both take the same keyword arguments: the batch dict
(``x``, and optionally ``y``, ``y_mask``, ``lengths``, ...).

Each model declares its latent sites (:class:`LatentSite`); :func:`check_pair`
compares them with the guide's sample sites before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.util import prune_subsample_sites

from pyrovae.errors import DataError, PairMismatchError


@dataclass(frozen=True)
class DataSpec:
    """What the model needs to know about the data before it sees any.

    ``support`` is one of ``"binary"``, ``"unit_interval"``, ``"real"``, ``"categorical"``.
    ``image_shape`` (if the rows are flattened images) is used by plots only.
    """

    name: str
    x_shape: tuple[int, ...]
    support: str = "real"
    num_categories: int | None = None
    image_shape: tuple[int, ...] | None = None
    num_classes: int | None = None

    @property
    def x_features(self) -> int:
        size = 1
        for n in self.x_shape:
            size *= n
        return size


@dataclass(frozen=True)
class LatentSite:
    """A latent sample site the model promises to create, with its event shape."""

    name: str
    event_shape: tuple[int, ...]
    discrete: bool = False
    enumerated: bool = False


class _TorchOwnedParameters(PyroModule):
    """A PyroModule whose plain ``torch.nn`` children are returned as they are.

    PyroModule turns every access to a plain child module into ``pyro.module`` and one
    ``pyro.param`` statement per parameter, on every step. Here the fit loop's torch
    optimizer owns the parameters and nothing reads Pyro's param store, so those statements
    are pure overhead (about 5% of a step of a small VAE). Children that are PyroModules, and
    PyroParam/PyroSample attributes, keep Pyro's behaviour (e.g. priors on weights).
    """

    def __call__(self, *args, **kwargs):
        # PyroModule.__call__ enters a context that swaps Pyro's param-store state in and out
        # (four times a step for a model/guide pair). It only serves PyroParam/PyroSample
        # attributes; without any in the module tree, call the plain torch module.
        if self._holds_pyro_attributes():
            return super().__call__(*args, **kwargs)
        return torch.nn.Module.__call__(self, *args, **kwargs)

    def _holds_pyro_attributes(self) -> bool:
        # Scanning the module tree on every call costs more than the call itself for a small
        # network, so the answer is kept until an attribute of this module is set or deleted.
        held = self.__dict__.get("_pyro_attributes_held")
        if held is None:
            held = any(m._pyro_params or m._pyro_samples for m in self.modules() if isinstance(m, PyroModule))
            self.__dict__["_pyro_attributes_held"] = held
        return held

    def __setattr__(self, name: str, value):
        self.__dict__.pop("_pyro_attributes_held", None)
        super().__setattr__(name, value)

    def __delattr__(self, name: str):
        self.__dict__.pop("_pyro_attributes_held", None)
        super().__delattr__(name)

    def __getattr__(self, name: str):
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules and not isinstance(modules[name], PyroModule):
            return modules[name]
        return super().__getattr__(name)


class Model(_TorchOwnedParameters):
    """Base class of generative halves. Subclasses set ``Config`` (a dataclass),
    build their networks in ``__init__(config, data)``, list ``latent_sites``
    and write ``forward(x, **batch)`` as the generative story."""

    observed_site: str = "x"

    def __init__(self, data: DataSpec):
        super().__init__()
        self.data = data

    @property
    def latent_sites(self) -> tuple[LatentSite, ...]:
        raise NotImplementedError(f"{type(self).__name__} must declare its latent_sites")

    def check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`DataError` if ``batch["x"]`` does not fit this model."""
        if "x" not in batch:
            raise DataError(f"{type(self).__name__} needs a batch with key 'x'; got keys {sorted(batch)}")
        x = batch["x"]
        if tuple(x.shape[1:]) != tuple(self.data.x_shape):
            raise DataError(
                f"batch['x'] has shape {tuple(x.shape)}, but {type(self).__name__} was built for "
                f"x of shape (batch, {', '.join(map(str, self.data.x_shape))}) from data set {self.data.name!r}"
            )
        likelihood = getattr(self, "likelihood", None)
        if likelihood is not None:
            likelihood.check_data(x)


class Guide(_TorchOwnedParameters):
    """Base class of inference halves: ``__init__(config, data, model)`` may read the
    model's ``latent_sites`` to size its heads."""

    def __init__(self, data: DataSpec):
        super().__init__()
        self.data = data


def _sample_sites(trace) -> dict:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site["infer"].get("is_auxiliary")
    }


def check_pair(model: Model, guide: Guide, batch: Mapping[str, torch.Tensor]) -> None:
    """Compare the model's declared latent sites with what the guide and the model sample.

    Raises :class:`PairMismatchError` naming the site, e.g.
    ``guide has no site 'z2' of LadderModel``. Enumerated discrete sites may be
    missing from the guide.
    """
    model_name, guide_name = type(model).__name__, type(guide).__name__
    declared = {site.name: site for site in model.latent_sites}
    from pyrovae.traces import preserved_rng

    with torch.no_grad(), poutine.block(), preserved_rng():
        guide_trace = poutine.trace(guide).get_trace(**batch)
        guide_sites = _sample_sites(prune_subsample_sites(guide_trace))
        # Compare the guide with the declaration first: replaying a wrong guide may crash the model.
        for name, site in declared.items():
            if name not in guide_sites:
                if site.enumerated:
                    continue
                raise PairMismatchError(
                    f"guide has no site {name!r} of {model_name} ({guide_name} samples: {sorted(guide_sites)})"
                )
            event_shape = tuple(guide_sites[name]["fn"].event_shape)
            if event_shape != tuple(site.event_shape):
                raise PairMismatchError(
                    f"{guide_name} samples site {name!r} with event shape {event_shape}, "
                    f"but {model_name} declares {tuple(site.event_shape)}"
                )
        for name in guide_sites:
            if name not in declared:
                raise PairMismatchError(
                    f"{guide_name} samples site {name!r} that {model_name} does not declare (declared: {sorted(declared)})"
                )
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
    model_sites = _sample_sites(prune_subsample_sites(model_trace))
    for name in declared:
        if name not in model_sites:
            raise PairMismatchError(f"{model_name} declares latent site {name!r} but never samples it")
    for name in model_sites:
        if name not in declared:
            raise PairMismatchError(f"{model_name} samples latent site {name!r} but does not declare it in latent_sites")
