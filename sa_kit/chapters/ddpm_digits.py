"""Chapter 2's building blocks: data, the trained DDPM, its evaluator, its Fisher, forgetting runs.

On a GPU with a network the data are CIFAR-10 and the evaluator a ResNet-34 (the paper's);
offline and in the ``cpu``/``ci`` profiles they are the embedded MNIST digits as RGB images and
the paper's MNIST network on RGB. Every step is cached, keyed by what made it, so a rerun of the
notebook reloads models, Fisher and forgetting runs in seconds.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from sa_kit import seed_everything
from sa_kit.data import ImageData, load_cifar10
from sa_kit.diffusion_fisher import diffusion_fisher
from sa_kit.fisher import Fisher, cached_fisher
from sa_kit.forget import forget_one_class
from sa_kit.io import cache_dir, config_hash, load_cached, load_or_train, load_tensors, \
    save_tensors, weights_fingerprint
from sa_kit.mappings import mapping_key
from sa_kit.models.classifier import (OFFICIAL_EPOCH, MNISTClassifier, cifar_resnet,
                                      train_classifier)
from sa_kit.models.ddpm import ClassConditionalDDPM, build_unet, train_ddpm
from sa_kit.profiles import DDPMSizes

__all__ = ["load_data", "make_ddpm", "pretrained_ddpm", "pretrained_classifier", "ddpm_fisher",
           "forgotten_ddpm"]


def load_data(sizes: DDPMSizes, verbose: bool = True) -> ImageData:
    """CIFAR-10, or offline the embedded digits as RGB images (every output names the source)."""
    return load_cifar10(source=sizes.dataset, image_size=sizes.image_size, verbose=verbose)


def make_ddpm(sizes: DDPMSizes, num_classes: int = 10, in_channels: int = 3,
              image_size: int = 32) -> ClassConditionalDDPM:
    """The adapter for a profile's ``DDPMSizes``, random weights."""
    unet = build_unet(num_classes, image_size, in_channels, sizes.block_out_channels,
                      sizes.layers_per_block, sizes.attention_resolutions,
                      sizes.norm_num_groups, sizes.dropout)
    return ClassConditionalDDPM(unet, num_classes, guidance_scale=sizes.guidance_scale,
                                num_inference_steps=sizes.inference_steps, eta=sizes.eta,
                                ema_decay=sizes.ema_decay, clip_sample=sizes.clip_sample)


LONG_RUN_STEPS = 20_000   # above this, training starts only when asked for (SA_KIT_LONG_RUNS=1)


def pretrained_ddpm(data: ImageData, sizes: DDPMSizes, device: str = "cpu", seed: int = 0,
                    progress: bool = True) -> ClassConditionalDDPM:
    """Train the DDPM on ``data`` or load it from the cache (an interrupted training resumes).

    A training longer than ``LONG_RUN_STEPS`` (the published CIFAR-10 model: 800k steps, days on
    one GPU) never starts silently: it needs ``SA_KIT_LONG_RUNS=1`` and is announced first.
    """
    _, ch, size, _ = data.x.shape
    seed_everything(seed)
    model = make_ddpm(sizes, len(data.classes), ch, size).to(device)
    config = {"source": data.source, "n": len(data), "steps": sizes.train_steps,
              "batch_size": sizes.train_batch, "lr": sizes.train_lr, "loss": "sum-pixels",
              "label_dropout": sizes.label_dropout, "seed": seed}
    def train(m: ClassConditionalDDPM, ckpt_dir: Path) -> None:
        if sizes.train_steps > LONG_RUN_STEPS:
            if os.environ.get("SA_KIT_LONG_RUNS", "") not in ("1", "true", "yes"):
                raise RuntimeError(
                    f"training this DDPM takes {sizes.train_steps:,} steps at batch "
                    f"{sizes.train_batch} -- days on one GPU (the published CIFAR-10 model). It "
                    "starts only when asked: set SA_KIT_LONG_RUNS=1 (it checkpoints and resumes), "
                    "put trained weights in the cache, or use SA_KIT_PROFILE=cpu.")
            print(f"SA_KIT_LONG_RUNS=1: training {sizes.train_steps:,} steps (checkpoints in "
                  f"{ckpt_dir}; rerun to resume)")
        train_ddpm(m, data.x, data.y, sizes.train_steps, sizes.train_batch, sizes.train_lr,
                   sizes.label_dropout, checkpoint_dir=ckpt_dir, progress=progress)

    return load_or_train("ddpm", model, config, train)


def pretrained_classifier(data: ImageData, sizes: DDPMSizes, device: str = "cpu",
                          seed: int = 0, progress: bool = True) -> nn.Module:
    """The evaluator, trained plainly on the same data: ResNet-34 (CIFAR-10) or the MNIST CNN."""
    _, ch, _, _ = data.x.shape
    seed_everything(seed)
    cifar = data.source.startswith("torchvision CIFAR")
    clf = (cifar_resnet(len(data.classes)) if cifar
           else MNISTClassifier(ch, len(data.classes))).to(device)
    config = {"source": data.source, "n": len(data), "steps": sizes.classifier_steps,
              "recipe": "official", "seed": seed}
    return load_or_train("ddpm-classifier", clf, config, lambda m, ckpt: train_classifier(
        m, data.x, data.y, sizes.classifier_steps, batch_size=64 if not cifar else 128,
        lr_decay_every=None if cifar else 5 * OFFICIAL_EPOCH, checkpoint_dir=ckpt,
        progress=progress))


def ddpm_fisher(model: ClassConditionalDDPM, sizes: DDPMSizes, seed: int = 0,
                progress: bool = True) -> Fisher:
    """The diffusion Fisher on the model's own samples of every class (cached).

    As the official code: ``fisher_samples / num_classes`` samples per class from the model
    (its EMA weights when it has them), each one's loss summed over all T timesteps
    (``fisher_timesteps=None``) or a stratified estimate of that sum, gradient squared.
    """
    k = model.num_classes
    per_class = max(1, sizes.fisher_samples // k)

    def compute() -> Fisher:
        seed_everything(seed)
        c = torch.arange(k).repeat_interleave(per_class).to(next(model.parameters()).device)
        x = torch.cat([model.sample(c[i:i + 100]) for i in range(0, len(c), 100)])
        return diffusion_fisher(model, x, c, sizes.fisher_timesteps, seed=seed,
                                progress=progress)

    settings = {"per_class": per_class, "timesteps": sizes.fisher_timesteps, "seed": seed,
                "definition": "grad of the sum over T, squared"}
    return cached_fisher("ddpm-fisher", model, settings, compute, verbose=False)


def forgotten_ddpm(original: ClassConditionalDDPM, forget_class: int, fisher: Fisher | None,
                   sizes: DDPMSizes, *, mapping: Any = "noise", lmbda: float | None = None,
                   gamma: float | None = None, steps: int | None = None, seed: int = 0,
                   progress: bool = True) -> tuple[ClassConditionalDDPM, dict[str, list]]:
    """A copy of ``original`` after SA, with its history; cached and resumable.

    ``lmbda``, ``gamma`` and ``steps`` default to the profile's. The cache key holds the
    original's exact weights, the Fisher's values, the mapping's content and every setting;
    an interrupted run resumes from its checkpoint folder.
    """
    lmbda = sizes.lmbda if lmbda is None else lmbda
    gamma = sizes.gamma if gamma is None else gamma
    steps = sizes.forget_steps if steps is None else steps
    settings = {"forget_class": forget_class, "mapping": mapping_key(mapping), "lmbda": lmbda,
                "gamma": gamma, "steps": steps, "batch_size": sizes.forget_batch,
                "lr": sizes.forget_lr, "grad_clip": sizes.grad_clip,
                "replay_buffer": sizes.replay_buffer, "seed": seed,
                "fisher": weights_fingerprint(fisher) if fisher is not None else None}
    key = config_hash({"weights": weights_fingerprint(original), **settings})
    path = cache_dir() / f"ddpm-forgotten-{key}.safetensors"
    model = copy.deepcopy(original).requires_grad_(True)
    state = load_cached(path, key)
    if state is not None:
        model.load_state_dict(state)
        return model.eval(), load_tensors(path)[1]["history"]
    seed_everything(seed)
    checkpoints = cache_dir() / f"ddpm-forget-{key}"
    history = forget_one_class(
        model, forget_class, fisher=fisher, mapping=mapping, lmbda=lmbda, gamma=gamma,
        steps=steps, batch_size=sizes.forget_batch, lr=sizes.forget_lr,
        grad_clip=sizes.grad_clip, replay_buffer=sizes.replay_buffer,
        checkpoint_dir=checkpoints, checkpoint_every=max(1, steps // 4),
        run_config={"key": key}, progress=progress)
    save_tensors(path, model.state_dict(), {"kind": "weights", "config_hash": key,
                                            "settings": settings, "history": history})
    shutil.rmtree(checkpoints, ignore_errors=True)        # the finished run is cached
    return model.eval(), history


def real_images(data: ImageData, per_class: int) -> Mapping[int, torch.Tensor]:
    """Up to ``per_class`` real images of each class (the reference of the Frechet distance)."""
    return {k: data.x[data.y == k][:per_class] for k in range(len(data.classes))}
