"""Backend choice, told: every public op picks its backend per call, and a call that cannot take its device's
kernel says so. One place for the policy:

- `explain(op, *args, **kwargs)` -> `Choice`: the backend the call would take and why (nothing runs);
- the first time a call falls back from its device's kernel (CUDA, Triton on a GPU, the C++ CPU kernel) a
  `FallbackWarning` names the op, the reason and the fix (once per op and reason);
- `DSMATH_STRICT=1` turns that fallback into a `FallbackError` (the GPU tests and bench/device_check.sh run strict);
- `DSMATH_FORCE_REFERENCE=1` sends every op to its PyTorch reference (a choice, not a fallback: no warning);
- `launch_counts()` counts the calls each (op, backend) took, so a GPU test proves its kernel ran.

Choices that are by design are not fallbacks and never warn: float64 inputs (references only), the torch
paths that are an op's CPU design (grouped GEMM via torch.matmul, the chunked GRPO loss, SDPA prefill, cache writes
by indexing), a backend the caller forced (an argument or a DSMATH_* variable).

How to add an op:
1. In the op's module write `_choose_<op>(...) -> Choice` that looks only at shapes, dtypes, devices, strides,
   pointers and environment (never at tensor values: no host sync). Return `kernel(op, backend)` when the device's
   kernel runs, `fallback(op, backend, reason, fix)` when it cannot, `by_design(op, backend, why)` otherwise;
   `forced(op)` and `device_kernel(op, device)` cover DSMATH_FORCE_REFERENCE and "is the compiled kernel there".
2. In the run path call `take(_choose_<op>(...))` once, after the argument checks and before anything is
   launched or allocated; then run `choice.backend`. `take` warns or raises per the policy above and counts.
3. Nothing else: `explain(op, ...)` runs the public function `dsmath_kernels.<op>` in a dry-run mode in which
   `take` stops the call and hands its choice back, so explain sees exactly the checks and choice of a real call.
   An op that makes no choice of its own (pure torch) or several (a composite) registers an explainer with
   `register_explain(op, fn)`.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

STRICT_ENV = "DSMATH_STRICT"
FORCE_ENV = "DSMATH_FORCE_REFERENCE"


class FallbackWarning(UserWarning):
    """An op could not take its device's kernel and ran a slower path."""


class FallbackError(RuntimeError):
    """DSMATH_STRICT=1 and an op would have fallen back from its device's kernel."""


@dataclass(frozen=True)
class Choice:
    """op: public op name; backend: what runs ("cuda", "triton", "cpu", "torch", "reference", ...);
    reason: why not the device's kernel ("" when it is); fix: what the caller can change; fallback: True when
    this is a fallback (warns, raises under DSMATH_STRICT)."""

    op: str
    backend: str
    reason: str = ""
    fix: str = ""
    fallback: bool = False

    def __str__(self) -> str:
        s = f"{self.op}: {self.backend}"
        if self.reason:
            s += f" ({'fallback: ' if self.fallback else ''}{self.reason})"
        if self.fix:
            s += f"; fix: {self.fix}"
        return s


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "0") not in ("", "0")


def force_reference() -> bool:
    """DSMATH_FORCE_REFERENCE=1 (never under torch.compile tracing: compiled graphs keep the ops)."""
    return not torch.compiler.is_compiling() and os.environ.get(FORCE_ENV, "0") == "1"


def kernel(op: str, backend: str, note: str = "") -> Choice:
    return Choice(op, backend, note)


def by_design(op: str, backend: str, why: str) -> Choice:
    return Choice(op, backend, why)


def fallback(op: str, backend: str, reason: str, fix: str) -> Choice:
    return Choice(op, backend, reason, fix, fallback=True)


def no_triton(op: str, backend: str) -> Choice:
    """The fallback of a Triton op on a machine without triton."""
    return fallback(op, backend, "triton is not installed", "pip install triton")


def no_device_kernel(op: str, device: torch.device, backend: str) -> Choice:
    """The fallback of an op on a device type it has no kernel for (neither CUDA nor CPU)."""
    return fallback(op, backend, f"no kernel for device type {device.type!r}", "use a CUDA or CPU tensor")


def forced(op: str) -> Choice | None:
    """The reference when DSMATH_FORCE_REFERENCE=1, else None."""
    return by_design(op, "reference", f"{FORCE_ENV}=1") if force_reference() else None


def device_kernel(op: str, device: torch.device, *, cpu: bool = True, cuda: bool = True) -> Choice:
    """The compiled kernel for `device` ("cuda" or "cpu"), or the reason it is missing (a fallback to the reference).
    cpu / cuda: whether the op has a compiled kernel for that device type at all."""
    from dsmath_kernels import _ext

    if device.type == "cuda" and cuda:
        why = _ext.cuda_kernels_missing(device)
        if why is None:
            return kernel(op, "cuda")
        return fallback(op, "reference", why, "install on a machine with nvcc, with DSMATH_CUDA_ARCHS naming this GPU")
    if device.type == "cpu" and cpu:
        if _ext.C() is not None:
            return kernel(op, "cpu")
        return fallback(op, "reference", "the compiled module dsmath_kernels._C is missing",
                        "reinstall with a C++ compiler available (pip install .)")
    return no_device_kernel(op, device, "reference")


# ---------------------------------------------------------------------------------------------- policy
_lock = threading.Lock()
_warned: set[tuple[str, str]] = set()
_counts: Counter = Counter()
_dry = threading.local()


class _Explained(Exception):  # noqa: N818 - control flow of explain(), never seen by callers
    def __init__(self, choice: Choice):
        super().__init__(str(choice))
        self.choice = choice


def take(choice: Choice) -> Choice:
    """Apply the policy to a choice about to run: count it; a fallback warns once per (op, reason), or raises
    FallbackError under DSMATH_STRICT=1. Under explain() it stops the call and returns the choice to explain."""
    if getattr(_dry, "on", False):
        raise _Explained(choice)
    if torch.compiler.is_compiling():  # traced, not run: the custom op bodies take their choices at run time
        return choice
    with _lock:
        _counts[(choice.op, choice.backend)] += 1
    if choice.fallback:
        msg = f"dsmath_kernels.{choice.op} fell back to {choice.backend}: {choice.reason}. Fix: {choice.fix}"
        if strict():
            raise FallbackError(msg + f" ({STRICT_ENV}=1 makes this an error)")
        key = (choice.op, choice.reason)
        with _lock:
            first = key not in _warned
            _warned.add(key)
        if first:
            warnings.warn(msg, FallbackWarning, stacklevel=_caller_level())
    return choice


def _caller_level() -> int:
    """stacklevel of the first frame outside dsmath_kernels and torch (the user's call), for the warning."""
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    skip = (here, os.path.dirname(os.path.abspath(torch.__file__)))
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(skip):
        f, level = f.f_back, level + 1
    return level


def launch_counts() -> dict[tuple[str, str], int]:
    """{(op, backend): calls that took it} since the last reset."""
    with _lock:
        return dict(_counts)


def reset(counts: bool = True, warned: bool = True) -> None:
    """Clear the launch counts and / or the warned-once memory (tests)."""
    with _lock:
        if counts:
            _counts.clear()
        if warned:
            _warned.clear()


# ---------------------------------------------------------------------------------------------- explain
_EXPLAIN: dict[str, Callable[..., Choice]] = {}
# package functions that are not ops (explain never runs them): add a new non-op public function here
_NOT_OPS = {"explain", "raise_device_errors", "patch", "unpatch", "patch_class", "unpatch_class"}


def register_explain(op: str, fn: Callable[..., Choice]) -> None:
    _EXPLAIN[op] = fn


def explain(op: str, *args, **kwargs) -> Choice:
    """The backend `dsmath_kernels.<op>(*args, **kwargs)` would take, and why, without running it: the call's
    argument checks run as in a real call (a bad argument raises the same error), nothing is launched.
    Example: `explain("route_topk", logits, 8)` -> Choice(op, backend, reason, fix, fallback)."""
    import dsmath_kernels

    fn = _EXPLAIN.get(op)
    if fn is not None:
        return fn(*args, **kwargs)
    ops = {n for n in dsmath_kernels.__all__ if n not in _NOT_OPS and callable(getattr(dsmath_kernels, n))
           and not isinstance(getattr(dsmath_kernels, n), type)}
    if op not in ops:
        raise ValueError(f"op: unknown {op!r} (known: {', '.join(sorted(ops | set(_EXPLAIN)))})")
    public = getattr(dsmath_kernels, op)
    _dry.on = True
    try:
        public(*args, **kwargs)
    except _Explained as e:
        return e.choice
    finally:
        _dry.on = False
    raise RuntimeError(f"explain: {op} returned without choosing a backend (an op must call _dispatch.take)")
