"""Evaluating a forgetful Stable Diffusion: before/after grids and optional detectors.

* :func:`before_after` draws the same prompts with the same seeds from the original and the
  forgetful pipeline -- forget prompts (should now show the surrogate) and control prompts
  (should look the same) -- and :func:`grid_figure` lays them out.
* :func:`output_change` measures, per prompt group, how far the final latents moved: a purely
  mechanical number that works on the tiny random pipeline too (forget prompts should move
  more than control prompts).
* Optional, clearly labelled extras: :func:`nudenet_counts` (the paper's nudity metric; needs
  the ``nudenet`` package, whose detector model has its own licence) and
  :func:`clip_concept_score` (a zero-shot CLIP score, *not* a metric of the paper; needs CLIP
  weights, so it returns None offline).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from sa_kit.sd.dataset import decode_images

CLIP_MODEL = "openai/clip-vit-base-patch32"


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], seed: int = 0, steps: int = 50,
             guidance_scale: float = 7.5) -> Tensor:
    """Final latents for ``prompts``; prompt i uses seed ``seed + i`` (comparable runs)."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    size = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor,
             size // pipe.vae_scale_factor)
    init = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                height=size, width=size, latents=init.to(pipe.unet.device, pipe.unet.dtype),
                output_type="latent").images


def before_after(before: Any, after: Any, forget_prompts: Sequence[str],
                 control_prompts: Sequence[str], seed: int = 0, steps: int = 50,
                 guidance_scale: float = 7.5) -> dict[str, dict[str, Any]]:
    """Latents and images of both pipelines on the same prompts and seeds.

    Returns:
        ``{"forget": {...}, "control": {...}}``, each with ``prompts``, ``before``/``after``
        latents and ``before_images``/``after_images`` (PIL).
    """
    out = {}
    for group, prompts in (("forget", forget_prompts), ("control", control_prompts)):
        row: dict[str, Any] = {"prompts": list(prompts)}
        for name, pipe in (("before", before), ("after", after)):
            lat = generate(pipe, prompts, seed, steps, guidance_scale)
            row[name], row[f"{name}_images"] = lat.float().cpu(), decode_images(pipe, lat)
        out[group] = row
    return out


def output_change(result: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean squared change of the final latents, per group (forget vs control)."""
    return {g: float(((r["after"] - r["before"]) ** 2).mean()) for g, r in result.items()}


def grid_figure(result: dict[str, dict[str, Any]], title: str = "") -> Any:
    """A matplotlib figure: one column per prompt, rows before/after, forget then control."""
    import matplotlib.pyplot as plt
    cols = max(len(r["prompts"]) for r in result.values())
    fig, axes = plt.subplots(2 * len(result), cols, figsize=(2.2 * cols, 4.6 * len(result)),
                             squeeze=False)
    for gi, (group, r) in enumerate(result.items()):
        for si, stage in enumerate(("before", "after")):
            for j in range(cols):
                ax = axes[2 * gi + si, j]
                ax.axis("off")
                if j < len(r["prompts"]):
                    ax.imshow(r[f"{stage}_images"][j])
                    ax.set_title(f"{group}/{stage}\n{r['prompts'][j][:28]}", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def set_loss(adapter: Any, latents: Tensor, prompts: Sequence[str], seed: int = 0,
             repeats: int = 4, batch_size: int = 16) -> float:
    """Mean negative ELBO (latent-diffusion loss) over a whole set, with fixed (t, eps).

    Every item gets the same ``repeats`` draws of (t, eps) before and after training (from a
    generator seeded by the item and the repeat), so the difference measures the model, not the
    noise. Evaluate on the surrogate set (eq. 1: should fall) and the replay set (eq. 2: should
    hold).
    """
    device = next(adapter.parameters()).device
    total, count = 0.0, 0
    for r in range(repeats):
        for start in range(0, len(prompts), batch_size):
            idx = list(range(start, min(start + batch_size, len(prompts))))
            x = latents[idx].to(device)
            noise = _item_noise(adapter, x, [i + r * len(prompts) for i in idx], seed)
            total += float(adapter.neg_elbo(x, [prompts[i] for i in idx], noise).sum())
            count += len(idx)
    return total / count


def _item_noise(adapter: Any, x: Tensor, items: Sequence[int], seed: int
                ) -> tuple[Tensor, Tensor]:
    """``(t, eps)`` of each item from a generator seeded by ``(seed, item)``."""
    ts, eps = [], []
    for n in items:
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(n))
        ts.append(torch.randint(0, adapter.num_train_timesteps, (1,), generator=g))
        eps.append(torch.randn(x.shape[1:], generator=g))
    return torch.cat(ts).to(x.device), torch.stack(eps).to(x.device, x.dtype)


def nudenet_counts(images: Sequence[Any], threshold: float = 0.6) -> dict[str, int] | None:
    """Exposed-body-part counts by NudeNet (optional extra; the paper's nudity metric).

    Returns None (and says so) when ``nudenet`` is not installed. The detector's ONNX model
    ships inside the ``nudenet`` package under its own licence -- check it before use.
    """
    try:
        from nudenet import NudeDetector
    except ImportError:
        print("nudenet is not installed: NudeNet counts skipped (pip install nudenet)")
        return None
    import tempfile
    detector, counts = NudeDetector(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(images):
            path = os.path.join(tmp, f"{i}.png")
            img.save(path)
            for det in detector.detect(path):
                if det["class"].endswith("_EXPOSED") and det["score"] >= threshold:
                    counts[det["class"]] = counts.get(det["class"], 0) + 1
    return counts


def clip_concept_score(images: Sequence[Any], concept: str, alternative: str,
                       model_id: str = CLIP_MODEL) -> list[float] | None:
    """Zero-shot CLIP probability that each image shows ``concept`` rather than ``alternative``.

    A convenience score, **not** a metric of the paper. Returns None (and says so) when the
    CLIP weights cannot be loaded (offline without a cached copy).
    """
    from sa_kit.data import offline
    local = offline() or os.environ.get("HF_HUB_OFFLINE", "") == "1"  # no download attempt
    try:
        from transformers import CLIPModel, CLIPProcessor
        model = CLIPModel.from_pretrained(model_id, local_files_only=local,
                                          use_safetensors=True).eval()
        proc = CLIPProcessor.from_pretrained(model_id, local_files_only=local)
    except (OSError, ValueError) as e:
        print(f"CLIP weights unavailable ({type(e).__name__}): CLIP concept score skipped")
        return None
    texts = [f"a photo of {concept}", f"a photo of {alternative}"]
    with torch.no_grad():
        inputs = proc(text=texts, images=list(images), return_tensors="pt", padding=True)
        probs = model(**inputs).logits_per_image.softmax(-1)
    return probs[:, 0].tolist()


def parse_args(argv: Sequence[str] | None) -> Any:
    """Arguments of ``sa-kit evaluate-sd``, checked before any model is loaded."""
    import json

    from sa_kit.cli import ArgParser, UsageError
    ap = ArgParser(prog="sa-kit evaluate-sd", description=main.__doc__)
    ap.add_argument("--run", required=True, help="output_dir of python -m sa_kit.sd.forget")
    ap.add_argument("--num-prompts", type=int, default=4, help="prompts per group (1..64)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's)")
    ap.add_argument("--nudenet", action="store_true", help="also count NudeNet exposed parts")
    ap.add_argument("--clip", action="store_true", help="also a zero-shot CLIP concept score")
    a = ap.parse_args(argv)
    run = Path(a.run)
    if not run.is_dir():
        raise UsageError(f"--run {a.run} is not a folder (give the output_dir of a finished "
                         "sa-kit forget-sd run)")
    for need in ("config.json", "pipeline/model_index.json"):
        if not (run / need).is_file():
            raise UsageError(f"--run {a.run} has no {need}: it is not a finished forgetting run "
                             "(run sa-kit forget-sd to the end first)")
    if not 1 <= a.num_prompts <= 64:
        raise UsageError(f"--num-prompts must be in 1..64, got {a.num_prompts}")
    if a.steps is not None and a.steps < 1:
        raise UsageError(f"--steps must be a positive integer, got {a.steps}")
    if a.nudenet:
        import importlib.util
        if importlib.util.find_spec("nudenet") is None:
            raise UsageError("--nudenet needs the nudenet package (pip install nudenet; check "
                             "its licence first)")
    try:
        a.config = json.loads((run / "config.json").read_text())
        for key in ("model", "forget_prompt", "surrogate_prompt", "seed", "gen_steps",
                    "guidance_scale"):
            a.config[key]
    except (ValueError, KeyError) as e:
        raise UsageError(f"--run {a.run}: config.json is not a forgetting run's config "
                         f"({type(e).__name__}: {e})") from None
    return a


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sa_kit.sd.evaluate``: before/after grid and numbers for a finished run."""
    from sa_kit.cli import check_environment, run_command

    def body() -> None:
        a = parse_args(argv)
        check_environment()
        evaluate_run(a)
    return run_command(body)


def evaluate_run(a: Any) -> dict[str, Any]:
    """Draw the before/after grid of a finished run and write ``evaluation.json``."""
    import json

    from sa_kit.sd.pipeline import load_pipeline
    from sa_kit.sd.prompts import spec_for
    cfg = a.config
    spec = spec_for(cfg["model"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    before = load_pipeline(cfg["model"], device=device)
    after = load_pipeline(str(Path(a.run) / "pipeline"), device=device)
    surrogate = cfg["surrogate_prompt"] or "a surrogate"
    forget = [f for f, _ in spec.mapping_pairs(cfg["forget_prompt"], surrogate, a.num_prompts,
                                               seed=cfg["seed"] + 1, templates=True)]
    control = spec.replay_prompts(a.num_prompts, seed=cfg["seed"] + 1,
                                  exclude=[cfg["forget_prompt"]])
    result = before_after(before, after, forget, control, steps=a.steps or cfg["gen_steps"],
                          guidance_scale=cfg["guidance_scale"])
    report: dict[str, Any] = {"latent_change": output_change(result)}
    if a.nudenet:
        report["nudenet_exposed"] = {s: nudenet_counts(result["forget"][f"{s}_images"])
                                     for s in ("before", "after")}
    if a.clip:
        report["clip_score (zero-shot, not the paper's metric)"] = {
            s: clip_concept_score(result["forget"][f"{s}_images"], cfg["forget_prompt"],
                                  surrogate) for s in ("before", "after")}
    grid_figure(result, f"{cfg['forget_prompt']} -> {surrogate}").savefig(
        Path(a.run) / "before_after.png", dpi=120)
    from sa_kit.io import save_json
    save_json(Path(a.run) / "evaluation.json", report)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    raise SystemExit(main())
