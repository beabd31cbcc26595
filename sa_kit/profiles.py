"""Run profiles: how big every run is, in one place (DESIGN.md, "Run profiles").

One switch, the environment variable ``SA_KIT_PROFILE`` = ``ci`` | ``cpu`` | ``gpu``, picks
model sizes, steps and sample counts for every chapter. The default is ``gpu`` when CUDA is
present, else ``cpu`` (the classroom default). CI sets ``ci``.

Example:
    >>> from sa_kit.profiles import get_profile
    >>> p = get_profile("ci")
    >>> p.mnist.forget_steps > 0
    True
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

PROFILES = ("ci", "cpu", "gpu")


@dataclass(frozen=True)
class MNISTSizes:
    """Chapter 1: the MNIST conditional VAE (sizes of every stage)."""

    vae_epochs: int = 30
    classifier_epochs: int = 8
    fisher_samples: int = 10_000
    forget_steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-4
    eval_samples: int = 1000  # generated samples per class for the metrics
    widget_steps: int = 300


@dataclass(frozen=True)
class Profile:
    """All run sizes of one profile; one field per chapter."""

    name: str
    device: str
    mnist: MNISTSizes = field(default_factory=MNISTSizes)


def _default_name() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None) -> Profile:
    """Return the run profile ``name`` (default: ``$SA_KIT_PROFILE``, else gpu/cpu by hardware).

    Raises:
        ValueError: if the name is not one of ``ci``, ``cpu``, ``gpu``.
    """
    name = (name or os.environ.get("SA_KIT_PROFILE") or _default_name()).strip().lower()
    if name not in PROFILES:
        raise ValueError(f"SA_KIT_PROFILE must be one of {PROFILES}, got {name!r}")
    device = "cuda" if (name == "gpu" and torch.cuda.is_available()) else "cpu"
    if name == "ci":
        mnist = MNISTSizes(vae_epochs=12, classifier_epochs=3, fisher_samples=2000,
                           forget_steps=400, eval_samples=200, widget_steps=60)
    elif name == "cpu":
        mnist = MNISTSizes()
    else:
        mnist = MNISTSizes(vae_epochs=100, classifier_epochs=15, fisher_samples=50_000,
                           forget_steps=10_000, eval_samples=2000, widget_steps=1000)
    return Profile(name=name, device=device, mnist=mnist)
