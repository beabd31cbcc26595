"""The environment files agree with pyproject, and the profile switch works."""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from sa_kit.profiles import get_profile

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_names() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {_name(r) for r in reqs}


def _conda_pip_names(path: Path) -> set[str]:
    env = yaml.safe_load(path.read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_name(r) for r in pip if not r.startswith("-")}


def test_environment_yml_and_binder_agree_with_pyproject():
    names = _pyproject_names()
    assert _conda_pip_names(ROOT / "environment.yml") == names
    assert _conda_pip_names(ROOT / "binder" / "environment.yml") == names
    assert (ROOT / "binder" / "environment.yml").read_text() == \
        (ROOT / "environment.yml").read_text()
    assert os.access(ROOT / "binder" / "postBuild", os.X_OK)


def test_profiles_switch_and_reject_unknown_names(monkeypatch):
    for name in ("ci", "cpu", "gpu"):
        assert get_profile(name).name == name
    assert get_profile("ci").mnist.forget_steps < get_profile("cpu").mnist.forget_steps
    monkeypatch.setenv("SA_KIT_PROFILE", "laptop")
    with pytest.raises(ValueError, match="SA_KIT_PROFILE must be one of"):
        get_profile()


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only meaningful in CI")
def test_ci_really_runs_the_ci_profile():
    """Canary: `make test` (what CI runs) sets the tiny profile."""
    assert os.environ.get("SA_KIT_PROFILE") == "ci" and get_profile().name == "ci"
