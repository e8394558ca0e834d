"""Comparison helper for kernel tests: inf/nan positions must match, then every element must satisfy
|a - e| <= atol + rtol * |e|; on failure the message gives the worst element's coordinates, both values, the
number of mismatches and the global relative error, so a failing kernel points at where it went wrong."""

from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5,
                 name: str = "output", max_global_rel: float | None = None) -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return
    for what, fa, fe in (("nan", a.isnan(), e.isnan()), ("inf", a.isinf(), e.isinf())):
        bad = fa != fe
        if bad.any():
            idx = tuple(bad.nonzero()[0].tolist())
            raise AssertionError(f"{name}: {what} positions differ ({int(bad.sum())} elements), first at {idx}: "
                                 f"actual {a[idx].item()} expected {e[idx].item()}")
    inf_sign = e.isinf() & (a != e)
    if inf_sign.any():
        idx = tuple(inf_sign.nonzero()[0].tolist())
        raise AssertionError(f"{name}: infinities differ in sign at {idx}")
    finite = e.isfinite()
    a0 = torch.where(finite, a, torch.zeros_like(a))
    e0 = torch.where(finite, e, torch.zeros_like(e))
    err = (a0 - e0).abs()
    excess = err - (atol + rtol * e0.abs())
    n_bad = int((excess > 0).sum())
    global_rel = (err.norm() / e0.norm().clamp_min(1e-30)).item()
    if n_bad or (max_global_rel is not None and global_rel > max_global_rel):
        idx = tuple(torch.unravel_index(excess.argmax(), excess.shape))
        idx = tuple(int(i) for i in idx)
        raise AssertionError(
            f"{name}: {n_bad}/{a.numel()} elements outside atol={atol} rtol={rtol}; worst at {idx}: "
            f"actual {a[idx].item():.8g} expected {e[idx].item():.8g} (abs err {err[idx].item():.3g}); "
            f"max abs err {err.max().item():.3g}; global relative error {global_rel:.3g}")


def assert_names_argument(exc: BaseException, fn, extra: tuple[str, ...] = ()) -> None:
    """A bad-input error must be a TypeError / ValueError whose message starts with the name of the argument at
    fault (a parameter of `fn`, or one of `extra`), followed by a colon."""
    import inspect

    names = set(inspect.signature(fn).parameters) | set(extra)
    if not isinstance(exc, (TypeError, ValueError)):
        raise AssertionError(f"{fn.__name__}: expected TypeError/ValueError naming an argument, got "
                             f"{type(exc).__name__}: {exc}")
    head = str(exc).split(":", 1)[0].strip()
    if head not in names:
        raise AssertionError(f"{fn.__name__}: error does not start with an argument name ({sorted(names)}): {exc}")
