"""Chapter 3's explorer: lambda, train_method and the mapping prompt -> a short SA job.

:func:`explore` is a plain function (tested on its own); :func:`make_explorer` only wires it to
ipywidgets. Each setting gets its own folder, so a repeated setting loads its finished run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from sa_kit.io import cache_dir, config_hash
from sa_kit.profiles import SDSizes
from sa_kit.sd.config import TRAIN_METHODS
from sa_kit.sd.forget import run
from sa_kit.widgets import LAMBDAS


def explore(lmbda: float, train_method: str, surrogate_prompt: str, sizes: SDSizes,
            work_dir: str | Path | None = None, steps: int | None = None,
            data_dir: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Run a short forgetting job and summarise it.

    Args:
        lmbda: EWC weight (eq. 3).
        train_method: ``full``, ``xattn`` or ``noxattn``.
        surrogate_prompt: what ``sizes.forget_prompt`` should turn into (eq. 1).
        sizes: the chapter's profile sizes (model, batch, lr, data sizes).
        work_dir: where runs are kept (default: the kit's cache).
        steps: training steps (default ``sizes.widget_steps``).
        data_dir: generated sets and Fishers, shared between runs (default: in ``work_dir``).

    Returns:
        ``{"history", "surrogate_start", "surrogate_end", "ewc_end", "changed",
        "frozen_changed", "pipeline_dir"}``: ``changed`` counts UNet tensors that moved,
        ``frozen_changed`` those that moved although ``train_method`` froze them (should be 0).
    """
    cfg = dataclasses.replace(sizes.run, output_dir="", surrogate_prompt=surrogate_prompt,
                              train_method=train_method, lmbda=lmbda,
                              steps=steps or sizes.widget_steps, checkpoint_every=10_000)
    root = Path(work_dir) if work_dir is not None else cache_dir() / "sd_explorer"
    cfg.output_dir = str(root / config_hash(dataclasses.asdict(cfg)))
    cfg.data_dir = str(data_dir or root / "data")  # reused across lambda / train_method
    out = run(cfg, progress=progress)
    before = dict(out["pipe"].unet.named_parameters())  # run() trained this UNet in place
    from sa_kit.sd.pipeline import load_pipeline
    original = dict(load_pipeline(sizes.run.model,
                                  device=out["pipe"].device).unet.named_parameters())
    moved = {k for k, p in before.items() if not torch.equal(p.detach(), original[k])}
    trainable = {k.removeprefix("unet.") for k, p in out["adapter"].named_parameters()
                 if p.requires_grad}
    h = out["history"]
    k = max(1, len(h["surrogate"]) // 4)
    return {"history": h, "surrogate_start": sum(h["surrogate"][:k]) / k,
            "surrogate_end": sum(h["surrogate"][-k:]) / k, "ewc_end": h["ewc"][-1],
            "changed": len(moved), "frozen_changed": len(moved - trainable),
            "pipeline_dir": str(out["pipeline_dir"])}


def format_summary(summary: dict[str, Any]) -> str:
    """One line per number, for the widget's output area."""
    return (f"surrogate loss (eq. 1): {summary['surrogate_start']:.4f} -> "
            f"{summary['surrogate_end']:.4f}\n"
            f"EWC penalty (eq. 3, unweighted) at the end: {summary['ewc_end']:.3g}\n"
            f"UNet tensors changed: {summary['changed']} (frozen ones changed: "
            f"{summary['frozen_changed']})")


def make_explorer(sizes: SDSizes, callback: Callable[..., dict[str, Any]] = explore,
                  **kwargs: Any) -> Any:
    """ipywidgets: lambda slider, train_method dropdown, surrogate text, a Run button.

    The button calls ``callback(lmbda, train_method, surrogate_prompt, sizes, **kwargs)``.
    """
    import ipywidgets as W
    options = sorted(set(LAMBDAS) | {float(sizes.run.lmbda)})
    lmbda = W.SelectionSlider(options=options, value=float(sizes.run.lmbda), description="lambda")
    method = W.Dropdown(options=TRAIN_METHODS, value=sizes.run.train_method,
                        description="train_method")
    surrogate = W.Text(value="a middle aged man", description="surrogate")
    button, out = W.Button(description="Run short job"), W.Output()

    def on_click(_: Any) -> None:
        with out:
            out.clear_output()
            print(format_summary(callback(lmbda.value, method.value, surrogate.value, sizes,
                                          **kwargs)))

    button.on_click(on_click)
    return W.VBox([W.HTML(f"forget prompt: <b>{sizes.run.forget_prompt}</b>"), lmbda, method,
                   surrogate, button, out])
