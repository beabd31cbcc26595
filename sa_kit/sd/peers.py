"""Two peers of Selective Amnesia for text-to-image models: ESD and UCE (chapter 4).

Both erase a concept named in prompts, like SA's forgetting runs of chapter 3, and both work on
any diffusers ``StableDiffusionPipeline`` folder (the kit's coloured-digit model, or SD v1.4).
Each call is cached under :func:`sa_kit.io.cache_dir` by its settings (a finished folder is
reused) and returns ``{"pipeline_dir", "seconds", "trained", ...}`` as chapter 3's
``forget_run`` does, so that one table can hold SA, ESD and UCE.

**ESD** -- Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023), fine-tuning with
negative guidance. The official ``train-scripts/train-esd.py: train_esd`` (rohitgandikota/
erasing), step by step:

    t_enc ~ U{0, ..., n-1}                       (n = ddim_steps DDIM steps, 50)
    x_t   = DDIM sample of the model *being trained*, prompt c, classifier-free guidance
            ``start_guidance`` (3), from x_T ~ N(0, I) down to the noise level of bin t_enc
    t     ~ U{round(t_enc / n * T), ..., round((t_enc + 1) / n * T) - 1}     (T = 1000)
    target = eps*(x_t, t, "") - eta * (eps*(x_t, t, c) - eps*(x_t, t, ""))   (eta = 1)
    loss  = || eps_theta(x_t, t, c) - target ||^2                          (mean: MSELoss)

where eps* is the frozen original UNet and eps_theta the one being trained (Adam). The paper's
ESD-u trains every UNet weight but cross-attention, the time embedding and the output layers
(``noxattn``), ESD-x only cross-attention (``xattn``): the kit's
:func:`sa_kit.sd.adapter.select_parameters`, which already follows that selection.

**UCE** -- Unified Concept Editing (Gandikota et al., WACV 2024), a closed-form edit of every
cross-attention key and value projection (``attn2.to_k``, ``attn2.to_v``). The official
``trainscripts/uce_sd_erase.py: UCE`` (rohitgandikota/unified-concept-editing), eq. 7 of the
paper, per projection W:

    W_new = (lamb W + erase_scale sum_i W c*_i c_i^T + preserve_scale sum_j W c_j c_j^T)
            (lamb I + erase_scale sum_i c_i c_i^T   + preserve_scale sum_j c_j c_j^T)^-1

c_i: the text encoder's output at the *last token* of erase concept i (the token before
end-of-text); c*_i: the same for its guide concept ("" in the official default: the
start-of-text token; here a surrogate such as "one"); c_j: the preserve concepts. Official
defaults: lamb 0.5, erase_scale 1, preserve_scale 1, no preserve concepts.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from sa_kit.checks import check_choice, check_positive_float, check_positive_int, check_weight
from sa_kit.io import cache_dir, config_hash, save_json

__all__ = ["esd", "uce", "esd_target", "esd_loss", "esd_noisy_latent", "uce_closed_form",
           "uce_edit", "uce_projections", "preserve_for", "UCE_TOKENS"]

ESD_TRAIN_METHODS = ("noxattn", "xattn", "full")    # ESD-u, ESD-x, every weight
UCE_TOKENS = ("last", "last_to_end")


# -- shared plumbing -----------------------------------------------------------------------

def _prompts(name: str, value: str | Sequence[str], allow_empty: bool = False) -> list[str]:
    """A prompt or a list of prompts, as a list of strings (a one-line ValueError otherwise)."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = []
    if not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{name} must be a prompt or a non-empty list of prompts, got {value!r}")
    if not allow_empty and any(not p.strip() for p in items):
        raise ValueError(f"{name} must not contain empty prompts, got {items!r}")
    return [p.strip() for p in items]


@torch.no_grad()
def _encode(pipe: Any, prompts: Sequence[str]) -> Tensor:
    """CLIP hidden states ``(B, L, D)``, padded to the tokenizer's length (``encode_prompt``)."""
    tok = pipe.tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(pipe.device))[0]


def _cached(kind: str, settings: dict[str, Any], make: Any) -> dict[str, Any]:
    """Run ``make(pipeline_tmp_dir) -> meta`` once per settings; reuse the finished folder."""
    out = cache_dir() / f"t2i-{kind}-{config_hash({'kind': kind, **settings})}"
    if not ((out / "pipeline" / "model_index.json").exists() and (out / "run.json").exists()):
        tmp = out / f"pipeline.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.perf_counter()
        meta = make(tmp)
        meta["seconds"] = time.perf_counter() - start
        shutil.rmtree(out / "pipeline", ignore_errors=True)
        os.replace(tmp, out / "pipeline")          # a half-written pipeline is never used
        save_json(out / "run.json", {**meta, "settings": settings})
    meta = json.loads((out / "run.json").read_text())
    return {**meta, "pipeline_dir": out / "pipeline"}


def _save(pipe: Any, model_dir: str | os.PathLike, folder: Path) -> None:
    """``save_pretrained`` plus the source's prompt spec (``sa_kit_prompts.json``), if any."""
    from sa_kit.sd.prompts import SPEC_FILE, spec_for
    pipe.save_pretrained(str(folder), safe_serialization=True)
    if (Path(str(model_dir)) / SPEC_FILE).is_file() or str(model_dir) == "digits":
        spec_for(str(model_dir)).save(folder)


# -- ESD -------------------------------------------------------------------------------------

def esd_target(eps_null: Tensor, eps_c: Tensor, negative_guidance: float = 1.0) -> Tensor:
    """ESD's target: ``eps*(x_t, "") - eta (eps*(x_t, c) - eps*(x_t, ""))`` (frozen model).

    ``train-esd.py: train_esd`` -- ``e_0 - (negative_guidance * (e_p - e_0))``; eta = 1 there.
    """
    return eps_null - negative_guidance * (eps_c - eps_null)


def esd_loss(unet: nn.Module, frozen: nn.Module, x_t: Tensor, t: Tensor, emb_c: Tensor,
             emb_null: Tensor, negative_guidance: float = 1.0) -> Tensor:
    """``MSE(eps_theta(x_t, t, c), esd_target)``: the frozen ``eps*`` makes the target."""
    b = x_t.shape[0]
    with torch.no_grad():
        e_0 = frozen(x_t, t, encoder_hidden_states=emb_null.expand(b, -1, -1)).sample
        e_p = frozen(x_t, t, encoder_hidden_states=emb_c.expand(b, -1, -1)).sample
    e_n = unet(x_t, t, encoder_hidden_states=emb_c.expand(b, -1, -1)).sample
    return nn.functional.mse_loss(e_n, esd_target(e_0, e_p, negative_guidance))


@torch.no_grad()
def esd_noisy_latent(unet: nn.Module, scheduler: Any, emb_c: Tensor, emb_null: Tensor,
                     t_enc: int, start_guidance: float = 3.0, batch_size: int = 1,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(x_t, t)``: the model's own DDIM sample for ``c``, stopped in timestep bin ``t_enc``.

    ``scheduler`` has ``set_timesteps(n)`` done (DDIM, eta 0); ``n - 1 - t_enc`` denoising steps
    with guidance ``start_guidance`` leave x at timestep ``timesteps[n - 1 - t_enc]``, inside bin
    ``[t_enc T / n, (t_enc + 1) T / n)``, from which ``t`` is drawn (``train-esd.py``:
    ``og_num``, ``og_num_lim``). ``t_enc = n - 1``: x_T itself.
    """
    n = len(scheduler.timesteps)
    if not 0 <= t_enc < n:
        raise ValueError(f"t_enc must be in 0..{n - 1}, got {t_enc}")
    size = int(unet.config.sample_size)
    x = torch.randn((batch_size, int(unet.config.in_channels), size, size), generator=generator)
    x = x.to(emb_c.device, emb_c.dtype) * scheduler.init_noise_sigma        # x_T ~ N(0, I)
    cond = torch.cat([emb_null.expand(batch_size, -1, -1), emb_c.expand(batch_size, -1, -1)])
    for step in scheduler.timesteps[:n - 1 - t_enc]:
        e_0, e_c = unet(torch.cat([x, x]), step, encoder_hidden_states=cond).sample.chunk(2)
        eps = e_0 + start_guidance * (e_c - e_0)                        # classifier-free guidance
        x = scheduler.step(eps, step, x).prev_sample
    big_t = int(scheduler.config.num_train_timesteps)
    lo, hi = round(t_enc / n * big_t), round((t_enc + 1) / n * big_t)
    t = torch.randint(lo, max(hi, lo + 1), (1,), generator=generator).to(x.device)
    return x, t.expand(batch_size)


def esd(model_dir: str | os.PathLike, forget_prompt: str | Sequence[str], *, steps: int = 300,
        train_method: str = "noxattn", negative_guidance: float = 1.0, lr: float = 1e-4,
        start_guidance: float = 3.0, ddim_steps: int = 20, batch_size: int = 1, seed: int = 0,
        progress: bool = True) -> dict[str, Any]:
    """Erase ``forget_prompt`` with ESD (official ``train_esd``); cached by its settings.

    Each step draws a prompt c from ``forget_prompt`` (a list: one per step, as the official
    ``--seperator``), makes x_t with :func:`esd_noisy_latent` and takes one Adam step on
    :func:`esd_loss` -- ``|| eps_theta(x_t, t, c) - (eps*(x_t, t, "") - eta (eps*(x_t, t, c) -
    eps*(x_t, t, ""))) ||^2``.

    Args:
        model_dir: a pipeline folder (``save_pretrained``), ``"digits"`` or ``"tiny"``.
        forget_prompt: the concept, e.g. ``"seven"`` (official: the bare concept).
        steps: optimiser steps (official: 1000 for SD v1.4). Default 300: 62 s for the
            chapter 3 ci model on one thread of a loaded 2-core machine (0.2 s a step);
            about 0.25 s a step for the cpu model (one UNet forward of batch 2: 17 ms).
        train_method: ``"noxattn"`` (ESD-u, official for objects/nudity) or ``"xattn"``
            (ESD-x, official for artistic styles), or ``"full"``.
        negative_guidance: eta (official 1.0).
        lr: Adam learning rate. Official 1e-5 for SD v1.4's 860M-weight UNet over 1000 steps;
            the default 1e-4 is for the chapter 3 models (0.8-3 M UNet weights, 300 steps:
            a budget of minutes, not hours).
        start_guidance: guidance of the DDIM sample that makes x_t (official 3).
        ddim_steps: DDIM steps of that sample (official 50; 20 = chapter 3's render steps,
            2.5x cheaper, same bins of 50 timesteps each).
        batch_size: x_t per step, one t_enc for all (official 1).
        seed: seeds the start noise, t_enc, t and the prompt choice.

    Returns:
        ``{"pipeline_dir", "seconds", "trained" (UNet weights the method lets move),
        "history": {"step", "loss"}, "config"}``.
    """
    from sa_kit.sd.pipeline import check_model_source
    prompts = _prompts("forget_prompt", forget_prompt)
    check_choice("train_method", train_method, ESD_TRAIN_METHODS)
    for name, v in (("steps", steps), ("ddim_steps", ddim_steps), ("batch_size", batch_size)):
        check_positive_int(name, v)
    check_weight("negative_guidance", negative_guidance)
    check_weight("start_guidance", start_guidance)
    check_positive_float("lr", lr)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    model_dir = check_model_source(model_dir)
    config = {"model": str(model_dir), "forget_prompt": prompts, "steps": steps,
              "train_method": train_method, "negative_guidance": negative_guidance, "lr": lr,
              "start_guidance": start_guidance, "ddim_steps": ddim_steps,
              "batch_size": batch_size, "seed": seed, "version": 1}
    out = _cached("esd", config, lambda tmp: _train_esd(model_dir, prompts, config, tmp,
                                                        progress))
    return {**out, "config": config}


def _train_esd(model_dir: str, prompts: list[str], cfg: dict[str, Any], folder: Path,
               progress: bool) -> dict[str, Any]:
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    from sa_kit.sd.adapter import select_parameters
    from sa_kit.sd.pipeline import load_pipeline
    pipe = load_pipeline(model_dir)
    unet = pipe.unet
    frozen = copy.deepcopy(unet).requires_grad_(False).eval()       # eps*: model_orig
    select_parameters(unet, cfg["train_method"])
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg["lr"])                     # official: Adam
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(cfg["ddim_steps"])
    emb_null = _encode(pipe, [""])
    embs = {p: _encode(pipe, [p]) for p in prompts}
    g = torch.Generator().manual_seed(cfg["seed"])
    rng = random.Random(cfg["seed"])
    history: dict[str, list[float]] = {"step": [], "loss": []}
    unet.train()
    bar = tqdm(range(cfg["steps"]), desc="ESD", disable=not progress)
    for step in bar:
        emb_c = embs[rng.choice(prompts)]
        t_enc = int(torch.randint(cfg["ddim_steps"], (1,), generator=g))
        x_t, t = esd_noisy_latent(unet, sched, emb_c, emb_null, t_enc, cfg["start_guidance"],
                                  cfg["batch_size"], g)
        loss = esd_loss(unet, frozen, x_t, t, emb_c, emb_null, cfg["negative_guidance"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["step"].append(step + 1)
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{history['loss'][-1]:.4g}", refresh=False)
    bar.close()
    unet.eval().requires_grad_(False)
    _save(pipe, model_dir, folder)
    return {"history": history, "trained": sum(p.numel() for p in params)}


# -- UCE -------------------------------------------------------------------------------------

def uce_projections(unet: nn.Module) -> dict[str, nn.Linear]:
    """The cross-attention key and value projections UCE edits (``attn2.to_k`` / ``to_v``)."""
    from sa_kit.sd.adapter import is_cross_attention
    return {name: m for name, m in unet.named_modules()
            if is_cross_attention(name) and name.endswith((".to_k", ".to_v"))}


def uce_closed_form(w_old: Tensor, keys: Tensor, values: Tensor, scales: Tensor,
                    lamb: float = 0.5) -> Tensor:
    """``W_new = (lamb W + sum_i s_i v_i k_i^T) (lamb I + sum_i s_i k_i k_i^T)^-1`` (eq. 7).

    ``keys`` (N, D) are text embeddings, ``values`` (N, out) what W should map them to (W_old
    applied to the guide's or the preserved concept's embedding), ``scales`` (N,) erase_scale
    or preserve_scale per row. Solved in float64 (``mat2`` is symmetric positive definite for
    lamb > 0), returned in W's dtype.
    """
    w = w_old.detach().double()
    k, v, s = keys.double(), values.double(), scales.double().to(keys.device)
    mat1 = lamb * w + (v * s[:, None]).T @ k                           # (out, D)
    mat2 = lamb * torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + (k * s[:, None]).T @ k
    return torch.linalg.solve(mat2, mat1.T).T.to(w_old.dtype)         # mat1 @ mat2^-1


def _last_token(pipe: Any, text: str) -> int:
    """Index of the last subject token: ``attention_mask.sum() - 2`` (official)."""
    mask = pipe.tokenizer(text, padding="max_length", truncation=True,
                          max_length=pipe.tokenizer.model_max_length,
                          return_tensors="pt").attention_mask
    return int(mask.sum()) - 2


def _uce_keys(pipe: Any, erase: list[str], guide: list[str], preserve: list[str],
              tokens: str) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
    """``[(erase keys, guide keys)]`` per pair and ``[preserve keys]``, each ``(K, D)``.

    ``last`` (``uce_sd_erase.py``): one row, the last subject token. ``last_to_end``
    (``train-scripts/train_erase.py: edit_model``, the paper's runs): the last subject token and
    every token after it (end-of-text, padding), aligned between erase and guide prompt;
    preserve concepts with all their tokens.
    """
    pairs = []
    for e, g in zip(erase, guide):
        emb_e, emb_g = _encode(pipe, [e, g])
        i_e, i_g = _last_token(pipe, e), _last_token(pipe, g)
        if tokens == "last":
            pairs.append((emb_e[i_e:i_e + 1], emb_g[i_g:i_g + 1]))
        else:
            far, n = max(i_e, i_g), emb_e.shape[0]
            pairs.append((emb_e[i_e:n - (far - i_e)], emb_g[i_g:n - (far - i_g)]))
    keep = []
    for p in preserve:
        emb = _encode(pipe, [p])[0]
        i = _last_token(pipe, p)
        keep.append(emb[i:i + 1] if tokens == "last" else emb)
    return pairs, keep


@torch.no_grad()
def uce_edit(pipe: Any, erase: Sequence[str], guide: Sequence[str], preserve: Sequence[str] = (),
             *, lamb: float = 0.5, erase_scale: float = 1.0, preserve_scale: float = 1.0,
             tokens: str = "last") -> int:
    """Edit ``pipe.unet`` in place with UCE (:func:`uce_closed_form` per projection).

    ``guide[i]`` is where ``erase[i]`` goes (equal lengths). Values use the *original* W (the
    official code computes them with a copy of the unedited modules). Returns the number of
    weights changed (every entry of the edited projections).
    """
    pairs, keep = _uce_keys(pipe, list(erase), list(guide), list(preserve), tokens)
    keys = torch.cat([k for k, _ in pairs] + keep)
    guides = torch.cat([g for _, g in pairs] + keep)        # preserved: c* = c (W c stays)
    scales = torch.cat([torch.full((len(k),), float(erase_scale)) for k, _ in pairs] +
                       [torch.full((len(k),), float(preserve_scale)) for k in keep])
    changed = 0
    for module in uce_projections(pipe.unet).values():
        w_old = module.weight.detach().clone()
        values = guides.to(w_old) @ w_old.T                  # v*_i = W_old c*_i
        module.weight.copy_(uce_closed_form(w_old, keys.to(w_old), values, scales, lamb))
        changed += module.weight.numel()
    return changed


def uce(model_dir: str | os.PathLike, erase: str | Sequence[str],
        guide: str | Sequence[str] = "", preserve: Sequence[str] = (), *, lamb: float = 0.5,
        erase_scale: float = 1.0, preserve_scale: float = 1.0, tokens: str = "last"
        ) -> dict[str, Any]:
    """Erase concepts with UCE (official ``uce_sd_erase.py: UCE``); cached by its settings.

    Args:
        model_dir: a pipeline folder, ``"digits"`` or ``"tiny"``.
        erase: the concept(s), e.g. ``"seven"``.
        guide: where each goes -- one for all (official: ``""``, the start-of-text token) or
            one per erased concept, e.g. ``"one"`` (a surrogate, as SA's chapter 3 run).
        preserve: concepts whose keys and values must stay (official default: none); e.g.
            :func:`preserve_for` -- the other digits.
        lamb, erase_scale, preserve_scale: eq. 7's weights (official 0.5, 1, 1).
        tokens: ``"last"`` (official ``uce_sd_erase.py``) or ``"last_to_end"`` (the paper-era
            ``train_erase.py``: also end-of-text and padding tokens).

    Returns:
        ``{"pipeline_dir", "seconds", "trained" (weights changed), "layers" (projections
        edited), "config"}``.
    """
    from sa_kit.sd.pipeline import check_model_source, load_pipeline
    erase = _prompts("erase", erase)
    guide = _prompts("guide", guide, allow_empty=True)
    preserve = _prompts("preserve", preserve) if preserve else []
    if len(guide) == 1:
        guide = guide * len(erase)                          # official: one guide for all
    if len(guide) != len(erase):
        raise ValueError(f"guide must be one prompt or one per erased concept ({len(erase)}), "
                         f"got {len(guide)}")
    check_positive_float("lamb", lamb)
    check_weight("erase_scale", erase_scale)
    check_weight("preserve_scale", preserve_scale)
    check_choice("tokens", tokens, UCE_TOKENS)
    model_dir = check_model_source(model_dir)
    config = {"model": str(model_dir), "erase": erase, "guide": guide, "preserve": preserve,
              "lamb": lamb, "erase_scale": erase_scale, "preserve_scale": preserve_scale,
              "tokens": tokens, "version": 1}

    def make(folder: Path) -> dict[str, Any]:
        pipe = load_pipeline(model_dir)
        trained = uce_edit(pipe, erase, guide, preserve, lamb=lamb, erase_scale=erase_scale,
                           preserve_scale=preserve_scale, tokens=tokens)
        _save(pipe, model_dir, folder)
        return {"trained": trained, "layers": len(uce_projections(pipe.unet))}

    return {**_cached("uce", config, make), "config": config}


def preserve_for(model_dir: str | os.PathLike, erase: str, exclude: Sequence[str] = ()
                 ) -> list[str]:
    """The other values of ``erase``'s slot in the pipeline's prompt spec (UCE's preserve list).

    For the chapter 3 model and ``"seven"``: the nine other digit words. ``exclude``: more
    values to leave out (e.g. the guide).

    Raises:
        ValueError: if ``erase`` is no slot value of the model's prompt spec.
    """
    from sa_kit.sd.prompts import spec_for
    spec = spec_for(str(model_dir))
    found = spec.slot_of(erase)
    if found is None:
        raise ValueError(f"erase {erase!r} is not a value of the model's prompt spec; give "
                         "preserve concepts yourself")
    skip = {erase.lower(), *(e.lower() for e in exclude)}
    return [v for v in spec.slots[found[0]] if v.lower() not in skip]
