"""Environment report: `python -m dsmath_kernels [--json]` — package version, whether CUDA kernels were compiled
and for which archs, torch / triton versions, the visible GPU, and the backend each op will use."""

from __future__ import annotations

import argparse
import json

import torch

import dsmath_kernels
from dsmath_kernels import _ext
from dsmath_kernels._registry import backends


def report() -> dict:
    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = _ext.build_info()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    return {
        "version": dsmath_kernels.__version__,
        "compiled_module": info["compiled"],
        "cuda_compiled": info["cuda_compiled"],
        "cuda_archs": info["cuda_archs"],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": gpu,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if gpu else None,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "backends": backends(device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m dsmath_kernels", description=__doc__)
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    r = report()
    if ap.parse_args().json:
        print(json.dumps(r))
        return
    print(f"dsmath_kernels {r['version']}")
    print(f"  compiled module : {'yes' if r['compiled_module'] else 'no (pure-Python fallbacks)'}")
    print(f"  CUDA kernels    : {'yes, archs ' + ','.join(r['cuda_archs']) if r['cuda_compiled'] else 'no'}")
    print(f"  torch           : {r['torch']} (CUDA {r['torch_cuda']})")
    print(f"  triton          : {r['triton']}")
    print(f"  GPU             : {r['gpu'] or 'none'}" + (f" (sm_{r['gpu_capability']})" if r["gpu"] else ""))
    print(f"  backends on {r['device']}:")
    for op, name in r["backends"].items():
        print(f"    {op:<20} {name}")


if __name__ == "__main__":
    main()
