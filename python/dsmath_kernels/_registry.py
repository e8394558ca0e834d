"""Which backend each public op will use on a device; `python -m dsmath_kernels` prints this table. Each op
module registers a function `device -> backend name` when it is imported."""

from __future__ import annotations

from collections.abc import Callable

import torch

_BACKENDS: dict[str, Callable[[torch.device], str]] = {}


def register_backend(op: str, fn: Callable[[torch.device], str]) -> None:
    _BACKENDS[op] = fn


def backends(device: torch.device) -> dict[str, str]:
    return {op: fn(device) for op, fn in sorted(_BACKENDS.items())}
