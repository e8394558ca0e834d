"""bench/device_check.sh keeps to its budget: one deadline for the whole script, steps in priority order.

DEVICE_CHECK_DRY_RUN=1 runs no command and charges every step its full limit (the worst case: each step times out),
so the summary shows which steps a worst-case run still reaches and that the total never exceeds the budget."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")


def dry_run(tmp_path, budget=None):
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE_CHECK_DRY_RUN": "1"}
    if budget is not None:
        env["DEVICE_CHECK_BUDGET_S"] = str(budget)
    r = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    granted = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+) limit=(\d+)s$", r.stdout, re.M)}
    skipped = re.findall(r"^(\w+) skipped: budget", r.stdout, re.M)
    return granted, skipped


@pytest.mark.skipif(not os.path.exists("/bin/bash") and not os.path.exists("/usr/bin/bash"), reason="needs bash")
def test_worst_case_fits_the_budget_and_keeps_the_first_steps(tmp_path):
    granted, skipped = dry_run(tmp_path)
    assert sum(granted.values()) <= 470 < 8 * 60
    # what the first GPU session must see even if every step hangs: the build, every op once, the GPU tests,
    # the headline bench and the memory-plan check of issue 13
    for name in ("build", "env", "ops_smoke", "pytest_gpu", "throughput", "grpo_plan"):
        assert name in granted and name not in skipped
    assert set(granted) | set(skipped) >= {"bench_attention", "bench_moe", "bench_fp8", "bench_patch"}


def test_a_smaller_budget_clamps_and_skips(tmp_path):
    granted, skipped = dry_run(tmp_path, budget=130)
    assert granted["build"] == 110 and granted["env"] == 10 and granted["ops_smoke"] == 10  # clamped to what is left
    assert sum(granted.values()) <= 130
    assert "pytest_gpu" in skipped and "bench_patch" in skipped
