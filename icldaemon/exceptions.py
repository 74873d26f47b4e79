"""The exceptions icldaemon raises. Only the CLI turns them into messages and exit codes."""


class IcldaemonError(Exception):
    """icldaemon failed."""

    def __init__(self, message: str | None = None):
        super().__init__(message or self.__doc__)


class ConfigurationError(IcldaemonError):
    """The configuration is invalid."""


class ModelLoadError(IcldaemonError):
    """The model could not be loaded."""


class UnsupportedArchitectureError(IcldaemonError):
    """The model's architecture has no adapter."""


class BadInputError(IcldaemonError):
    """The input cannot be measured."""


class NumericalError(IcldaemonError):
    """The measurement produced non-finite values."""


class DatabaseError(IcldaemonError):
    """The database operation failed."""


class ConsolidationError(IcldaemonError):
    """The patches could not be consolidated into an adapter."""
