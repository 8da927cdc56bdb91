"""The project's own error types."""


class DaopConfigError(ValueError):
    """A DAOP option, profile or model is not acceptable. The message is one line that names
    what was wrong and what is accepted."""
