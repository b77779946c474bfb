"""The ``flagella`` command."""

from flagella.cli._app import app, main

__all__ = ["app", "main"]
