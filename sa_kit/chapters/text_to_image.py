"""Chapter 3's building blocks: the small text-to-image model, its evaluator, forgetting runs.

On a CPU the model is the kit's coloured-digit pipeline (:mod:`sa_kit.sd.digits`), trained once
and cached; with a GPU it can be Stable Diffusion v1.4. Either way a forgetting run is
:func:`sa_kit.sd.forget.run` -- the training CLI's own code -- with ``model`` set to the
pipeline folder. Images of a prompt list are drawn with fixed seeds, so before/after
comparisons see the same starting noise.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from sa_kit import seed_everything
from sa_kit.io import cache_dir, config_hash, load_or_train, save_json
from sa_kit.sd.config import SDForgetConfig
from sa_kit.sd.digits import (DigitColourClassifier, T2ISizes, judge, make_dataset,
                              pipeline_dir, train_evaluator)

__all__ = ["pretrained_t2i", "t2i_evaluator", "render", "score", "forget_run"]


def pretrained_t2i(sizes: T2ISizes, seed: int = 0, progress: bool = True) -> Path:
    """The trained coloured-digit pipeline's folder (trained on first use, then cached)."""
    return pipeline_dir(sizes, seed, progress)


def t2i_evaluator(sizes: T2ISizes, seed: int = 0, progress: bool = True
                  ) -> DigitColourClassifier:
    """The evaluator: digit and colour heads, trained plainly on real coloured digits (cached)."""
    seed_everything(seed)
    data = make_dataset(sizes.num_examples // 4, sizes.image_size, seed)
    model = DigitColourClassifier()
    config = {"steps": sizes.classifier_steps, "n": len(data), "seed": seed}
    return load_or_train("t2i-evaluator", model, config, lambda m, ckpt: train_evaluator(
        m, data, sizes.classifier_steps, checkpoint_dir=ckpt, progress=progress))


@torch.no_grad()
def render(pipe: Any, prompts: Sequence[str], seed: int = 0, steps: int = 20,
           guidance_scale: float = 4.0, batch_size: int = 64) -> Tensor:
    """Images ``(N, 3, H, W)`` in [0, 1] of ``prompts``; prompt i starts from seed ``seed + i``."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        out.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale,
                        generator=gens, output_type="pt").images.float().cpu())
    return torch.cat(out)


def score(classifier: DigitColourClassifier, images: Tensor,
          items: Sequence[tuple[str, int, int]]) -> dict[str, Any]:
    """What the evaluator sees in images drawn for ``(prompt, digit, colour)`` items.

    Returns:
        ``p_digit`` / ``p_colour`` (N, 10) / (N, 6); ``digit_acc`` / ``colour_acc`` per digit
        and per colour index (over the items that name it); their means ``digit_accuracy``,
        ``colour_accuracy``.
    """
    pd, pc = judge(classifier, images)
    d = torch.tensor([it[1] for it in items])
    c = torch.tensor([it[2] for it in items])
    hit_d, hit_c = pd.argmax(1) == d, pc.argmax(1) == c
    digit_acc = {int(k): float(hit_d[d == k].float().mean()) for k in d.unique()}
    colour_acc = {int(k): float(hit_c[c == k].float().mean()) for k in c.unique()}
    return {"p_digit": pd, "p_colour": pc, "digit_acc": digit_acc, "colour_acc": colour_acc,
            "digit_accuracy": float(hit_d.float().mean()),
            "colour_accuracy": float(hit_c.float().mean())}


def forget_run(run: SDForgetConfig, model: str | Path, *, forget_prompt: str,
               surrogate_prompt: str, progress: bool = False, **settings: Any
               ) -> dict[str, Any]:
    """One Selective Amnesia run with the training CLI's code; cached by its settings.

    ``run`` is the profile's config; ``settings`` override its fields (``lmbda``,
    ``train_method``, ``steps``...). The data sets and the Fisher go to a folder shared by every
    run of this model, so runs that differ only in lambda or steps reuse them.

    Returns:
        ``{"pipeline_dir", "history", "seconds", "trained", "config"}`` (``trained``: how many
        UNet weights the train method lets move).
    """
    from sa_kit.sd.forget import run as run_tool
    model = str(model)
    cfg = dataclasses.replace(run, model=model, forget_prompt=forget_prompt,
                              surrogate_prompt=surrogate_prompt, **settings)
    key = config_hash({k: v for k, v in dataclasses.asdict(cfg).items()
                       if k not in ("output_dir", "data_dir")})
    cfg.output_dir = str(cache_dir() / f"t2i-forget-{key}")
    cfg.data_dir = str(cache_dir() / f"t2i-data-{config_hash({'model': model})}")
    out = Path(cfg.output_dir)
    if not ((out / "pipeline" / "model_index.json").exists() and (out / "run.json").exists()):
        start = time.perf_counter()
        result = run_tool(cfg, progress=progress)
        save_json(out / "run.json", {
            "history": result["history"], "seconds": time.perf_counter() - start,
            "trained": sum(p.numel() for p in result["adapter"].parameters() if p.requires_grad)})
    meta = json.loads((out / "run.json").read_text())
    return {"pipeline_dir": out / "pipeline", "history": meta["history"],
            "seconds": meta["seconds"], "trained": meta["trained"], "config": cfg}
