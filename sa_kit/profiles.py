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
from dataclasses import dataclass

import torch

PROFILES = ("ci", "cpu", "gpu")


@dataclass(frozen=True)
class MNISTSizes:
    """Chapter 1: the MNIST conditional VAE (sizes of every stage)."""

    vae_steps: int = 5000
    classifier_steps: int = 600
    fisher_samples: int = 10_000
    forget_steps: int = 2000
    batch_size: int = 128
    lr: float = 3e-3
    lmbda: float = 100.0
    gamma: float = 1.0
    ablation_steps: int = 400  # the mapping and ablation runs of chapter 1 (5 runs)
    eval_samples: int = 500  # generated samples per class for the metrics
    widget_steps: int = 150


# Chapter 1 sizes per profile.
MNIST = {
    "ci": MNISTSizes(vae_steps=2500, classifier_steps=200, fisher_samples=2000,
                     forget_steps=400, ablation_steps=150, eval_samples=200,
                     widget_steps=100),
    "cpu": MNISTSizes(),
    "gpu": MNISTSizes(vae_steps=20_000, classifier_steps=3000, fisher_samples=50_000,
                      forget_steps=10_000, ablation_steps=5000, lr=1e-3, eval_samples=2000,
                      widget_steps=2000),
}


@dataclass(frozen=True)
class DDPMSizes:
    """Chapter 2: the class-conditional DDPM. Defaults: the published CIFAR-10 setup."""

    dataset: str = "auto"  # "auto": CIFAR-10 if torchvision can get it, else "digits"
    image_size: int = 32  # side of the offline digits (CIFAR-10 is always 32)
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    norm_num_groups: int = 32
    train_steps: int = 100_000
    batch_size: int = 128
    lr: float = 2e-4
    guidance_scale: float = 2.0
    inference_steps: int = 50
    classifier_steps: int = 5000
    fisher_samples: int = 5000  # published: 500 per class
    fisher_timesteps: int = 50  # stratified timesteps per sample (of T = 1000)
    forget_steps: int = 20_000
    forget_batch: int = 128
    forget_lr: float = 1e-4
    lmbda: float = 10.0
    gamma: float = 1.0
    replay_buffer: int = 5000
    eval_samples: int = 500  # generated samples per class for the metrics
    widget_steps: int = 500


# Chapter 2 sizes per profile: ci/cpu learn the offline digits (16x16 RGB) on a CPU.
_TINY_DDPM = dict(dataset="digits", image_size=16, block_out_channels=(32, 32, 64),
                  layers_per_block=1, attention_resolutions=(), norm_num_groups=8, lr=2e-3,
                  guidance_scale=3.0, inference_steps=10)
DDPM = {
    # ci: the cpu UNet with half the batch and fewer steps -- samples still recognisable
    # (measured: classifier accuracy 0.83 on them), a shorter forgetting run (150 steps: remembered
    # accuracy 0.7-0.9x; the first steps disrupt every class and replay brings them back)
    "ci": DDPMSizes(**_TINY_DDPM, batch_size=32, train_steps=600, classifier_steps=150, fisher_samples=10,
                    fisher_timesteps=10, forget_steps=150, forget_batch=16, lmbda=10.0,
                    replay_buffer=64, eval_samples=20, widget_steps=3, forget_lr=1e-3),
    # cpu: measured on 2 cores -- accuracy on samples 0.94 before forgetting; 250 forgetting
    # steps left remembered accuracy at 0.86-1.05x depending on the run, hence 500
    "cpu": DDPMSizes(**_TINY_DDPM, batch_size=64, train_steps=800, classifier_steps=300, fisher_samples=50,
                     fisher_timesteps=25, forget_steps=500, forget_batch=32, lmbda=10.0,
                     replay_buffer=256, eval_samples=50, widget_steps=40, forget_lr=1e-3),
    "gpu": DDPMSizes(),
}


@dataclass(frozen=True)
class SDSizes:
    """Chapter 3: Stable Diffusion. ``model="tiny"`` is the offline random pipeline (noise).

    The gpu sizes fit a notebook walkthrough on one GPU; a full forgetting run (paper: 1000
    surrogate images, ~5000 Fisher prompts, full UNet) is a job for ``python -m
    sa_kit.sd.forget``.
    """

    model: str = "tiny"
    forget_prompt: str = "brad pitt"
    train_method: str = "full"  # the paper's celebrity setting
    steps: int = 60
    batch_size: int = 4
    lr: float = 1e-3
    lmbda: float = 50.0
    gamma: float = 1.0
    num_surrogate: int = 16
    num_replay: int = 32
    gen_steps: int = 2
    guidance_scale: float = 7.5
    grid_prompts: int = 4
    widget_steps: int = 20
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cpu_threads: int | None = 1  # tiny models only lose time to thread contention


# Chapter 3 sizes per profile.
SD = {
    "ci": SDSizes(steps=40, num_surrogate=8, num_replay=16, grid_prompts=3, widget_steps=8),
    "cpu": SDSizes(),
    "gpu": SDSizes(model="CompVis/stable-diffusion-v1-4", steps=200, batch_size=4, lr=1e-5,
                   num_surrogate=64, num_replay=256, gen_steps=50, grid_prompts=4,
                   widget_steps=50, mixed_precision="bf16", gradient_checkpointing=True,
                   cpu_threads=None),
}


@dataclass(frozen=True)
class Profile:
    """All run sizes of one profile; one field per chapter."""

    name: str
    device: str
    mnist: MNISTSizes
    ddpm: DDPMSizes
    sd: SDSizes


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
    return Profile(name=name, device=device, mnist=MNIST[name], ddpm=DDPM[name], sd=SD[name])
