"""The errors pyrovae raises on purpose, each with a message that names the culprit."""


class ConfigError(ValueError):
    """A TOML experiment or a constructor argument is wrong: unknown key, missing key, wrong type."""


class DataError(ValueError):
    """Data does not fit the model: wrong shape, values outside the likelihood's support."""


class PairMismatchError(ValueError):
    """A guide's sample sites do not match the latent sites its model declares."""


class NonFiniteLossError(FloatingPointError):
    """Training kept producing non-finite losses after the allowed number of recoveries."""


class UnsupportedPairError(ConfigError):
    """An objective cannot treat a pair correctly (e.g. enumerated sites it cannot sum out,
    score-function sites it has no estimator for) and refuses it by name instead of
    returning a silently wrong number."""


class MissingLatentSitesError(PairMismatchError, NotImplementedError):
    """A model does not declare its ``latent_sites``. A :class:`PairMismatchError` (so the CLI and
    the config report it in one line) and a ``NotImplementedError`` (what the unimplemented
    property raised before, so code that catches that keeps working)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded: missing, damaged or truncated. The message names the file and
    says what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A file asks the unpickler to build objects other than tensors and plain values (it could run
    code): refused, never loaded."""


class RunFolderError(ConfigError):
    """A run folder cannot be used: another process holds it, or it holds files that are not a run."""


class FileWriteError(RuntimeError):
    """A file could not be written whole (a full disk, a file-size limit, a folder deleted underneath):
    the message names it and says that the file as it was is intact (writes are atomic)."""


class RunFolderLostError(RunFolderError):
    """The run folder was deleted or replaced while a run trained in it: the run stops rather than
    write into a folder that is no longer its own."""
