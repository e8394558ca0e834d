"""Shared bench helpers: timing (CUDA events over graph-replayed or eager calls, median of reps; wall clock on
CPU), the H200 ceilings measured here, and the table + one-JSON-line output every bench prints."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch

# Measured on the project's H200 (DEVELOPERS.md): dense bf16 matmul and device-to-device copy.
H200_BF16_TFLOPS = 790.0
H200_COPY_GBPS = 4300.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def time_fn(fn: Callable[[], object], device: torch.device, *, reps: int = 20, warmup: int = 3,
            inner: int = 1, graph: bool = False) -> float:
    """Median seconds per call of fn. On CUDA, `graph=True` captures `inner` calls in a CUDA graph and replays it,
    which removes Python/launch overhead (what a graph-captured decode step sees)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            ts.append((time.perf_counter() - t0) / inner)
        return statistics.median(ts)
    torch.cuda.synchronize(device)
    run = fn
    if graph:
        s = torch.cuda.Stream(device)
        s.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream(device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
        run = g.replay
    ts = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph:
            run()
        else:
            for _ in range(inner):
                run()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(ts)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def print_json(obj: dict) -> None:
    print(json.dumps(obj))
