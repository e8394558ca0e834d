"""The `model` package beside `train`, under whichever name this copy was imported with.

From the repo root `train` is top-level and its sibling is `model` (`python -m train.grpo`); after `pip install .`
both live inside the distribution as `dsmath.train` and `dsmath.model`, so no generic top-level name lands in
site-packages. Relative imports cannot cross from one top-level package to another, so train reaches model
through this one function and each process uses exactly one copy of the model code."""

from __future__ import annotations

import importlib
from types import ModuleType

_PARENT = __name__.rpartition(".")[0].rpartition(".")[0]  # "dsmath" when installed, "" from the repo root


def model_module(sub: str = "") -> ModuleType:
    """`model_module("engine")` -> the module `model.engine` (or `dsmath.model.engine` when installed)."""
    return importlib.import_module(".".join(p for p in (_PARENT, "model", sub) if p))
