"""Run profiles: how big every run is, in one place.

One switch, the environment variable ``SA_KIT_PROFILE`` = ``ci`` | ``cpu`` | ``gpu``, picks
model sizes, steps and sample counts for every chapter. The default is ``gpu`` when CUDA is
present, else ``cpu`` (the classroom default). CI sets ``ci``.

The ``gpu`` profiles are the paper's published setups (``tests/test_profiles.py`` checks every
row of the README's "paper setting -> kit setting" table against them). ``cpu`` and ``ci`` keep
the method and the loss scales (so lambda means what it means in the paper) and shrink models,
steps and sample counts to fit a laptop; where they change an optimisation setting (a larger
learning rate, fewer steps), the field's comment says so.

Every chapter spells the same idea the same way: ``train_*`` for training the original model,
``forget_steps`` / ``forget_batch`` / ``forget_lr`` for the forgetting run, ``lmbda`` / ``gamma``
for eq. 3 / eq. 2, ``eval_samples`` for the metrics, ``widget_steps`` for the explorer.

Example:
    >>> from sa_kit.profiles import get_profile
    >>> get_profile("gpu").mnist.lmbda
    100.0
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from sa_kit.sd.config import SDForgetConfig
from sa_kit.sd.digits import T2ISizes

PROFILES = ("ci", "cpu", "gpu")


@dataclass(frozen=True)
class MNISTSizes:
    """Chapter 1: the MNIST conditional VAE. Defaults: the ``cpu`` profile."""

    train_steps: int = 5000          # cVAE training
    classifier_steps: int = 4690     # the paper's evaluator: Adam 1e-4 for 5 MNIST epochs
    fisher_samples: int = 10_000     # published: 50,000
    forget_steps: int = 2000         # published: 10,000
    forget_batch: int = 128          # published: 256
    forget_lr: float = 3e-3          # published: 1e-4 (30x larger: 5x fewer steps on a CPU)
    lmbda: float = 100.0             # published
    gamma: float = 1.0               # published
    ablation_steps: int = 400        # the mapping and ablation runs of chapter 1
    eval_samples: int = 500          # generated samples per class for the metrics
    widget_steps: int = 150


MNIST = {
    "ci": MNISTSizes(train_steps=2500, classifier_steps=2000, fisher_samples=2000,
                     forget_steps=400, ablation_steps=150, eval_samples=200, widget_steps=100),
    "cpu": MNISTSizes(),
    "gpu": MNISTSizes(train_steps=20_000, classifier_steps=18_760, fisher_samples=50_000,
                      forget_steps=10_000, forget_batch=256, forget_lr=1e-4,
                      ablation_steps=5000, eval_samples=2000, widget_steps=2000),
}


@dataclass(frozen=True)
class DDPMSizes:
    """Chapter 2: the class-conditional DDPM. Defaults: the published CIFAR-10 setup.

    ``guidance_scale`` is the kit's w (``eps(null) + w (eps(c) - eps(null))``); the paper's
    ``cond_scale`` 2 is w = 3. ``eta = 1`` over ``inference_steps = 1000`` is the official
    ancestral sampler; ``fisher_timesteps = None`` sums all T = 1000 timesteps (official).
    """

    dataset: str = "auto"  # "auto": CIFAR-10 if torchvision can get it, else "digits"
    image_size: int = 32  # side of the offline digits (CIFAR-10 is always 32)
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    norm_num_groups: int = 32
    dropout: float = 0.1
    train_steps: int = 800_000  # Ho et al. 2020 (the SA repository does not publish its own)
    train_batch: int = 128
    train_lr: float = 2e-4
    label_dropout: float = 0.1
    ema_decay: float | None = 0.9999
    clip_sample: bool = False  # the official sampler does not clip x0
    guidance_scale: float = 3.0  # = 1 + official cond_scale 2
    inference_steps: int = 1000
    eta: float = 1.0
    classifier_steps: int = 20_000
    fisher_samples: int = 5000  # published: 500 per class
    fisher_timesteps: int | None = None  # None: all T (published)
    forget_steps: int = 20_000
    forget_batch: int = 128
    forget_lr: float = 1e-4
    grad_clip: float = 1.0
    lmbda: float = 10.0
    gamma: float = 1.0
    replay_buffer: int = 5000  # published: the same 500 samples per class as the Fisher
    eval_samples: int = 500  # published classifier evaluation: 500 samples of c_f
    widget_steps: int = 500


# Chapter 2 on a CPU: the offline digits (16x16 RGB), a small UNet, DDIM with 10 steps and x0
# clipped, the Fisher from K = 50 stratified timesteps (unbiased, see sa_kit.diffusion_fisher),
# no EMA. lambda: the published 10 holds this 0.2M-parameter UNet so tightly that it does not
# forget (measured: P(c_f) 0.80 -> 0.79 after 500 steps); its Fisher per weight is far larger
# than the paper's 36M-parameter model's. 0.1 forgets and keeps the other digits' diversity.
_TINY_DDPM = dict(dataset="digits", image_size=16, block_out_channels=(32, 32, 64),
                  layers_per_block=1, attention_resolutions=(), norm_num_groups=8, dropout=0.0,
                  train_lr=2e-3, ema_decay=None, clip_sample=True, inference_steps=10, eta=0.0,
                  fisher_timesteps=50, forget_lr=3e-4, lmbda=0.1)
DDPM = {
    "ci": DDPMSizes(**_TINY_DDPM, train_batch=32, train_steps=600, classifier_steps=2000,
                    fisher_samples=20, forget_steps=150, forget_batch=16,
                    replay_buffer=500, eval_samples=20, widget_steps=10),
    "cpu": DDPMSizes(**_TINY_DDPM, train_batch=64, train_steps=1500, classifier_steps=4690,
                     fisher_samples=100, forget_steps=500, forget_batch=32,
                     replay_buffer=1000, eval_samples=50, widget_steps=40),
    "gpu": DDPMSizes(),
}


@dataclass(frozen=True)
class SDSizes:
    """Chapter 3: the model, the forgetting run (``run``: the CLI's settings), the extras.

    ``model_sizes`` is the kit's coloured-digit text-to-image model (:mod:`sa_kit.sd.digits`),
    the one every profile measures; ``run`` forgets in it. ``sd_run`` is the same tool on a
    Stable Diffusion pipeline (section 10 of the chapter): v1.4 on a GPU, the tiny random
    pipeline on a CPU (mechanics only: it draws noise).
    """

    run: SDForgetConfig = field(default_factory=SDForgetConfig)
    model_sizes: T2ISizes = field(default_factory=T2ISizes)
    sd_run: SDForgetConfig = field(default_factory=SDForgetConfig)
    grid_prompts: int = 4
    widget_steps: int = 20
    eval_per: int = 2           # held-out prompts per digit/colour combination for the metrics
    render_steps: int = 20      # DDIM steps of the evaluation images
    cpu_threads: int | None = None


def _sd_run(**kw: object) -> SDForgetConfig:
    return dataclasses.replace(SDForgetConfig(), **kw)


# Chapter 3 on a CPU: the coloured-digit model. Templated pairs ("a red seven" -> "a red one"),
# the model's own replay prompts, K = 20 stratified timesteps for the Fisher. lambda = 10 and
# lr 3e-4 (measured on the cpu model, 300 steps of red -> blue: lambda 1 forgets red to P 0.13
# but one other colour falls to 0.5; lambda 10 keeps every other colour >= 0.9 at P 0.24).
_DIGITS_SD = dict(model="digits", forget_prompt="seven", surrogate_prompt="one",
                  prompt_templates=True, epochs=None, scale_lr=False, optimizer="adamw",
                  gen_steps=20, guidance_scale=4.0, fisher_timesteps=20, gen_batch_size=32,
                  fisher_batch_size=16, lmbda=10.0, lr=3e-4)
# Section 10 on a CPU: the same tool on the tiny random Stable Diffusion pipeline (mechanics only)
# (a few steps: its Fisher and steps cost seconds each on 2 cores)
_TINY_SD = dict(model="tiny", epochs=None, batch_size=4, effective_batch=4, lr=1e-3,
                scale_lr=False, gen_steps=2, fisher_timesteps=2, fisher_batch_size=4,
                lmbda=0.5, steps=12, num_surrogate=4, num_replay=8)
_CPU_DIGITS_RUN = _sd_run(**_DIGITS_SD, steps=250, batch_size=16, effective_batch=16,
                          num_surrogate=200, num_replay=300)
SD = {
    # ci: a smaller model in about a minute -- it learns colours, digits only roughly
    "ci": SDSizes(run=_sd_run(**{**_DIGITS_SD, "gen_steps": 10, "fisher_timesteps": 10},
                              steps=40, batch_size=16, effective_batch=16, num_surrogate=48,
                              num_replay=64),
                  model_sizes=T2ISizes(vae_channels=(8, 16), vae_steps=300,
                                       unet_channels=(32, 64), text_width=32, train_steps=1000,
                                       batch_size=32, classifier_steps=400,
                                       num_examples=5000),
                  sd_run=_sd_run(**_TINY_SD),
                  grid_prompts=3, widget_steps=10, eval_per=1, render_steps=10),
    "cpu": SDSizes(run=_CPU_DIGITS_RUN, model_sizes=T2ISizes(), sd_run=_sd_run(**_TINY_SD),
                   eval_per=4, widget_steps=40),
    # the digit sections as on a CPU; section 10 walks a shorter run of the published celebrity
    # setting on Stable Diffusion v1.4 (the published run is `python -m sa_kit.sd.forget`)
    "gpu": SDSizes(run=_CPU_DIGITS_RUN, model_sizes=T2ISizes(),
                   sd_run=_sd_run(steps=200, num_surrogate=64, num_replay=256,
                                  fisher_timesteps=50, mixed_precision="bf16",
                                  gradient_checkpointing=True),
                   eval_per=4, widget_steps=40, cpu_threads=None),
}
PUBLISHED_SD = {
    "celebrity": SDForgetConfig(),  # brad pitt -> a middle aged man, full UNet, 200 epochs
    "nudity": _sd_run(forget_prompt="sexual, nudity, naked, erotic",
                      surrogate_prompt="people wearing clothes", train_method="noxattn",
                      epochs=500.0),
}


@dataclass(frozen=True)
class ProbeSizes:
    """Chapter 4: the budgets of the recovery probes (:mod:`sa_kit.probes`), per model.

    ``seeds``, ``t2i_methods`` and ``t2i_seeds`` are what notebook 04 (and ``make warm``)
    compute; ``headline_*`` what ``benchmarks/probes.py`` computes for the headline tables (every
    method, >= 3 seeds: on a CPU about an hour, most of it the text-to-image model's retraining,
    SA, ESD and their probes). Both share every cached row.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    samples: int = 100                      # samples the evaluator judges per probe
    inversion_steps: int = 200              # condition inversion / textual inversion (Adam)
    inversion_images: int = 25              # real images of c_f for embedding inversions
    embedding_lr: float = 0.05              # the DDPM's class-embedding row (Adam)
    token_lr: float = 5e-3                  # textual inversion's new word (Adam)
    relearn_k: tuple[int, ...] = (1, 10, 100)
    relearn_checks: tuple[int, ...] = (5, 10, 20, 40, 80)   # steps at which P(c_f) is judged
    relearn_lr: float = 1e-3                # cVAE and DDPM
    t2i_relearn_lr: float = 1e-4            # the text-to-image UNet
    nll_images: int = 200
    guidance_scales: tuple[float, ...] = (0.0, 1.0, 3.0)
    t2i_per: int = 4                        # held-out prompts per colour (6 colours)
    t2i_methods: tuple[str, ...] = ("original", "retrained", "SA", "ESD", "UCE")
    t2i_seeds: tuple[int, ...] | None = None    # None: ``seeds``
    headline_seeds: tuple[int, ...] = (0, 1, 2)
    headline_t2i_methods: tuple[str, ...] = ("original", "retrained", "SA", "ESD", "UCE")


PROBES = {
    "ci": ProbeSizes(seeds=(0, 1), samples=32, inversion_steps=60, relearn_k=(1, 10),
                     relearn_checks=(5, 20), nll_images=64, t2i_per=1,
                     t2i_methods=("original", "SA", "UCE"), t2i_seeds=(0,)),
    # notebook 04 within 15 min on 2 cores: one seed, and no text-to-image retraining or ESD
    # (the headline tables have them: benchmarks/probes.py)
    "cpu": ProbeSizes(seeds=(0,), t2i_methods=("original", "SA", "UCE")),
    "gpu": ProbeSizes(),
}


@dataclass(frozen=True)
class Profile:
    """All run sizes of one profile; one field per chapter."""

    name: str
    device: str
    mnist: MNISTSizes
    ddpm: DDPMSizes
    sd: SDSizes
    probes: ProbeSizes = field(default_factory=ProbeSizes)


def _default_name() -> str:
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def profile_name(name: str | None = None) -> str:
    """The profile to use: ``name``, else ``$SA_KIT_PROFILE``, else gpu/cpu by hardware.

    Raises:
        ValueError: if the name is not one of ``ci``, ``cpu``, ``gpu``.
    """
    source = "profile" if name else "SA_KIT_PROFILE"
    raw = name or os.environ.get("SA_KIT_PROFILE") or _default_name()
    value = raw.strip().lower()
    if value not in PROFILES:
        raise ValueError(f"{source} must be one of {', '.join(PROFILES)}; got {raw!r}")
    return value


def get_profile(name: str | None = None) -> Profile:
    """Return the run profile ``name`` (default: ``$SA_KIT_PROFILE``, else gpu/cpu by hardware).

    Raises:
        ValueError: if the name is not one of ``ci``, ``cpu``, ``gpu``.
    """
    import torch
    name = profile_name(name)
    device = "cuda" if (name == "gpu" and torch.cuda.is_available()) else "cpu"
    return Profile(name=name, device=device, mnist=MNIST[name], ddpm=DDPM[name], sd=SD[name],
                   probes=PROBES[name])
