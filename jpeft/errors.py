"""jpeft's exceptions. Each subclasses the builtin a caller would naturally catch."""


class JpeftError(Exception):
    """Base class of jpeft's own errors."""


class NoMatchingModuleError(JpeftError, ValueError):
    """``target_modules`` (or a related option) selected no module of the model."""


class ConfigError(JpeftError, ValueError):
    """An adapter config is invalid, unsupported, or inconsistent with the model."""


class CheckpointError(JpeftError, ValueError):
    """An adapter folder or file is missing, corrupt, unsafe, or does not fit the model."""
