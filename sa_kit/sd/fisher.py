"""The diagonal Fisher of the Stable Diffusion UNet (eq. 3), from the replay set.

    F_i = E_{c ~ p_r, x ~ p(x | theta*, c), t, eps} [ (d/d theta_i  l_simple(x, c, t, eps))^2 ]

x are the latents the frozen model drew for the replay prompts (:mod:`sa_kit.sd.dataset`); each
item n gets its own timestep and noise from a generator seeded by ``(seed, n)``, so the result
does not depend on the batch size, the chunking, or how many processes share the work: with
``accelerate`` every process sums its shard and the sums are all-reduced. The per-batch
estimator is the kit's own :func:`sa_kit.fisher.fisher_fast` (or ``fisher_per_sample``).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sa_kit.fisher import ESTIMATORS, Fisher, check_fisher, save_fisher
from sa_kit.io import config_hash, load_tensors
from sa_kit.sd.adapter import SDAdapter


def item_noise(adapter: SDAdapter, x: Tensor, indices: Sequence[int], seed: int
               ) -> tuple[Tensor, Tensor]:
    """``(t, eps)`` for items ``indices``: item n's draw depends only on ``(seed, n)``."""
    ts, eps = [], []
    for n in indices:
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(n))
        ts.append(torch.randint(0, adapter.num_timesteps, (1,), generator=g))
        eps.append(torch.randn(x.shape[1:], generator=g))
    return torch.cat(ts).to(x.device), torch.stack(eps).to(x.device, x.dtype)


def unet_fisher(adapter: SDAdapter, latents: Tensor, prompts: Sequence[str], seed: int = 0,
                batch_size: int = 8, estimator: str = "per_sample", accelerator: Any = None,
                chunk_size: int | None = None, progress: bool = True) -> Fisher:
    """Diagonal Fisher of the UNet's trainable parameters over ``(latents, prompts)``.

    Args:
        adapter: the model at theta*.
        latents, prompts: the replay set, x ~ p(x | theta*, c) with its prompts.
        seed: seeds each item's (t, eps) (see :func:`item_noise`).
        batch_size: items per estimator call (memory knob; the result does not change).
        estimator: ``"fast"`` (exact batched, :func:`sa_kit.fisher.fisher_fast`) or
            ``"per_sample"`` (the reference).
        accelerator: an ``accelerate.Accelerator``; items are sharded over its processes and
            the sums all-reduced. ``None``: one process.
        chunk_size: ``vmap`` chunk size for the fast estimator (lower = less memory).

    Returns:
        ``{name: F}`` for every trainable parameter of ``adapter`` (names start ``unet.``).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
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
    kwargs = {"chunk_size": chunk_size} if estimator == "fast" else {}
    for start in tqdm(range(0, len(mine), batch_size), desc="Fisher (UNet)",
                      disable=not progress or rank != 0):
        idx = mine[start:start + batch_size]
        x = latents[idx].to(device, next(adapter.parameters()).dtype)
        c = adapter.encode_prompts([prompts[i] for i in idx])
        with autocast, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")  # vmap over SDPA
            part = ESTIMATORS[estimator](adapter, x, c, item_noise(adapter, x, idx, seed),
                                         **kwargs)
        for k, v in part.items():
            sums[k] += v.float() * len(idx)           # back to sums of squares
    if world > 1:
        sums = {k: accelerator.reduce(v, reduction="sum") for k, v in sums.items()}
    return {k: v / len(prompts) for k, v in sums.items()}


def unet_key(adapter: SDAdapter) -> dict[str, str]:
    """What identifies the UNet a Fisher belongs to: its config and a weight fingerprint."""
    first = next(iter(adapter.unet.parameters()))
    fp = [round(float(p.detach().float().abs().sum()), 3)
          for p in list(adapter.unet.parameters())[:3]] + [first.numel()]
    return {"unet_config": config_hash(adapter.config["unet"]),
            "unet_weights": config_hash({"fp": fp})}


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
