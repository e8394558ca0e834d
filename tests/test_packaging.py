"""The installed layout (issue 15): after `pip install .` the product imports as `dsmath.model`, `dsmath.train`,
`dsmath.bench` from any directory, with no generic top-level `model`/`train` names, and the `dsmath` command
dispatches to the engine, trainer, evaluation and benchmark.

The wheel layout is rebuilt here from pyproject.toml's `wheel.packages` table (a copy, no build), so the test
runs everywhere; CI, which `pip install`s the project, also runs the real console script."""

import os
import shutil
import subprocess
import sys

import pytest
import tomllib

import dsmath_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wheel_packages() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["scikit-build"]["wheel"]["packages"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site-packages-like folder holding the wheel's pure-Python packages (the kernel library is taken from
    wherever this test process imports it, with its compiled module)."""
    site = tmp_path_factory.mktemp("site")
    for dest, src in sorted(wheel_packages().items()):
        if dest == "dsmath_kernels":
            continue
        shutil.copytree(os.path.join(ROOT, src), site / dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return site


def run_elsewhere(site, tmp_path, code_or_args):
    """Run python in an empty directory that holds a hostile `model.py` and `train.py`: importing dsmath must
    never pick up a user's files of those names."""
    cwd = tmp_path / "userdir"
    cwd.mkdir(exist_ok=True)
    for name in ("model", "train", "bench"):
        (cwd / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    kernels_parent = os.path.dirname(os.path.dirname(dsmath_kernels.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), kernels_parent]), "OMP_NUM_THREADS": "1"}
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_maps_the_repo_folders_under_one_name():
    pk = wheel_packages()
    assert pk["dsmath/model"] == "model" and pk["dsmath/train"] == "train" and pk["dsmath/bench"] == "bench"
    assert {d.split("/")[0] for d in pk} == {"dsmath", "dsmath_kernels"}  # nothing generic at top level


def test_installed_layout_imports_from_any_directory(site, tmp_path):
    code = """
import sys
from dsmath.model import LLM, MoEForCausalLM, SamplingParams
from dsmath.model.engine.sequence import Sequence
from dsmath.train import eval, grpo, rewards
from dsmath.train._pkg import model_module
import dsmath.bench.throughput
assert model_module("engine").LLM is LLM, "train must reach the same model package"
assert grpo.build.__module__ == "dsmath.train.grpo"
top = sorted({m.split(".")[0] for m in sys.modules} & {"model", "train", "bench"})
assert not top, f"generic top-level modules imported: {top}"
web = sorted({m.split(".")[0] for m in sys.modules} & {"fastapi", "uvicorn", "starlette", "openai", "httpx"})
assert not web, f"the engine must not import the web stack: {web}"
import importlib.util
if importlib.util.find_spec("fastapi") and importlib.util.find_spec("uvicorn"):
    from dsmath.model.serve import api_server, cli
    assert api_server.build_app.__module__ == "dsmath.model.serve.api_server"
    assert not sorted({m.split(".")[0] for m in sys.modules} & {"model", "train", "bench"})
print("ok")
"""
    r = run_elsewhere(site, tmp_path, code)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_dsmath_command_lists_and_runs_subcommands(site, tmp_path):
    r = run_elsewhere(site, tmp_path, ["-m", "dsmath", "--help"])
    assert r.returncode == 0, r.stderr
    for cmd in ("generate", "serve", "train", "eval", "bench", "bench serve"):
        assert f"\n  {cmd} " in r.stdout
    r = run_elsewhere(site, tmp_path, ["-m", "dsmath", "nonsense"])
    assert r.returncode == 2 and "unknown command 'nonsense'" in r.stderr
    for cmd in (["train"], ["eval"], ["bench"], ["serve"], ["bench", "serve"]):
        r = run_elsewhere(site, tmp_path, ["-m", "dsmath", *cmd, "--help"])
        prog = f"usage: dsmath {' '.join(cmd)} " if cmd[-1] == "serve" else "usage:"   # (train names its own)
        assert r.returncode == 0 and r.stdout.startswith(prog), (cmd, r.stdout[:200], r.stderr[-2000:])
    # the engine end to end from the installed layout: random tiny model, greedy, four tokens
    r = run_elsewhere(site, tmp_path, ["-m", "dsmath", "generate", "--preset", "tiny", "--device", "cpu",
                                       "--ids", "5,6,7", "--max-tokens", "4"])
    assert r.returncode == 0, r.stderr[-3000:]


def test_console_script_when_installed(tmp_path):
    """Runs where the project is pip-installed (CI does `pip install ".[test]"`); a source checkout has no
    console script."""
    exe = shutil.which("dsmath")
    if exe is None:
        pytest.skip("the dsmath console script is not installed (CI installs the project)")
    r = subprocess.run([exe, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-c", "import dsmath.model, dsmath.train.rewards; print('ok')"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
