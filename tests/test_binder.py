"""Binder: the ``binder/`` folder is a valid repo2docker configuration.

repo2docker reads only ``binder/`` when that folder exists, picks the first build pack whose file
it finds (Dockerfile, Nix, Julia, R, then conda's ``environment.yml``, then pip's
``requirements.txt``/``Pipfile``), runs ``postBuild`` from the repository root after the
environment is built, and refuses a repository that has both ``binder/`` and ``.binder/``.
The peak memory of the notebooks is measured by ``benchmarks/binder_memory.py``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
# Files that would make repo2docker use another build pack than conda's environment.yml, or
# pin another Python: none of them may sit next to it (nor at the root, to keep one truth).
OTHER_BUILD_FILES = ("Dockerfile", "default.nix", "Project.toml", "REQUIRE", "install.R",
                     "DESCRIPTION", "Pipfile", "Pipfile.lock", "requirements.txt", "runtime.txt",
                     "setup.py")


def _environment() -> dict:
    env = yaml.safe_load((BINDER / "environment.yml").read_text())
    assert isinstance(env, dict) and isinstance(env.get("dependencies"), list), \
        "binder/environment.yml needs a dependencies list"
    return env


def test_one_binder_folder_and_no_competing_build_files():
    assert BINDER.is_dir() and (BINDER / "environment.yml").is_file()
    assert not (ROOT / ".binder").exists(), "repo2docker refuses binder/ and .binder/ together"
    for name in OTHER_BUILD_FILES:
        assert not (BINDER / name).exists(), f"binder/{name} would override environment.yml"
        assert not (ROOT / name).exists(), f"{name} at the root competes with binder/"


def test_environment_yml_has_python_and_a_pip_section():
    env = _environment()
    deps = env["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    pythons = [d for d in conda if re.fullmatch(r"python\s*([<>=!~].*)?", d)]
    assert len(pythons) == 1, f"exactly one python in the conda dependencies: {conda}"
    assert "pip" in conda, "pip itself must be a conda dependency when a pip section is used"
    pips = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1 and isinstance(pips[0], list) and pips[0]
    assert all(isinstance(r, str) and r.strip() for r in pips[0])
    assert "torch" in {re.split(r"[<>=!~\[ ]", r)[0] for r in pips[0]}

    # the pinned Python satisfies pyproject's requires-python (">=3.X")
    version = re.search(r"(\d+)\.(\d+)", pythons[0])
    assert version, f"pin a Python version in {pythons[0]!r}"
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    low = re.fullmatch(r">=\s*(\d+)\.(\d+)", required)
    assert low and tuple(map(int, version.groups())) >= tuple(map(int, low.groups()))


def test_postbuild_is_an_executable_script_that_installs_the_kit():
    post = BINDER / "postBuild"
    assert post.is_file() and os.access(post, os.X_OK), "binder/postBuild must be executable"
    text = post.read_text()
    first = text.splitlines()[0]
    assert first.startswith("#!") and ("bash" in first or first.endswith("sh")), first
    assert "\r\n" not in text, "CRLF line endings break the shebang"
    check = subprocess.run(["bash", "-n", str(post)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # repo2docker runs it from the repository root: it must install this package
    assert re.search(r"pip install\b.*(-e\s+)?\.(\s|$)", text), text
    start = BINDER / "start"
    if start.exists():
        assert os.access(start, os.X_OK) and start.read_text().startswith("#!")


def test_notebooks_use_the_python3_kernel():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        spec = json.loads(nb.read_text())["metadata"].get("kernelspec", {})
        assert spec.get("name") == "python3", f"{nb.name}: kernelspec {spec}"
