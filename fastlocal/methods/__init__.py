"""Training methods as registered objects: each owns its heads (and EMA copies) and returns losses;
the engine owns the backward schedule (fastlocal/engine.py)."""

from fastlocal.methods.base import METHODS, Batch, LocalMethod, build_method, register_method

# Importing the modules registers the methods.
from fastlocal.methods import bp, dgl, mlaan  # noqa: E402,F401  isort: skip

__all__ = ["METHODS", "Batch", "LocalMethod", "build_method", "register_method"]
