"""pyrovae: variational autoencoders written as Pyro model/guide pairs.

Parameters live in the torch modules and are stepped by torch optimizers owned
by :func:`pyrovae.train.fit`, so Pyro's global parameter store is not used:
importing pyrovae switches Pyro to module-local parameters. Without this, two
models built in one process with the same site names would share weights
through the global store.
"""

import pyro

pyro.settings.set(module_local_params=True)

from pyrovae.errors import ConfigError, DataError, NonFiniteLossError, PairMismatchError  # noqa: E402
from pyrovae.handlers import kl_scale  # noqa: E402
from pyrovae.pair import DataSpec, Guide, LatentSite, Model, check_pair  # noqa: E402

__all__ = [
    "ConfigError",
    "DataError",
    "DataSpec",
    "Guide",
    "LatentSite",
    "Model",
    "NonFiniteLossError",
    "PairMismatchError",
    "check_pair",
    "kl_scale",
]
__version__ = "0.1.0"
