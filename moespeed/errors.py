"""User-facing errors: bad config, data, checkpoint or prompt.

The CLI turns a `MoespeedError` into one line on stderr and exit code 2 (no traceback).
Library code raises the subclass that names the kind of input at fault, with a message that says
what is wrong and how to fix it.
"""


class MoespeedError(Exception):
    """Base class for errors caused by user input (not bugs)."""


class ConfigError(MoespeedError, ValueError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class DataError(MoespeedError):
    """Training data is missing, empty, unreadable, or a shard is corrupt."""


class CheckpointError(MoespeedError):
    """A run directory or checkpoint is missing, corrupt, or incompatible."""


class PromptError(MoespeedError):
    """A prompt cannot be encoded or is otherwise unusable."""


class TrainingDivergedError(MoespeedError):
    """The training (or val) loss became NaN or infinite: the run stops before writing a checkpoint."""
