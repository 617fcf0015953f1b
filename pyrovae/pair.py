"""The model/guide pair contract.

A *model* is a :class:`Model`, a ``PyroModule`` whose ``forward(**batch)`` tells
the generative story p(x, z) inside ``pyro.plate("data", batch_size)``.
A *guide* is a :class:`Guide`, whose ``forward(**batch)`` samples q(z | x) under
the same plate. Both take the same keyword arguments: the batch dict (``x``, and
optionally ``y``, ``y_mask``, ``mask``, ``lengths``, ...; the batch contract is
written out in :mod:`pyrovae.data`) plus any scheduled inputs (python floats).

A :class:`DataSpec` describes the data (shape, support, vocabulary, labels,
variable length) and checks batches against it (:meth:`DataSpec.check_batch`).
Each model declares its latent sites (:class:`LatentSite`); :func:`check_pair`
compares them with the guide's sample sites, event shapes and supports before any
training starts.
"""

from __future__ import annotations

import functools
import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping

import pyro
import pyro.distributions.constraints as pyro_constraints
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.distributions import Delta
from pyro.nn import PyroModule
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import constraints

from pyrovae.errors import DataError, MissingLatentSitesError, PairMismatchError
from pyrovae.handlers import AUXILIARY_TERM
from pyrovae.particles import make_batch_norm_particle_safe

LABEL_FORMATS = ("integer", "multi_hot")
DATA_PLATE = "data"
_DATA_PLATE_ALIAS = "_pyrovae_data_plate_alias"


@dataclass(frozen=True)
class DataSpec:
    """What the model needs to know about the data before it sees any.

    ``x_shape`` is the shape of one example (without the batch dim). ``support`` is one of
    ``"binary"``, ``"unit_interval"``, ``"real"``, ``"categorical"``; categorical data are
    integer tokens or category indices in ``[0, num_categories)`` and must come as an integer
    tensor. ``image_shape`` (if the rows are flattened images) is used by plots only.

    Sequences: with ``variable_length = True``, ``x_shape[0]`` is the *maximum* length; a
    batch's ``x`` may be shorter on dim 1 (e.g. trimmed to its longest row), and every batch
    must say which positions are real with ``mask`` (bool, (B, T)) and/or ``lengths``
    (int, (B,)). ``padding_index`` is the value written at padded positions (for embeddings
    with a padding row); :meth:`check_batch` does not check padded positions against the vocabulary.

    Labels: ``num_classes`` classes, given as ``y`` in ``label_format`` ``"integer"`` (class
    indices, shape (B,)) or ``"multi_hot"`` (0/1, shape (B, num_classes)).
    """

    name: str
    x_shape: tuple[int, ...]
    support: str = "real"
    num_categories: int | None = None
    image_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    label_format: str = "integer"
    variable_length: bool = False
    padding_index: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "x_shape", tuple(int(n) for n in self.x_shape))
        if self.image_shape is not None:
            object.__setattr__(self, "image_shape", tuple(int(n) for n in self.image_shape))
        if self.label_format not in LABEL_FORMATS:
            raise ValueError(
                f"DataSpec {self.name!r}: label_format must be one of {', '.join(LABEL_FORMATS)}, got {self.label_format!r}"
            )
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"DataSpec {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        if self.variable_length and (not self.x_shape or self.x_shape[0] < 1):
            raise ValueError(f"DataSpec {self.name!r}: variable-length data need x_shape = (max_length, ...), got {self.x_shape}")

    @property
    def x_features(self) -> int:
        size = 1
        for n in self.x_shape:
            size *= n
        return size

    @property
    def max_length(self) -> int | None:
        """The longest sequence a batch may hold (variable-length data), else None."""
        return self.x_shape[0] if self.variable_length else None

    def check_batch(self, batch: Mapping[str, object], owner: str | None = None) -> None:
        """Raise :class:`DataError` if ``batch`` breaks the batch contract for this data set
        (see :mod:`pyrovae.data`): ``x`` (shape, dtype, vocabulary), ``y``, ``y_mask``, ``mask``,
        ``lengths``, and one row count for every tensor. Each message names the key, the row and
        an offending value. Values that are not tensors (scheduled inputs) pass through."""
        _BatchCheck(self, batch, owner).run()


def _integer_dtype(tensor: torch.Tensor) -> bool:
    return not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and tensor.dtype != torch.bool


def _first_index(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def _format_value(value: torch.Tensor) -> str:
    item = value.item()
    return f"{item:g}" if isinstance(item, float) else str(item)


def _head(tensor: torch.Tensor) -> str:
    """The first value of a tensor, for messages."""
    return _format_value(tensor.reshape(-1)[0]) if tensor.numel() else "nothing"


def first_offender(bad: torch.Tensor, values: torch.Tensor, noun: str = "feature") -> tuple[str, str]:
    """(``"row r, feature f"``, the value there) for the first True of ``bad`` (rows on dim 0), for messages."""
    index = _first_index(bad)
    return _where(index, noun), _format_value(values[index])


def _where(index: tuple[int, ...], noun: str) -> str:
    row, rest = index[0], index[1:]
    if not rest:
        return f"row {row}"
    return f"row {row}, {noun} {rest[0] if len(rest) == 1 else tuple(rest)}"


class _BatchCheck:
    """One run of :meth:`DataSpec.check_batch`, split into one method per key."""

    def __init__(self, spec: DataSpec, batch: Mapping[str, object], owner: str | None):
        self.spec, self.batch = spec, batch
        self.owner = owner or f"data set {spec.name!r}"
        self.about = f"data set {spec.name!r}"

    def fail(self, message: str):
        raise DataError(message)

    def run(self) -> None:
        batch = self.batch
        if "x" not in batch:
            self.fail(f"{self.owner} needs a batch with key 'x'; got keys {sorted(batch)}")
        x = batch["x"]
        if not torch.is_tensor(x) or x.dim() == 0:
            self.fail(f"batch['x'] must be a tensor with the examples on dim 0; got {type(x).__name__} {getattr(x, 'shape', '')}")
        self.rows = int(x.shape[0])
        for key, value in batch.items():
            if not torch.is_tensor(value):
                continue  # scheduled inputs (python numbers) and anything else a loader adds
            if value.dim() == 0 or value.shape[0] != self.rows:
                self.fail(
                    f"batch[{key!r}] has shape {tuple(value.shape)}, but batch['x'] has {self.rows} rows: "
                    "every tensor of a batch holds the examples on dim 0"
                )
        self.check_x_shape(x)
        mask = self.check_mask(x)
        lengths = self.check_lengths(x)
        if mask is not None and lengths is not None:
            self.check_mask_matches_lengths(mask, lengths)
        if self.spec.variable_length and mask is None and lengths is None:
            self.fail(
                f"{self.about} holds variable-length sequences, but the batch has neither 'mask' nor 'lengths' "
                f"(keys: {sorted(batch)}): say which positions are real"
            )
        observed = mask if mask is not None else None
        if observed is None and lengths is not None:
            observed = torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(-1)
        self.check_x_values(x, observed)
        self.check_labels()

    # --- x -----------------------------------------------------------------------------------

    def check_x_shape(self, x: torch.Tensor) -> None:
        spec, shape = self.spec, tuple(x.shape)
        expected = "(batch, " + ", ".join(map(str, spec.x_shape)) + ")"
        if spec.variable_length:
            good = x.dim() == 1 + len(spec.x_shape) and 1 <= x.shape[1] <= spec.x_shape[0] and shape[2:] == spec.x_shape[1:]
            if not good:
                rest = "".join(f", {n}" for n in spec.x_shape[1:])
                self.fail(
                    f"batch['x'] has shape {shape}, but {self.owner} was built for variable-length x of shape "
                    f"(batch, length{rest}) with 1 <= length <= {spec.x_shape[0]} from {self.about}"
                )
        elif shape[1:] != spec.x_shape:
            self.fail(f"batch['x'] has shape {shape}, but {self.owner} was built for x of shape {expected} from {self.about}")

    def check_x_values(self, x: torch.Tensor, observed: torch.Tensor | None) -> None:
        spec = self.spec
        noun = "position" if spec.variable_length else "feature"
        if x.dtype.is_floating_point:
            bad = ~torch.isfinite(x)
            if bad.any():
                index = _first_index(bad)
                self.fail(
                    f"batch['x'] {_where(index, noun)} holds {_format_value(x[index])}: data contains NaN or infinite values"
                )
        if spec.support != "categorical":
            return
        if not _integer_dtype(x):
            example = _head(x)
            self.fail(
                f"batch['x'] has dtype {x.dtype}, but {self.about} holds integer tokens (support 'categorical'); "
                f"row 0 starts with {example}: give x as an integer tensor (e.g. x.long())"
            )
        if spec.num_categories:
            bad = (x < 0) | (x >= spec.num_categories)
            if observed is not None:
                bad = bad & observed.reshape(observed.shape + (1,) * (x.dim() - 2))
            if bad.any():
                index = _first_index(bad)
                self.fail(
                    f"batch['x'] {_where(index, noun)} holds {_format_value(x[index])}, outside the vocabulary "
                    f"[0, {spec.num_categories - 1}] of {self.about}"
                )

    # --- sequences -----------------------------------------------------------------------------

    def check_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        mask = self.batch.get("mask")
        if not torch.is_tensor(mask):
            return None
        if mask.dtype != torch.bool:
            self.fail(
                f"batch['mask'] has dtype {mask.dtype} (row 0 starts with {_head(mask)}); "
                "it must be bool, True at the real positions of x"
            )
        if x.dim() < 2 or tuple(mask.shape) != tuple(x.shape[:2]):
            self.fail(
                f"batch['mask'] has shape {tuple(mask.shape)}, but batch['x'] has shape {tuple(x.shape)}: "
                f"mask must be (batch, length) = {tuple(x.shape[:2])}"
            )
        return mask

    def check_lengths(self, x: torch.Tensor) -> torch.Tensor | None:
        lengths = self.batch.get("lengths")
        if not torch.is_tensor(lengths):
            return None
        if not _integer_dtype(lengths):
            self.fail(
                f"batch['lengths'] has dtype {lengths.dtype} (row 0 holds {_head(lengths)}); "
                "it must be an integer tensor"
            )
        if lengths.dim() != 1:
            self.fail(f"batch['lengths'] has shape {tuple(lengths.shape)}; it must be (batch,) = ({self.rows},)")
        if x.dim() < 2:
            self.fail(f"batch['lengths'] is given, but batch['x'] has shape {tuple(x.shape)}: no length dim to measure")
        longest = int(x.shape[1])
        bad = (lengths < 1) | (lengths > longest)
        if bad.any():
            row = _first_index(bad)[0]
            self.fail(
                f"batch['lengths'] row {row} holds {int(lengths[row])}, but lengths must lie in [1, {longest}] "
                f"(the length of batch['x'], shape {tuple(x.shape)})"
            )
        return lengths

    def check_mask_matches_lengths(self, mask: torch.Tensor, lengths: torch.Tensor) -> None:
        expected = torch.arange(mask.shape[1], device=mask.device) < lengths.unsqueeze(-1)
        bad = mask != expected
        if bad.any():
            row, position = _first_index(bad)
            self.fail(
                f"batch['mask'] row {row} disagrees with batch['lengths'] (length {int(lengths[row])}): position "
                f"{position} is {bool(mask[row, position])}; mask must be True exactly before the length"
            )

    # --- labels -------------------------------------------------------------------------------

    def check_labels(self) -> None:
        spec, y, y_mask = self.spec, self.batch.get("y"), self.batch.get("y_mask")
        if torch.is_tensor(y_mask):
            if not torch.is_tensor(y):
                self.fail(f"the batch has 'y_mask' but no 'y' (keys: {sorted(self.batch)})")
            if y_mask.dtype != torch.bool:
                self.fail(
                    f"batch['y_mask'] has dtype {y_mask.dtype} (row 0 holds {_head(y_mask)}); "
                    "it must be bool, True where the label is observed"
                )
            if y_mask.dim() != 1:
                self.fail(f"batch['y_mask'] has shape {tuple(y_mask.shape)}; it must be (batch,) = ({self.rows},)")
        if not torch.is_tensor(y) or spec.num_classes is None:
            return
        classes = spec.num_classes
        if spec.label_format == "integer":
            if y.dim() != 1:
                self.fail(
                    f"batch['y'] has shape {tuple(y.shape)}, but {self.about} has integer labels: expected shape "
                    f"({self.rows},) of class indices in [0, {classes - 1}]"
                )
            if not _integer_dtype(y):
                self.fail(
                    f"batch['y'] has dtype {y.dtype} (row 0 holds {_head(y)}), but {self.about} has integer "
                    f"labels: class indices as an integer tensor"
                )
            bad = (y < 0) | (y >= classes)
            if bad.any():
                row = _first_index(bad)[0]
                hint = ""
                if torch.is_tensor(y_mask) and not bool(y_mask[row]):
                    hint = " (an unobserved label, but it must still be a valid index; loaders write 0)"
                self.fail(
                    f"batch['y'] row {row} holds {_format_value(y[row])}, outside the classes [0, {classes - 1}] of "
                    f"{self.about}{hint}"
                )
        else:
            if tuple(y.shape) != (self.rows, classes):
                self.fail(
                    f"batch['y'] has shape {tuple(y.shape)}, but {self.about} has multi-hot labels: expected shape "
                    f"({self.rows}, {classes})"
                )
            bad = (y != 0) & (y != 1)
            if bad.any():
                row, label = _first_index(bad)
                self.fail(
                    f"batch['y'] row {row}, class {label} holds {_format_value(y[row, label])}; multi-hot labels must be 0 or 1"
                )


@dataclass(frozen=True)
class LatentSite:
    """A latent sample site the model promises to create, with its event shape."""

    name: str
    event_shape: tuple[int, ...]
    discrete: bool = False
    enumerated: bool = False


class _RenamePlate(Messenger):
    """Renames one plate's frames at every site: a model's data plate, whatever its name, reaches
    the objectives and the analysis as ``"data"``."""

    def __init__(self, old: str, new: str):
        super().__init__()
        self.old, self.new = old, new

    def _process_message(self, msg):
        stack = msg.get("cond_indep_stack")
        if stack and any(frame.name == self.old for frame in stack):
            msg["cond_indep_stack"] = tuple(frame._replace(name=self.new) if frame.name == self.old else frame for frame in stack)


@functools.lru_cache(maxsize=None)
def _keywords_of(cls) -> frozenset | None:
    """The keyword names ``cls.forward`` takes; None when it takes ``**batch`` (every key)."""
    parameters = inspect.signature(cls.forward).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


# Batch keys that change what x means: a forward that does not take them would score padding as data
# (mask, lengths) or hidden labels as class 0 (y_mask, where it takes y).
_KEYS_THAT_QUALIFY_X = ("mask", "lengths")


def _keywords_taken(cls, accepted: frozenset, kwargs: dict, scheduled_inputs) -> dict:
    """The keyword arguments a ``forward`` without ``**batch`` is called with: the batch keys it
    names, as Pyro's examples write ``forward(self, x)``. A key it does not take but whose meaning it
    would get wrong (a mask, the lengths, y_mask beside y) or a scheduled input it declares is a TypeError."""
    qualifying = [key for key in _KEYS_THAT_QUALIFY_X if key in kwargs and key not in accepted]
    if "y" in accepted and "y_mask" in kwargs and "y_mask" not in accepted:
        qualifying.append("y_mask")
    if qualifying:
        raise TypeError(
            f"{cls.__name__}.forward takes no {qualifying[0]!r}, which the batch has and which says how to read "
            f"{'y' if qualifying[0] == 'y_mask' else 'x'}: take it as an argument (or take **batch)"
        )
    missing = sorted(set(scheduled_inputs).intersection(kwargs) - accepted)
    if missing:
        raise TypeError(f"{cls.__name__}.forward declares the scheduled input {missing[0]!r} but takes no such argument")
    return {key: value for key, value in kwargs.items() if key in accepted}


class _TorchOwnedParameters(PyroModule):
    """A PyroModule whose plain ``torch.nn`` children are returned as they are.

    PyroModule turns every access to a plain child module into ``pyro.module`` and one
    ``pyro.param`` statement per parameter, on every step. Here the fit loop's torch
    optimizer owns the parameters and nothing reads Pyro's param store, so those statements
    are pure overhead (about 5% of a step of a small VAE). Children that are PyroModules, and
    PyroParam/PyroSample attributes, keep Pyro's behaviour (e.g. priors on weights).
    """

    def __call__(self, *args, **kwargs):
        accepted = _keywords_of(type(self))
        if accepted is not None and not accepted.issuperset(kwargs):
            kwargs = _keywords_taken(type(self), accepted, kwargs, getattr(self, "scheduled_inputs", None) or ())
        alias = self.__dict__.get(_DATA_PLATE_ALIAS)
        if alias is not None:
            with _RenamePlate(alias, DATA_PLATE):
                return self._call(args, kwargs)
        return self._call(args, kwargs)

    def _call(self, args, kwargs):
        # PyroModule.__call__ enters a context that swaps Pyro's param-store state in and out
        # (four times a step for a model/guide pair). It only serves PyroParam/PyroSample
        # attributes; without any in the module tree, call the plain torch module.
        if self._holds_pyro_attributes():
            # Module-local parameters for pyrovae's own calls only: importing pyrovae changes no
            # global Pyro setting (the loop's torch optimizer owns these parameters).
            with pyro.settings.context(module_local_params=True):
                return super().__call__(*args, **kwargs)
        return torch.nn.Module.__call__(self, *args, **kwargs)

    def _holds_pyro_attributes(self) -> bool:
        # Scanning the module tree on every call costs more than the call itself for a small
        # network, so the answer is kept until an attribute of this module is set or deleted.
        held = self.__dict__.get("_pyro_attributes_held")
        if held is None:
            make_batch_norm_particle_safe(self)
            held = any(m._pyro_params or m._pyro_samples for m in self.modules() if isinstance(m, PyroModule))
            if held:
                for module in self.modules():
                    context = getattr(module, "_pyro_context", None)
                    if context is not None and not hasattr(context, "param_state"):
                        # Built while the global setting was off: give the context the local
                        # store that module_local_params=True expects.
                        context.param_state = {"params": {}, "constraints": {}}
            self.__dict__["_pyro_attributes_held"] = held
        return held

    def use_data_plate(self, name: str) -> None:
        """Treat the plate ``name`` as the data plate (pyrovae's objectives and analysis read
        per-example terms from the plate they call ``"data"``): its frames are renamed on every
        call of this module. Set by :meth:`Model.describe` from the model's own trace."""
        self.__dict__[_DATA_PLATE_ALIAS] = None if name == DATA_PLATE else name

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

    __pyrovae_kind__ = "model"  # subclasses may be named by import path (pyrovae.registry.declare)

    def __init__(self, data: DataSpec):
        super().__init__()
        self.data = data

    def describe(self, batch: Mapping[str, object]):
        """Trace the model once on ``batch`` and keep what the trace shows
        (:class:`pyrovae.description.ModelDescription`): the latent sites (so ``latent_sites``
        need not be written), the observed sites, the data plate (any name: it is used as pyrovae's
        ``"data"`` plate from then on) and the dependencies an automatic guide follows. A
        ``latent_sites`` the class declares is checked against the trace. pyrovae calls this on
        the first batch before training (and ``Experiment`` before building the guide)."""
        from pyrovae.description import describe_model

        self.use_data_plate(DATA_PLATE)
        with buffers_kept(self):
            description = describe_model(self, batch, declares_latent_sites(self))
        self.use_data_plate(description.data_plate)
        if declares_latent_sites(self):
            description = _checked_declaration(self, description)
        self.__dict__["_pyrovae_description"] = description
        return description

    @property
    def description(self):
        """What :meth:`describe` found, or None before the model was traced."""
        return self.__dict__.get("_pyrovae_description")

    @property
    def latent_sites(self) -> tuple[LatentSite, ...]:
        """The latent sites, taken from the model's trace (:meth:`describe`). A subclass may declare
        them instead; the declaration is then checked against the trace."""
        if self.description is None:
            raise MissingLatentSitesError(_missing_latent_sites(type(self).__name__))
        return tuple(
            LatentSite(s.name, s.event_shape, discrete=s.discrete, enumerated=s.enumerated) for s in self.description.latent
        )

    @property
    def observed_site(self) -> str:
        """The site that observes ``x`` (from the trace; a subclass may set ``observed_site = "obs"``)."""
        return self.description.observed_site if self.description is not None else "x"

    def check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`DataError` if ``batch`` breaks the batch contract for this model's data
        (:meth:`DataSpec.check_batch`) or ``x`` lies outside its likelihood's support."""
        self.data.check_batch(batch, owner=type(self).__name__)
        likelihood = getattr(self, "likelihood", None)
        if likelihood is not None and hasattr(likelihood, "check_data"):
            likelihood.check_data(batch["x"])


def auxiliary_term(name: str, value: torch.Tensor) -> None:
    """Add ``value`` (shaped like the enclosing plates, e.g. one score per datapoint inside the data
    plate) to what training maximises, as ``pyro.factor`` would, while keeping it out of p(x, z):

        training objective = ELBO + sum_n value_n,

    for an auxiliary loss such as Zhao et al. 2017's bag-of-words term. Every reported number
    leaves it out (``elbo``, ``reconstruction``, the importance-sampled log p(x), ArviZ's
    log-likelihoods: :func:`pyrovae.traces.observed_sites` with ``auxiliary=False``); pyrovae's
    objectives report it apart as the metric ``auxiliary/<name>`` (IWAE adds its mean over the
    particles to the bound, outside the log-mean-exp). A model adds it in training only
    (``if self.training``), so evaluation runs the generative model alone."""
    unit = pyro.distributions.Unit(value)
    pyro.sample(name, unit, obs=unit.sample(), infer={"is_auxiliary": True, AUXILIARY_TERM: True})


def _missing_latent_sites(model_name: str) -> str:
    return (
        f"{model_name} has not been traced yet, so its latent sites are unknown: call model.describe(batch) "
        f"once (pyrovae's fit and Experiment do), or declare a property `latent_sites`"
    )


def declares_latent_sites(model) -> bool:
    """Whether the model's class writes its own ``latent_sites`` (the base class reads the trace)."""
    return isinstance(model, Model) and type(model).latent_sites is not Model.latent_sites


def _checked_declaration(model, description):
    """The description with a declared ``latent_sites`` checked against the trace: the same names and
    event shapes; a site declared ``enumerated`` is enumerated."""
    from dataclasses import replace

    name = type(model).__name__
    declared = {site.name: site for site in model.latent_sites}
    traced = {site.name: site for site in description.latent}
    for site_name in declared:
        if site_name not in traced:
            raise PairMismatchError(f"{name} declares latent site {site_name!r} but never samples it (its trace samples: {sorted(traced)})")
    for site_name, site in traced.items():
        if site_name not in declared:
            raise PairMismatchError(f"{name} samples latent site {site_name!r} but does not declare it in latent_sites")
        if tuple(declared[site_name].event_shape) != site.event_shape:
            raise PairMismatchError(
                f"{name} declares latent site {site_name!r} with event shape {tuple(declared[site_name].event_shape)}, "
                f"but its trace samples event shape {site.event_shape}"
            )
    latent = tuple(replace(site, enumerated=site.enumerated or declared[site.name].enumerated) for site in description.latent)
    return replace(description, latent=latent)


class Guide(_TorchOwnedParameters):
    """Base class of inference halves: ``__init__(config, data, model)`` may read the
    model's ``latent_sites`` to size its heads."""

    __pyrovae_kind__ = "guide"  # subclasses may be named by import path (pyrovae.registry.declare)

    def __init__(self, data: DataSpec):
        super().__init__()
        self.data = data


def _sample_sites(trace) -> dict:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site["infer"].get("is_auxiliary")
    }


# --- supports ----------------------------------------------------------------------------------
#
# torch constraints have no equality (``real_vector == independent(real, 1)`` is False), so
# supports are compared by what they mean: the guide's support must lie inside the prior's
# (every draw of q has density under p), with Independent wrappers removed (event shapes are
# compared separately), bounds compared as numbers and discrete never confused with continuous.

_INF = float("inf")
_NAMED_SUPPORTS = (
    "real", "boolean", "integer", "positive", "nonnegative", "unit_interval", "simplex", "one_hot",
    "nonnegative_integer", "positive_integer", "sphere", "ordered_vector", "positive_ordered_vector",
    "lower_cholesky", "lower_triangular", "unit_lower_cholesky", "softplus_lower_cholesky", "corr_cholesky",
    "corr_matrix", "positive_definite", "positive_semidefinite", "symmetric", "square", "softplus_positive",
)  # fmt: skip
# (inner, outer) constraint classes, by name, where every value of inner lies in outer.
_KNOWN_SUBSETS = {
    ("_CorrCholesky", "_LowerCholesky"), ("_CorrCholesky", "_LowerTriangular"), ("_LowerCholesky", "_LowerTriangular"),
    ("_UnitLowerCholesky", "_LowerCholesky"), ("_UnitLowerCholesky", "_LowerTriangular"),
    ("_PositiveOrderedVector", "_OrderedVector"), ("_CorrMatrix", "_PositiveDefinite"),
    ("_CorrMatrix", "_PositiveSemidefinite"), ("_CorrMatrix", "_Symmetric"), ("_CorrMatrix", "_Square"),
    ("_PositiveDefinite", "_PositiveSemidefinite"),
}  # fmt: skip
_CONSTRAINT_MODULES = ("torch.distributions.constraints", "pyro.distributions.constraints")


def _unwrap_support(constraint):
    """The constraint on the innermost values: Independent and mixture wrappers removed."""
    while isinstance(constraint, (constraints.independent, constraints.MixtureSameFamilyConstraint)):
        constraint = constraint.base_constraint
    return constraint


def _scalar_set(constraint):
    """(integer, low, low_closed, high, high_closed) for a constraint on single numbers, else None."""
    c = constraints
    if isinstance(constraint, c._Real):
        return (False, -_INF, False, _INF, False)
    if isinstance(constraint, c._Boolean):
        return (True, 0, True, 1, True)
    if isinstance(constraint, pyro_constraints._Integer):
        return (True, -_INF, False, _INF, False)
    if isinstance(constraint, c._IntegerInterval):
        return (True, constraint.lower_bound, True, constraint.upper_bound, True)
    if isinstance(constraint, c._IntegerGreaterThan):
        return (True, constraint.lower_bound, True, _INF, False)
    if isinstance(constraint, c._IntegerLessThan):
        return (True, -_INF, False, constraint.upper_bound, True)
    if isinstance(constraint, c._GreaterThanEq):
        return (False, constraint.lower_bound, True, _INF, False)
    if isinstance(constraint, c._GreaterThan):
        return (False, constraint.lower_bound, False, _INF, False)
    if isinstance(constraint, c._LessThan):
        return (False, -_INF, False, constraint.upper_bound, False)
    if isinstance(constraint, c._HalfOpenInterval):
        return (False, constraint.lower_bound, True, constraint.upper_bound, False)
    if isinstance(constraint, c._Interval):
        return (False, constraint.lower_bound, True, constraint.upper_bound, True)
    return None


def _as_number(bound) -> torch.Tensor:
    if torch.is_tensor(bound):
        return bound.detach().to("cpu", torch.float64)
    return torch.tensor(float(bound), dtype=torch.float64)


def _interval_contains(outer, inner) -> bool | None:
    if outer[0] != inner[0]:
        return False
    try:
        o_low, o_high, i_low, i_high = (_as_number(b) for b in (outer[1], outer[3], inner[1], inner[3]))
        # Open or closed ends differ by a set of measure zero for densities: compare them for
        # integers only (whose finite ends are always closed here).
        integer = outer[0]
        low_ok = (i_low > o_low) | ((i_low == o_low) & (not integer or not inner[2] or outer[2]))
        high_ok = (i_high < o_high) | ((i_high == o_high) & (not integer or not inner[4] or outer[4]))
        return bool((low_ok & high_ok).all())
    except RuntimeError:  # bounds of shapes that do not broadcast
        return None


def _same_parameters(a, b) -> bool:
    try:
        left, right = vars(a), vars(b)
        if left.keys() != right.keys():
            return False
        for key, value in left.items():
            other = right[key]
            if torch.is_tensor(value) or torch.is_tensor(other):
                if not bool((_as_number(value) == _as_number(other)).all()):
                    return False
            elif value is not other and value != other:
                return False
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def support_contains(outer, inner) -> bool | None:
    """Whether every value allowed by constraint ``inner`` is allowed by ``outer``: True, False,
    or None when the constraints are not ones this function understands."""
    outer, inner = _unwrap_support(outer), _unwrap_support(inner)
    if isinstance(outer, constraints._Dependent) or isinstance(inner, constraints._Dependent):
        return None
    if bool(outer.is_discrete) != bool(inner.is_discrete):
        return False
    if isinstance(outer, constraints._Real) and not inner.is_discrete:
        return True  # real numbers hold every continuous support, whatever its event dim
    outer_set, inner_set = _scalar_set(outer), _scalar_set(inner)
    if outer_set is not None and inner_set is not None:
        return _interval_contains(outer_set, inner_set)
    if outer_set is None and inner_set is None and outer.event_dim == inner.event_dim:
        if isinstance(inner, type(outer)) and _same_parameters(outer, inner):
            return True
        if (type(inner).__name__, type(outer).__name__) in _KNOWN_SUBSETS:
            return True
        if type(inner) is type(outer):
            return None  # the same kind of set with other parameters
    understood = (constraints._Cat, constraints._Stack)
    if all(type(c).__module__ in _CONSTRAINT_MODULES and not isinstance(c, understood) for c in (outer, inner)):
        return False
    return None


def describe_support(constraint) -> str:
    """A constraint by its Pyro name (``real``, ``simplex``, ``interval(0, 1)`` ...), wrappers removed."""
    base = _unwrap_support(constraint)
    for name in _NAMED_SUPPORTS:
        if getattr(pyro_constraints, name, None) is base:
            return name
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(base).__name__.lstrip("_")).lower()
    bounds = [getattr(base, key) for key in ("lower_bound", "upper_bound") if hasattr(base, key)]
    if bounds:
        shown = [_format_bound(b) for b in bounds]
        name += "(" + ", ".join(shown) + ")"
    return name


def _format_bound(bound) -> str:
    if not torch.is_tensor(bound):
        return f"{bound:g}"
    values = bound.detach().unique()
    return _format_value(values[0]) if values.numel() == 1 else f"tensor of {bound.numel()} bounds"


def _innermost_distribution(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _support_mismatch(name: str, guide_site: dict, model_site: dict, guide_name: str, model_name: str) -> str | None:
    """A message if the guide's draws at a site can fall outside the model's support there."""
    try:
        guide_support, model_support = guide_site["fn"].support, model_site["fn"].support
    except (AttributeError, NotImplementedError):
        return None
    if isinstance(_innermost_distribution(guide_site["fn"]), Delta):
        contained = None  # a point guide (MAP) declares a nominal support: look at its value
    else:
        contained = support_contains(model_support, guide_support)
    if contained is None:
        try:
            contained = bool(model_support.check(guide_site["value"]).all())
        except Exception:  # a support that cannot check this value: nothing to say
            return None
    if contained:
        return None
    guide_text, model_text = describe_support(guide_support), describe_support(model_support)
    if guide_text == model_text:
        guide_text += f" (event dim {guide_support.event_dim})"
        model_text += f" (event dim {model_support.event_dim})"
    message = f"{guide_name} samples site {name!r} with support {guide_text}, but {model_name}'s prior has support {model_text}"
    guide_discrete, model_discrete = bool(guide_support.is_discrete), bool(model_support.is_discrete)
    if model_discrete and not guide_discrete:
        return message + "; a discrete site needs a discrete guide (or an enumerated site and an enumerating objective)"
    if guide_discrete and not model_discrete:
        return message + "; a continuous site needs a continuous guide"
    return message + "; every draw of the guide must lie in the prior's support"


def _observed_outside_support(trace, model_name: str) -> str | None:
    """The first observed site whose data (where unmasked) lie outside its distribution's support,
    such as grey levels observed by a Bernoulli; None when all data fit."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or site["infer"].get(AUXILIARY_TERM):
            continue
        fn, value = site["fn"], site["value"]
        if getattr(_innermost_distribution(fn), "_validate_args", True) is False:
            continue  # validate_args=False (as Pyro's VAE tutorial writes for grey levels), or validation off
        try:
            inside = fn.support.check(value)
            mask = site.get("mask")
            if torch.is_tensor(mask):
                inside = inside | ~mask.bool()
            if bool(inside.all()):
                continue
        except Exception:  # noqa: BLE001 - a support that cannot check these data: nothing to say
            continue
        base, values = _innermost_distribution(fn), value.detach().float()
        example = f"values in [{float(values.min()):g}, {float(values.max()):g}]"
        try:
            outside = ~base.support.check(value)
            if outside.shape == value.shape and bool(outside.any()):
                where = tuple(int(i) for i in outside.nonzero()[0])
                example = f"e.g. {float(values[where]):g} at index {list(where)}, {example}"
        except Exception:  # noqa: BLE001 - the range alone then
            pass
        advice = (
            "binarize the data ([data] binarize = 'dynamic' or 'static'), or observe them with a distribution whose support "
            "holds them (or pass validate_args=False to score them as they are)"
            if isinstance(base, torch.distributions.Bernoulli)
            else "observe them with a distribution whose support holds them, or transform the data to its support"
        )
        return (
            f"{model_name} observes site {name!r} with {type(base).__name__} (support "
            f"{describe_support(fn.support)}), but the data lie outside it ({example}): {advice}"
        )
    return None


def _first_support_mismatch(guide_sites: dict, model_sites: dict, guide_name: str, model_name: str) -> str | None:
    for name, guide_site in guide_sites.items():
        if name in model_sites:
            message = _support_mismatch(name, guide_site, model_sites[name], guide_name, model_name)
            if message:
                return message
    return None


def check_pair(model: Model, guide: Guide, batch: Mapping[str, object]) -> None:
    """Compare the model's declared latent sites with what the guide and the model sample.

    Raises :class:`PairMismatchError` naming the site, e.g.
    ``guide has no site 'z2' of LadderModel``, or a support the guide's draws can leave,
    e.g. ``DiagonalNormalGuide samples site 'theta' with support real, but MyModel's prior
    has support simplex``. Enumerated discrete sites may be missing from the guide. ``batch``
    is what the pair is called with: the batch's tensors and any scheduled inputs (floats).
    """
    with buffers_kept(model, guide):
        _check_pair(model, guide, batch)


def _check_pair(model: Model, guide: Guide, batch: Mapping[str, object]) -> None:
    model_name, guide_name = type(model).__name__, type(guide).__name__
    if isinstance(model, Model) and model.description is None:
        model.describe(batch)
    if not hasattr(type(model), "latent_sites"):
        raise MissingLatentSitesError(_missing_latent_sites(model_name))
    share_data_plate(model, guide)
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
        try:
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**batch)
        except Exception as error:
            # Draws of the wrong kind (floats at a discrete site) can crash the model: if the
            # supports say why, say that instead of the crash.
            try:
                prior_sites = _sample_sites(prune_subsample_sites(poutine.trace(model).get_trace(**batch)))
            except Exception:
                raise error from None
            message = _first_support_mismatch(guide_sites, prior_sites, guide_name, model_name)
            if message:
                raise PairMismatchError(message) from error
            raise
    model_sites = _sample_sites(prune_subsample_sites(model_trace))
    for name in declared:
        if name not in model_sites:
            raise PairMismatchError(f"{model_name} declares latent site {name!r} but never samples it")
    for name in model_sites:
        if name not in declared:
            raise PairMismatchError(f"{model_name} samples latent site {name!r} but does not declare it in latent_sites")
    message = _first_support_mismatch(guide_sites, model_sites, guide_name, model_name)
    if message:
        raise PairMismatchError(message)
    message = _observed_outside_support(model_trace, model_name)
    if message:
        raise DataError(message)
    check_particles(model, guide, batch)


@contextmanager
def buffers_kept(*modules):
    """Run look-ahead passes (the pair check, the describing trace) without moving any buffer:
    batch-norm running statistics stay as they were, so a resumed run is the unbroken one."""
    saved = [
        [(buffer, buffer.detach().clone()) for buffer in module.buffers()] for module in modules if isinstance(module, torch.nn.Module)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for pairs in saved:
                for buffer, value in pairs:
                    buffer.copy_(value)


def share_data_plate(model, guide) -> None:
    """A guide written with the model's plate name gets the model's data plate renamed too."""
    description = getattr(model, "description", None)
    if description is not None and isinstance(guide, _TorchOwnedParameters):
        guide.use_data_plate(description.data_plate)


def check_particles(model, guide, batch: Mapping[str, object]) -> None:
    """Run the pair once with three particles as a leading dim (as IWAE and the importance-sampled
    log-likelihood do); a network that cannot take it is refused in one line, before training.
    Batch-norm layers are made particle safe (:mod:`pyrovae.particles`) before this runs."""
    from pyrovae.traces import guess_max_plate_nesting, preserved_rng, trace_pair

    rows = {key: value[:2] if torch.is_tensor(value) else value for key, value in batch.items()}
    try:
        nesting = guess_max_plate_nesting(model, guide, rows)
        with torch.no_grad(), poutine.block(), preserved_rng():
            # Three particles over two rows: a particle dim mistaken for the rows cannot pass unseen.
            trace_pair(model, guide, rows, max_plate_nesting=nesting, particles=3)
    except (PairMismatchError, NotImplementedError):
        raise
    except Exception as error:  # noqa: BLE001 - reported in one line, with what to change
        from pyrovae.description import error_summary

        first = error_summary(error)
        raise PairMismatchError(
            f"{type(model).__name__}/{type(guide).__name__} cannot take a leading particle dimension "
            f"({type(error).__name__}: {first}); pyrovae evaluates K samples per example at once, latents shaped "
            f"(K, batch, ...): let each network take extra leading dims (e.g. x.reshape(-1, features) and back)"
        ) from error
