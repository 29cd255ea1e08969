"""The host side of megacpp: the typer app, the console, the pictures and the executors."""

from megacpp.runtime.cli.app import app, main

__all__ = ["app", "main"]
