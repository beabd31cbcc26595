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


def _floor(package: str) -> tuple[int, ...]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + sum(project["optional-dependencies"].values(), [])
    for r in reqs:
        if _name(r) == package:
            return tuple(int(x) for x in re.search(r">=([\d.]+)", r).group(1).split("."))
    raise KeyError(package)


def _version(package: str) -> tuple[int, ...]:
    from importlib.metadata import version
    return tuple(int(x) for x in re.findall(r"\d+", version(package))[:3])


def test_diffusers_floor_has_from_pretrained_dtype():
    """The kit loads pipelines with ``from_pretrained(..., dtype=...)``: diffusers >= 0.40."""
    import inspect

    from diffusers import DiffusionPipeline
    assert _floor("diffusers") >= (0, 40)
    assert _version("diffusers") >= _floor("diffusers")
    assert '"dtype"' in inspect.getsource(DiffusionPipeline.from_pretrained)
    import sa_kit.sd.pipeline as pipeline
    assert "dtype=dtype" in inspect.getsource(pipeline.load_pipeline)


def test_resume_never_uses_accelerate_load_state():
    """``accelerate``'s ``load_state`` unpickles optimiser and RNG files in some versions; the kit
    resumes from its own safetensors checkpoints, so any accelerate >= the floor is safe."""
    import inspect

    import sa_kit.sd.forget as forget
    source = inspect.getsource(forget)
    assert "load_state(" not in source and "save_state(" not in source
    assert _version("accelerate") >= _floor("accelerate")


def test_eval_extra_brings_torch_fidelity_and_no_unused_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(r.startswith("torchmetrics[image]") for r in project["optional-dependencies"]["eval"])
    names = _pyproject_names()
    assert "scipy" not in names
    code = "\n".join(p.read_text() for p in (ROOT / "sa_kit").rglob("*.py"))
    imported = {"torch", "torchvision", "numpy", "matplotlib", "ipywidgets", "tqdm", "safetensors",
                "mlxtend", "diffusers", "transformers", "accelerate", "yaml", "torchmetrics"}
    for name in imported:
        assert re.search(rf"^\s*(import|from) {name}\b", code, re.M), f"{name} is never imported"


def test_python_floor_is_the_one_tested():
    import sys
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = tuple(int(x) for x in project["requires-python"].lstrip(">=").split("."))
    assert sys.version_info[:2] >= floor == (3, 11)


def test_console_script_and_module_entry_points():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["sa-kit"] == "sa_kit.cli:main"
    from sa_kit.cli import main
    assert main(["--help"]) == 0


def test_readme_colab_install_line_works_as_written():
    """Colab runs each ``!`` line in its own shell: a ``cd`` there is lost; ``%cd`` is not."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:python|ipython)?\n\s*(!git clone[^`]*)```", readme)
    assert block, "README has a Colab block starting with !git clone"
    lines = [ln.strip() for ln in block.group(1).strip().splitlines()]
    assert lines[1].startswith("%cd ") and not any("&& cd" in ln for ln in lines)
    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert lines[0] == f"!git clone {url}"
    extras = re.search(r'pip install -e "\.\[([a-z,]+)\]"', lines[2]).group(1).split(",")
    assert set(extras) <= set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                              ["optional-dependencies"])


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only meaningful in CI")
def test_ci_really_runs_the_ci_profile():
    """Canary: `make test` (what CI runs) sets the tiny profile."""
    assert os.environ.get("SA_KIT_PROFILE") == "ci" and get_profile().name == "ci"
