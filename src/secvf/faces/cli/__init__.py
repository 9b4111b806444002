"""The ``secvf`` command line: a face over :mod:`secvf.api`."""

from secvf.faces.cli.main import main

__all__ = ["main"]
