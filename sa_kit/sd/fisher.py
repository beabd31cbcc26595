"""The diagonal Fisher of the Stable Diffusion UNet (eq. 3), on the replay set, sharded.

The quantity is the kit's one diffusion Fisher (:func:`sa_kit.diffusion_fisher.diffusion_fisher`,
the official ``ddpm_fim.py``): for every replay item -- latents x ~ p(x | theta*, c) the frozen
model drew for a replay prompt -- the latent-diffusion loss summed over all T timesteps (or a
stratified estimate of that sum), its gradient squared, averaged over items. With
``accelerate`` every process takes every ``world``-th item, sums its squares, and the sums are
all-reduced; each item's timesteps and noise depend only on ``(seed, item)``, so one process and
many give the same Fisher.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from sa_kit.diffusion_fisher import diffusion_fisher
from sa_kit.fisher import Fisher, check_fisher, save_fisher
from sa_kit.io import config_hash, load_tensors, save_tensors, weights_fingerprint
from sa_kit.sd.adapter import SDAdapter
from sa_kit.train import GracefulStop, interrupted

__all__ = ["unet_fisher", "unet_key", "save_unet_fisher", "load_unet_fisher"]


def unet_fisher(adapter: SDAdapter, latents: torch.Tensor, prompts: Sequence[str], seed: int = 0,
                num_timesteps: int | None = None, estimator: str = "product",
                batch_size: int = 8, accelerator: Any = None, chunk_size: int = 50,
                checkpoint: str | os.PathLike | None = None, progress: bool = True) -> Fisher:
    """Diagonal Fisher of the UNet's trainable parameters over the replay set ``(latents, prompts)``.

    Args:
        adapter: the model at theta*.
        latents, prompts: the replay set, x ~ p(x | theta*, c) with its prompts.
        seed: seeds each item's timesteps and noise.
        num_timesteps, estimator: all T timesteps (None, the official computation) or K
            stratified ones (see :func:`sa_kit.diffusion_fisher.diffusion_fisher`).
        batch_size: items whose prompts are encoded together (memory knob; same result).
        accelerator: an ``accelerate.Accelerator``; items are sharded over its processes and
            the sums all-reduced. ``None``: one process.
        chunk_size: timesteps per forward/backward pass.
        checkpoint: a file for partial sums (one per process): written every few batches and
            when Ctrl-C or SIGTERM stops the computation; a call that finds it continues there.

    Returns:
        ``{name: F}`` for every trainable parameter of ``adapter`` (names start ``unet.``).
    """
    if len(prompts) == 0 or len(prompts) != len(latents):
        raise ValueError(f"prompts must be a non-empty list with one prompt per latent; got "
                         f"{len(prompts)} prompts for {len(latents)} latents")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator \
        else (0, 1)
    device = next(adapter.parameters()).device
    mine = list(range(rank, len(prompts), world))
    sums = {k: torch.zeros_like(p, dtype=torch.float32)
            for k, p in adapter.named_parameters() if p.requires_grad}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else contextlib.nullcontext()
    ckpt = Path(f"{checkpoint}.rank{rank}") if checkpoint is not None else None
    key = config_hash({"n": len(prompts), "seed": seed, "k": num_timesteps, "est": estimator,
                       "batch": batch_size, "world": world, **unet_key(adapter)})
    first = 0
    if ckpt is not None and ckpt.exists():
        saved, meta = load_tensors(ckpt, device)
        if meta.get("config_hash") == key:
            sums, first = {k: saved[k] for k in sums}, int(meta["next"])
    starts = range(first, len(mine), batch_size)
    with GracefulStop() as stop:
        for start in tqdm(starts, desc="Fisher (UNet)", disable=not progress or rank != 0,
                          initial=first // batch_size,
                          total=(len(mine) + batch_size - 1) // batch_size):
            idx = mine[start:start + batch_size]
            x = latents[idx].to(device, next(adapter.parameters()).dtype)
            c = adapter.encode_prompts([prompts[i] for i in idx])
            with autocast:
                part = diffusion_fisher(adapter, x, c, num_timesteps, estimator=estimator,
                                        seed=seed, item_ids=idx, chunk_size=chunk_size,
                                        clamp=False, progress=False)
            for k, v in part.items():
                sums[k] += v.float() * len(idx)           # back to sums of squares
            done = start + len(idx)
            if ckpt is not None and (stop.requested or (start // batch_size) % 10 == 9):
                save_tensors(ckpt, sums, {"config_hash": key, "next": done})
            if stop.requested:
                raise interrupted(stop, "the Fisher", done, ckpt)
    if world > 1:
        sums = {k: accelerator.reduce(v, reduction="sum") for k, v in sums.items()}
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return {k: (v / len(prompts)).clamp_min(0) for k, v in sums.items()}


def unet_key(adapter: SDAdapter) -> dict[str, str]:
    """What identifies the UNet a Fisher belongs to: its config and its exact weights."""
    return {"unet_config": config_hash(adapter.config["unet"]),
            "unet_weights": weights_fingerprint(adapter.unet)}


def save_unet_fisher(path: str | os.PathLike, fisher: Fisher, adapter: SDAdapter,
                     meta: dict[str, Any] | None = None) -> None:
    """Save as safetensors (atomic), tagged with the UNet's config and weights (see load)."""
    save_fisher(path, fisher, adapter, {**unet_key(adapter), **(meta or {})})


def load_unet_fisher(path: str | os.PathLike, adapter: SDAdapter,
                     device: str | torch.device | None = None) -> Fisher:
    """Load a Fisher for ``adapter``'s UNet, keeping the currently trainable parameters.

    A full-UNet Fisher file serves every ``train_method`` (it is sliced to the trainable
    parameters).

    Raises:
        ValueError: if the file was made for another UNet (other config or other weights),
            lacks trainable parameters, or is not a Fisher file.
    """
    device = device or next(adapter.parameters()).device
    fisher, meta = load_tensors(path, device)
    if meta.get("kind") != "fisher":
        raise ValueError(f"{path} is a {meta.get('kind')!r} file, not a Fisher")
    mine = unet_key(adapter)
    for key, what in (("unet_config", "architecture"), ("unet_weights", "weights")):
        if key in meta and meta[key] != mine[key]:
            raise ValueError(f"fisher file {path} was computed for another UNet (different "
                             f"{what}); compute it for this model or pass the right file")
    trainable = [k for k, p in adapter.named_parameters() if p.requires_grad]
    if set(trainable) <= set(fisher):
        fisher = {k: fisher[k] for k in trainable}
    check_fisher(fisher, adapter)  # names, shapes, finite and >= 0
    return fisher
