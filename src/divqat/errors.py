"""Errors that the CLI turns into one clear line instead of a traceback."""


class DivqatError(Exception):
    """Base of every error a user can cause (bad input, missing data, bad parameters)."""


class DatasetError(DivqatError):
    """A dataset is missing, corrupt, or not in the expected layout."""


class ArtifactError(DivqatError):
    """A victim artifact is missing, truncated, or not a divqat artifact."""


class ConfigError(DivqatError, ValueError):
    """A parameter or configuration value is out of range or unknown."""


class TrainingCollapsed(DivqatError):
    """Training diverged (NaN loss) or accuracy fell to chance; nothing was saved."""


class MissingExtra(DivqatError):
    """An optional part of divqat is used without the packages it needs (e.g. ``divqat[edge]``)."""


class UnsupportedModel(ConfigError):
    """A model that torch.export cannot capture or a quantizer cannot annotate: one line naming
    the code or the quantizer pattern that stopped it, and what to try."""
