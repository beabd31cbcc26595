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
