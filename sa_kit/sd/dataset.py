"""Generated datasets for SD forgetting: replay images (eq. 2, 3) and surrogate images (eq. 1).

:func:`build_dataset` draws one image per prompt from the frozen original pipeline, in batches,
and stores for item n its latent (``items/n.safetensors``, pre-encoded: what training reads)
and, optionally, its PNG (``images/n.png``, what people look at). Item n's noise comes from a
generator seeded by ``seed + n``, so a batch of any size gives the same item. Every file is
written atomically and ``manifest.json`` lists the finished items after every batch: a killed
build resumes where it stopped, re-checks what it finds, and ends with each item exactly once.

Run from the shell (same as the function)::

    python -m sa_kit.sd.dataset --model tiny --out DIR --num-prompts 100
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sa_kit.io import atomic_write, config_hash, load_tensors, save_json, save_tensors
from sa_kit.sd.adapter import architecture
from sa_kit.train import GracefulStop, interrupted

MANIFEST = "manifest.json"


def _load_manifest(out: Path, key: str) -> dict[str, Any]:
    """The finished items of a previous build with the same config (re-verified), else {}."""
    import json
    path = out / MANIFEST
    if not path.exists():
        return {}
    manifest = json.loads(path.read_text())
    if manifest.get("config_hash") != key:
        raise ValueError(f"{out} holds a dataset built with other settings "
                         f"({manifest.get('config')}); use another output folder")
    done = {}
    for i, item in manifest["items"].items():
        try:  # a file that does not read back cleanly is rebuilt
            load_tensors(out / item["latent"])
            done[i] = item
        except (ValueError, FileNotFoundError):
            continue
    return done


def _clean_partial_writes(out: Path) -> None:
    """Remove temporary files a killed process left behind (atomic writes never finished)."""
    for tmp in list(out.rglob(".*.tmp")):
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def _generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int,
              guidance_scale: float, size: int) -> Tensor:
    """Latents x ~ p(x | theta*, c) for ``prompts``, one generator per item."""
    device = pipe.unet.device
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    shape = (len(prompts), pipe.unet.config.in_channels, size // pipe.vae_scale_factor,
             size // pipe.vae_scale_factor)
    init = torch.stack([torch.randn(shape[1:], generator=g) for g in gens])
    return pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                height=size, width=size, latents=init.to(device, pipe.unet.dtype),
                output_type="latent").images


@torch.no_grad()
def decode_images(pipe: Any, latents: Tensor) -> list:
    """PIL images of ``latents`` through the frozen VAE."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images, output_type="pil")


def _write_item(out: Path, i: int, prompt: str, train_prompt: str, latent: Tensor,
                image: Any) -> dict[str, str]:
    """Write item ``i`` (latent, optional PNG) atomically; returns its manifest entry."""
    item = {"prompt": prompt, "train_prompt": train_prompt,
            "latent": f"items/{i:06d}.safetensors"}
    save_tensors(out / item["latent"], {"latent": latent.float()}, {"kind": "sd_item", **item})
    if image is not None:
        item["image"] = f"images/{i:06d}.png"
        atomic_write(out / item["image"], lambda t: image.save(t, format="PNG"))
    return item


def build_dataset(pipe: Any, prompts: Sequence[str], out_dir: str | Path, *,
                  train_prompts: Sequence[str] | None = None, seed: int = 0,
                  batch_size: int = 4, num_inference_steps: int = 50,
                  guidance_scale: float = 7.5, size: int | None = None,
                  save_images: bool = True, progress: bool = True,
                  sleep: float = 0.0) -> dict[str, Any]:
    """Generate (or finish generating) one image per prompt; returns the manifest.

    Args:
        pipe: the frozen original pipeline (theta*).
        prompts: what to draw (replay prompts, or the surrogate's prompts).
        out_dir: the dataset folder (created; a previous build there is resumed).
        train_prompts: the condition each item is trained under; default ``prompts``. For the
            surrogate set these are the forget prompts c_f (eq. 1).
        seed: item n uses seed ``seed + n``.
        batch_size, num_inference_steps, guidance_scale, size: generation settings.
        save_images: also write PNGs (for grids and inspection).
        sleep: pause after each batch, in seconds (lets tests interrupt a tiny build).

    Raises:
        ValueError: an empty prompt list, mismatched ``train_prompts``, or a folder that
            holds a dataset built with other settings.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    train_prompts = list(train_prompts) if train_prompts is not None else list(prompts)
    if len(train_prompts) != len(prompts):
        raise ValueError("train_prompts must have one entry per prompt")
    out = Path(out_dir)
    size = size or int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    config = {"prompts": config_hash({"p": list(prompts), "t": train_prompts}), "seed": seed,
              "steps": num_inference_steps, "guidance": guidance_scale, "size": size,
              "unet": config_hash(architecture(pipe.unet))}
    key = config_hash(config)
    out.mkdir(parents=True, exist_ok=True)
    _clean_partial_writes(out)
    items = _load_manifest(out, key)
    todo = [i for i in range(len(prompts)) if str(i) not in items]
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="generating",
               disable=not progress)
    with GracefulStop() as stop:          # Ctrl-C / SIGTERM: finish the batch, keep it, say so
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            lat = _generate(pipe, [prompts[i] for i in idx], [seed + i for i in idx],
                            num_inference_steps, guidance_scale, size)
            images = decode_images(pipe, lat) if save_images else [None] * len(idx)
            for i, x, img in zip(idx, lat, images):
                items[str(i)] = _write_item(out, i, prompts[i], train_prompts[i], x, img)
            save_json(out / MANIFEST, {"config": config, "config_hash": key,
                                       "size": len(prompts), "items": items})
            bar.update(len(idx))
            if stop.requested:
                bar.close()
                raise interrupted(stop, f"generating {out.name}", len(items), out / MANIFEST)
            time.sleep(sleep)
    bar.close()
    manifest = {"config": config, "config_hash": key, "size": len(prompts), "items": items}
    save_json(out / MANIFEST, manifest)
    return manifest


@torch.no_grad()
def encode_image_folder(pipe: Any, folder: str | Path, out_dir: str | Path,
                        train_prompts: Sequence[str], batch_size: int = 8) -> dict[str, Any]:
    """Pre-encode your own surrogate images (eq. 1) into a dataset :class:`LatentDataset` reads.

    Every png/jpg in ``folder`` is resized to the pipeline's resolution, encoded by the frozen
    VAE (the mean of q(z | x), times the VAE's scaling factor); image i is trained under
    ``train_prompts[i % len(train_prompts)]`` -- e.g. photos of middle aged men under prompts
    about "brad pitt".

    Raises:
        ValueError: if the folder holds no images or ``train_prompts`` is empty.
    """
    from sa_kit.mappings import load_image_folder
    if isinstance(train_prompts, str) or len(train_prompts) == 0:
        raise ValueError("train_prompts must be a non-empty list of strings")
    size = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    images = load_image_folder(folder, (3, size, size), (-1.0, 1.0))
    out, vae = Path(out_dir), pipe.vae
    items: dict[str, Any] = {}
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(vae.device, vae.dtype)
        lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        for j, z in enumerate(lat):
            i = start + j
            items[str(i)] = _write_item(out, i, f"image {i} of {folder}",
                                        train_prompts[i % len(train_prompts)], z, None)
    manifest = {"config": {"folder": str(folder)}, "config_hash": config_hash(
        {"folder": str(folder), "n": len(images), "prompts": list(train_prompts)}),
        "size": len(images), "items": items}
    save_json(out / MANIFEST, manifest)
    return manifest


class LatentDataset:
    """A finished dataset in memory: latents ``(N, 4, h, w)`` and their training prompts.

    ``sample(batch_size, generator)`` draws ``(x, prompts)`` uniformly with replacement (the
    batch-source interface of :mod:`sa_kit.forget`).
    """

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        import json
        folder = Path(folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        n = manifest["size"]
        if len(manifest["items"]) != n:
            raise ValueError(f"dataset {folder} is incomplete ({len(manifest['items'])}/{n} "
                             "items); run build_dataset again to finish it")
        items = [manifest["items"][str(i)] for i in range(n)]
        self.latents = torch.stack([load_tensors(folder / it["latent"])[0]["latent"]
                                    for it in items]).to(device)
        self.prompts = [it["train_prompt"] for it in items]
        self.source_prompts = [it["prompt"] for it in items]
        self.images = [folder / it["image"] for it in items if "image" in it]

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, batch_size: int, generator: torch.Generator | None = None
               ) -> tuple[Tensor, list[str]]:
        """A batch ``(x, c)``: latents and their training prompts."""
        idx = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        return self.latents[idx], [self.prompts[i] for i in idx]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sa_kit.sd.dataset``: build a replay dataset from the kit's prompt set."""
    from sa_kit.cli import ArgParser, UsageError, check_environment, run_command

    def body() -> None:
        ap = ArgParser(prog="sa-kit sd-dataset", description=main.__doc__)
        ap.add_argument("--model", default="tiny", help="'tiny', a pipeline folder or a model id")
        ap.add_argument("--out", required=True, help="dataset folder (resumed if it exists)")
        ap.add_argument("--num-prompts", type=int, default=100)
        ap.add_argument("--batch-size", type=int, default=4)
        ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
        ap.add_argument("--guidance", type=float, default=7.5)
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--sleep", type=float, default=0.0, help=argparse.SUPPRESS)
        a = ap.parse_args(argv)
        for name in ("num_prompts", "batch_size", "steps"):
            if getattr(a, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got "
                                 f"{getattr(a, name)}")
        if not 0 <= a.guidance < 1e6:
            raise UsageError(f"--guidance must be a number >= 0, got {a.guidance}")
        out = Path(a.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {a.out} exists and is not a folder")
        check_environment()
        from sa_kit.io import check_cache_dir
        try:
            check_cache_dir(out)
        except OSError as e:
            raise UsageError(str(e).replace("set SA_KIT_CACHE to", "choose --out in")) from None
        from sa_kit.sd.pipeline import check_model_source, load_pipeline
        from sa_kit.sd.prompts import replay_prompts
        check_model_source(a.model)
        prompts = replay_prompts(a.num_prompts, a.seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = load_pipeline(a.model, device=device)
        build_dataset(pipe, prompts, a.out, seed=a.seed, batch_size=a.batch_size,
                      num_inference_steps=a.steps, guidance_scale=a.guidance, sleep=a.sleep)
    return run_command(body)


if __name__ == "__main__":
    raise SystemExit(main())
