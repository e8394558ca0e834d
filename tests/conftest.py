"""Test setup: Triton runs in its interpreter when there is no GPU (set before triton is imported anywhere),
`gpu` tests skip without CUDA, and the repo root is importable (for `model` and `train`)."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("DSMATH_STRICT", "1")  # GPU runs: a fallback from a kernel is an error, not a slow pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class _Launches:
    """What ran: dsmath_kernels' per-call backend counts since the fixture started (a GPU test proves its kernel ran,
    not just that the registry names it)."""

    def __init__(self):
        from dsmath_kernels import _dispatch

        self._d = _dispatch
        _dispatch.reset(warned=False)

    def counts(self) -> dict:
        return self._d.launch_counts()

    def assert_ran(self, op: str, backend: str) -> None:
        n = self.counts().get((op, backend), 0)
        assert n > 0, f"{op} never ran on {backend}; launches: {self.counts()}"


@pytest.fixture
def launches():
    return _Launches()


@pytest.fixture
def shared_data():
    """Path of ../shared/data (MATH-500, AIME 2024, AMC 2023, GSM8K); tests using it skip when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny-model tests: their matrices are too small to split, and on a busy
    2-core machine two threads made them ~50x slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
