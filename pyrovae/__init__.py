"""pyrovae: variational autoencoders written as Pyro model/guide pairs.

Parameters live in the torch modules and are stepped by torch optimizers owned
by :func:`pyrovae.train.fit`, so Pyro's global parameter store is not used: a
pyrovae ``Model`` or ``Guide`` that holds Pyro attributes (``PyroParam``,
``PyroSample``) is called with module-local parameters, and only for that call.
Importing pyrovae changes no global Pyro setting.
"""

from pyrovae.errors import ConfigError, DataError, NonFiniteLossError, PairMismatchError
from pyrovae.handlers import kl_scale
from pyrovae.pair import DataSpec, Guide, LatentSite, Model, auxiliary_term, check_pair
from pyrovae.registry import declare

# Declares a loader function, so that ``[data] name = "mymodule:loader"`` may name it.
data_loader = declare("data set")

__all__ = [
    "ConfigError",
    "DataError",
    "DataSpec",
    "Guide",
    "LatentSite",
    "Model",
    "NonFiniteLossError",
    "PairMismatchError",
    "auxiliary_term",
    "check_pair",
    "data_loader",
    "declare",
    "kl_scale",
]
__version__ = "0.1.0"
