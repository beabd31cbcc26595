"""The course assignment's autograder passes the reference solution and fails wrong ones.

``instructors/assignment/autograder.py`` compares a submission with the kit's
``sa_kit.fisher.fisher_per_sample`` and ``sa_kit.objective.sa_loss``. Here it grades, in a
subprocess as a student would run it, the reference solution (every rubric item passes), the
untouched template (every item fails) and two classic mistakes: a Fisher summed over samples
instead of averaged, and the paper's F/2 in the penalty where the official code has none.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENT = ROOT / "instructors" / "assignment"
REFERENCE = (ASSIGNMENT / "reference_solution.py").read_text()

pytestmark = pytest.mark.slow


def _grade(tmp_path: Path, source: str | None) -> tuple[int, str]:
    env_file = ASSIGNMENT / "submission.py"
    if source is not None:
        env_file = tmp_path / "my_solution.py"
        env_file.write_text(source)
    out = subprocess.run([sys.executable, "-m", "pytest", str(ASSIGNMENT / "autograder.py"),
                          "-q", "-p", "no:cacheprovider", "-rf"], cwd=ROOT, text=True,
                         capture_output=True, timeout=600,
                         env={**__import__("os").environ, "SA_SUBMISSION": str(env_file)})
    return out.returncode, out.stdout + out.stderr


def test_reference_solution_passes_every_rubric_item(tmp_path):
    code, log = _grade(tmp_path, REFERENCE)
    assert code == 0, log[-3000:]
    assert "10 passed" in log


def test_template_fails_every_rubric_item(tmp_path):
    code, log = _grade(tmp_path, None)
    assert code == 1 and "10 failed" in log, log[-3000:]
    assert "NotImplementedError" in log


def test_classic_mistakes_are_caught(tmp_path):
    summed = REFERENCE.replace("return {k: f / n_samples for k, f in fisher.items()}",
                               "return dict(fisher)")
    assert summed != REFERENCE
    code, log = _grade(tmp_path, summed)
    assert code == 1 and "test_fisher_matches_the_reference" in log, log[-3000:]
    assert "test_fisher_is_a_mean_over_samples" in log and "test_sa_loss" not in log

    halved = REFERENCE.replace("loss = loss + lmbda * penalty", "loss = loss + lmbda * penalty / 2")
    assert halved != REFERENCE
    code, log = _grade(tmp_path, halved)
    assert code == 1 and "test_sa_loss_matches_the_reference[100.0-1.0]" in log, log[-3000:]
    assert "test_fisher" not in log
