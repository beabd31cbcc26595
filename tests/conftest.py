"""Shared fixtures: every test runs offline, seeded, with its own cache directory."""
from __future__ import annotations

import pytest
import torch

from sa_kit import seed_everything
from sa_kit.models import ConditionalVAE


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("SA_KIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SA_KIT_OFFLINE", "1")
    seed_everything(0)


@pytest.fixture(scope="module")
def sd_offline(tmp_path_factory):
    """For a Stable Diffusion test module: a private SA_KIT_CACHE, no hub access, one thread
    (2 shared cores: threads only fight)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SA_KIT_CACHE", str(tmp_path_factory.mktemp("sd_cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("SA_KIT_OFFLINE", "1")
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(sd_offline, tmp_path_factory) -> str:
    """The tiny random pipeline's folder, built once per module (every test has its own
    SA_KIT_CACHE, so "tiny" by name would be rebuilt per test)."""
    from sa_kit.sd.pipeline import tiny_pipeline_dir
    return str(tiny_pipeline_dir(root=tmp_path_factory.mktemp("tiny") / "pipe"))


@pytest.fixture
def tiny_vae() -> ConditionalVAE:
    """A small cVAE (784-32-16, z=4) with random weights."""
    torch.manual_seed(0)
    return ConditionalVAE(h_dims=(32, 16), z_dim=4)


def pytest_collection_modifyitems(config, items):
    """Notebooks (collected by nbval) carry the ``notebook`` marker: ``-m "not notebook"``."""
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.notebook)
