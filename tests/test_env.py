"""The environment report (`python -m dsmath_kernels [--json]`) and the comparison helper used by every test."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dsmath_kernels.testing import assert_close


def test_env_report_json():
    out = subprocess.run([sys.executable, "-m", "dsmath_kernels", "--json"], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("version", "cuda_compiled", "cuda_archs", "torch", "triton", "gpu", "backends"):
        assert key in r, key
    assert isinstance(r["cuda_compiled"], bool) and isinstance(r["cuda_archs"], list)
    assert r["torch"] == torch.__version__
    assert r["backends"]["route_topk"] in ("cpu", "cuda")
    if r["cuda_compiled"]:
        assert r["cuda_archs"], "CUDA compiled but no archs reported"


def test_env_report_text():
    out = subprocess.run([sys.executable, "-m", "dsmath_kernels"], capture_output=True, text=True, check=True)
    assert "dsmath_kernels" in out.stdout and "route_topk" in out.stdout


def test_assert_close_reports_worst_element():
    e = torch.zeros(3, 4)
    a = e.clone()
    a[2, 1] = 0.5
    a[0, 0] = 0.1
    with pytest.raises(AssertionError, match=r"worst at \(2, 1\)"):
        assert_close(a, e, atol=1e-3, rtol=0)
    assert_close(a, e, atol=0.6, rtol=0)


def test_assert_close_nan_and_inf_positions():
    e = torch.tensor([1.0, float("nan"), float("inf")])
    assert_close(e.clone(), e)
    with pytest.raises(AssertionError, match="nan positions"):
        assert_close(torch.tensor([float("nan"), 1.0, float("inf")]), e)
    with pytest.raises(AssertionError, match="infinities differ"):
        assert_close(torch.tensor([1.0, float("nan"), float("-inf")]), e)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3))
