"""The imagestore command-line client: push, pull, ls, rm and link against an imagestore."""

__version__ = "0.1.0"
