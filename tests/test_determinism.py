"""Same seed, same numbers: chapter 1's ci-profile metrics repeat exactly across two runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def _demo_metrics(cache: str) -> list[str]:
    env = {**os.environ, "SA_KIT_CACHE": cache, "SA_KIT_PROFILE": "ci", "SA_KIT_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "sa_kit.demo", "--seed", "0"], env=env,
                         capture_output=True, text=True, timeout=900, check=True).stdout
    rows = [line for line in out.splitlines()
            if line.startswith(("original model", "after SA", "classifier accuracy"))]
    assert len(rows) == 3, out
    return rows


@pytest.mark.slow
def test_two_fresh_runs_with_the_same_seed_give_identical_metrics(tmp_path):
    """Each run starts from an empty cache: training, Fisher, forgetting and evaluation."""
    first = _demo_metrics(str(tmp_path / "a"))
    second = _demo_metrics(str(tmp_path / "b"))
    assert first == second
    numbers = [float(v) for row in first for v in re.findall(r"\d+\.\d+", row)]
    assert len(numbers) == 9                  # accuracy; H, P(c_f), acc, diversity twice
    assert all(0 <= v <= 2.31 for v in numbers[1:4] + numbers[5:8])
