"""icldaemon: measure, as a service, the implicit weight updates a language model's context is equivalent to."""

__version__ = "0.1.0"
