"""Selective Amnesia for Stable Diffusion: the training CLI (diffusers + accelerate).

    python -m sa_kit.sd.forget --config run.yaml                       # one process
    accelerate launch -m sa_kit.sd.forget --config run.yaml            # one or many GPUs
    sa-kit forget-sd --config run.yaml                                  # the console script

Stages (all by default; ``--stage data|fisher`` stops early):

1. **data** -- the frozen original pipeline draws the surrogate set (images of the surrogate
   prompt, trained under the forget prompt: eq. 1) and the replay set (the kit's replay
   prompts: eq. 2), cached and resumable (:mod:`sa_kit.sd.dataset`).
2. **fisher** -- the UNet's diagonal Fisher on the replay set (eq. 3; the official definition,
   :mod:`sa_kit.diffusion_fisher`), sharded over processes, cached as safetensors; or
   ``fisher_path`` to load a precomputed one.
3. **train** -- AdamW on :func:`sa_kit.objective.sa_loss` over the parameters chosen by
   ``train_method`` (``full``, ``xattn``, ``noxattn``), an effective batch of
   ``effective_batch`` items per step (processes x batch x gradient accumulation), mixed
   precision, gradient checkpointing, checkpoints every ``checkpoint_every`` steps and exact
   resume; the result is saved as a diffusers pipeline folder ``output_dir/pipeline``.

Every step draws its batches and noise from generators seeded by ``(seed, step, process,
micro-batch)``, so a resumed run continues exactly as an uninterrupted one would. Checkpoints
are the kit's own safetensors files (weights that train, optimiser state, history): nothing is
unpickled on resume, whatever the ``accelerate`` version. Ctrl-C or SIGTERM stop after the step
in progress, with a checkpoint of it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from sa_kit.forget import NonFiniteLossError
from sa_kit.io import config_hash, save_json
from sa_kit.objective import sa_loss
from sa_kit.sd.adapter import SDAdapter, select_parameters
from sa_kit.sd.config import SDForgetConfig, load_config
from sa_kit.sd.dataset import LatentDataset, build_dataset, encode_image_folder
from sa_kit.sd.fisher import load_unet_fisher, save_unet_fisher, unet_fisher
from sa_kit.sd.prompts import spec_for, split_prompts
from sa_kit.train import GracefulStop, interrupted, load_checkpoint, save_checkpoint

STAGES = ("data", "fisher", "train")
CHECKPOINT = "checkpoint.safetensors"

__all__ = ["SDForgetConfig", "load_config", "run", "main", "build_data", "get_fisher", "train"]


def make_accelerator(cfg: SDForgetConfig) -> Any:
    """An ``Accelerator``; in a plain (non-launched) process any previous state is reset."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())


def data_root(cfg: SDForgetConfig) -> Path:
    """Where generated sets and the Fisher live; runs that share it share what they can."""
    return Path(cfg.data_dir or Path(cfg.output_dir) / "data")


def _made_by(cfg: SDForgetConfig, *keys: str) -> str:
    return config_hash({k: getattr(cfg, k) for k in ("model", "forget_prompt", "seed",
                                                     "gen_steps", "guidance_scale") + keys})


def build_data(cfg: SDForgetConfig, pipe: Any, accelerator: Any
               ) -> tuple[LatentDataset, LatentDataset]:
    """Stage 1: the surrogate set (eq. 1) and the replay set (eq. 2), built by process 0.

    Each set's folder is named by the settings that made it, so runs that differ only in
    lambda, train_method or steps reuse it.
    """
    surr_dir = data_root(cfg) / "surrogate-{}".format(_made_by(
        cfg, "surrogate_prompt", "num_surrogate", "surrogate_image_dir", "prompt_templates"))
    replay_dir = data_root(cfg) / f"replay-{_made_by(cfg, 'num_replay')}"
    spec = spec_for(cfg.model)                  # the prompts this model knows
    replay = spec.replay_prompts(cfg.num_replay, cfg.seed,
                                 exclude=split_prompts(cfg.forget_prompt))
    gen = dict(seed=cfg.seed, batch_size=cfg.gen_batch_size, guidance_scale=cfg.guidance_scale,
               num_inference_steps=cfg.gen_steps, progress=accelerator.is_main_process)
    if accelerator.is_main_process:
        if cfg.surrogate_image_dir:  # your own surrogate images, under the forget prompts
            forgets = split_prompts(cfg.forget_prompt)
            encode_image_folder(pipe, cfg.surrogate_image_dir, surr_dir, train_prompts=forgets)
        else:
            pairs = spec.mapping_pairs(cfg.forget_prompt, cfg.surrogate_prompt,
                                       cfg.num_surrogate, cfg.seed,
                                       templates=cfg.prompt_templates)
            build_dataset(pipe, [s for _, s in pairs], surr_dir,
                          train_prompts=[f for f, _ in pairs], **gen)
        build_dataset(pipe, replay, replay_dir, **gen)
    accelerator.wait_for_everyone()
    return LatentDataset(surr_dir), LatentDataset(replay_dir)


def get_fisher(cfg: SDForgetConfig, adapter: SDAdapter, replay: LatentDataset,
               accelerator: Any) -> dict[str, torch.Tensor] | None:
    """Stage 2: load ``fisher_path`` or the cached Fisher; else compute (sharded) and save."""
    if cfg.lmbda == 0:
        return None
    made_by = _made_by(cfg, "num_replay", "train_method", "fisher_timesteps",
                       "fisher_estimator")
    if cfg.fisher_path:                    # the user's file: a mismatch is their error, said plainly
        return load_unet_fisher(cfg.fisher_path, adapter)
    path = data_root(cfg) / f"fisher-{made_by}.safetensors"
    if path.exists():                      # the kit's cache: unusable -> reported and rebuilt
        try:
            return load_unet_fisher(path, adapter)
        except ValueError as e:
            warnings.warn(f"cached Fisher is unusable and will be rebuilt: {e}", stacklevel=2)
    fisher = unet_fisher(adapter, replay.latents, replay.prompts, seed=cfg.seed,
                         num_timesteps=cfg.fisher_timesteps, estimator=cfg.fisher_estimator,
                         batch_size=cfg.fisher_batch_size, accelerator=accelerator,
                         checkpoint=path.with_suffix(".partial"),
                         progress=accelerator.is_main_process)
    if accelerator.is_main_process:
        save_unet_fisher(path, fisher, adapter, {"train_method": cfg.train_method,
                                                 "num_items": len(replay),
                                                 "timesteps": cfg.fisher_timesteps})
    accelerator.wait_for_everyone()
    return fisher


class _Trainee:
    """The prepared (possibly DDP-wrapped) adapter seen through ``ForgettableModel``.

    ``neg_elbo`` goes through the wrapper's forward (so gradients are synchronised);
    ``named_parameters`` are the unwrapped adapter's, so ``ewc_penalty`` matches the Fisher.
    """

    loss_reduction = SDAdapter.loss_reduction

    def __init__(self, wrapped: torch.nn.Module, adapter: SDAdapter) -> None:
        self.wrapped, self.adapter = wrapped, adapter

    def neg_elbo(self, x: torch.Tensor, c: Any, noise: Any = None) -> torch.Tensor:
        c = c if isinstance(c, torch.Tensor) else self.adapter.encode_prompts(c)
        return self.wrapped(x, c, noise)

    def draw_noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.draw_noise(x)

    def sample(self, c: Any) -> torch.Tensor:
        return self.adapter.sample(c)

    def named_parameters(self):  # noqa: ANN201 - same as nn.Module
        return self.adapter.named_parameters()


def _micro_batches(cfg: SDForgetConfig, step: int, micro: int, rank: int,
                   surrogate: LatentDataset, replay: LatentDataset, device: torch.device
                   ) -> tuple[Any, Any]:
    """The batches of one micro-batch; seeds the noise too (exact resume)."""
    g = torch.Generator().manual_seed(int(config_hash({"s": cfg.seed, "t": step, "r": rank,
                                                       "m": micro}), 16) % (2 ** 63))
    torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=g)))  # draw_noise's (t, eps)
    x_f, c_f = surrogate.sample(cfg.batch_size, g)
    batch_r = None
    if cfg.gamma > 0:
        x_r, c_r = replay.sample(cfg.batch_size, g)
        batch_r = (x_r.to(device), c_r)
    return (x_f.to(device), c_f), batch_r


def _prepare(cfg: SDForgetConfig, adapter: SDAdapter, fisher: dict[str, torch.Tensor] | None,
             accelerator: Any) -> tuple[Any, Any, list, dict, dict | None]:
    """Freeze by ``train_method``, keep theta*, build the optimiser and hand both to accelerate."""
    select_parameters(adapter.unet, cfg.train_method)
    if cfg.gradient_checkpointing:
        adapter.unet.enable_gradient_checkpointing()
    params = [p for p in adapter.parameters() if p.requires_grad]
    theta_star = {k: p.detach().clone().float() for k, p in adapter.named_parameters()
                  if p.requires_grad}                                   # theta* of eq. 3
    if fisher is not None:
        fisher = {k: fisher[k] for k in theta_star}
    optim = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = optim(params, lr=cfg.learning_rate())
    wrapped, opt = accelerator.prepare(adapter, opt)
    return wrapped, opt, params, theta_star, fisher


def _checkpoint_path(cfg: SDForgetConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints" / CHECKPOINT


def train(cfg: SDForgetConfig, adapter: SDAdapter, surrogate: LatentDataset,
          replay: LatentDataset, fisher: dict[str, torch.Tensor] | None, accelerator: Any,
          progress: bool = True) -> dict[str, list[float]]:
    """Stage 3: minimise the SA loss (eq. 1-3); checkpoints, exact resume, clean interrupts.

    One step = one optimiser update over ``effective_batch`` items: each of the
    ``accumulation`` micro-batches contributes ``1/accumulation`` of its SA loss (the data terms
    are means over the batch, so this is the mean over the effective batch; the EWC term
    enters once), as the official 4-GPU run averaged its 4 GPUs' gradients.

    Returns:
        The history: ``step``, ``loss``, ``surrogate``, ``replay``, ``ewc``, ``seconds``.
    """
    from tqdm.auto import tqdm
    wrapped, opt, params, theta_star, fisher = _prepare(cfg, adapter, fisher, accelerator)
    model = _Trainee(wrapped, adapter)
    accumulation = cfg.accumulation(accelerator.num_processes)
    steps, key, ckpt = cfg.num_steps(), cfg.run_key(), _checkpoint_path(cfg)
    history: dict[str, list[float]] = {k: [] for k in ("step", "loss", "surrogate", "replay",
                                                         "ewc", "seconds")}
    start = 0
    if ckpt.exists():
        _, start, history = load_checkpoint(ckpt, accelerator.unwrap_model(wrapped), opt, key)
        accelerator.print(f"resumed from {ckpt} (step {start})")
    wrapped.train()
    t0 = time.perf_counter() - (history["seconds"][-1] if history["seconds"] else 0.0)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="forgetting",
               disable=not (progress and accelerator.is_main_process))
    with GracefulStop() as stop:
        for step in bar:
            sums = {k: 0.0 for k in ("loss", "surrogate", "replay", "ewc")}
            for micro in range(accumulation):
                surr, rep = _micro_batches(cfg, step, micro, accelerator.process_index,
                                           surrogate, replay, accelerator.device)
                terms = sa_loss(model, surr, rep, fisher, theta_star, cfg.lmbda, cfg.gamma)
                if not torch.isfinite(terms["loss"]):
                    raise NonFiniteLossError(f"the SA loss became {terms['loss'].item()} at "
                                             f"step {step}; try a smaller lr or lmbda")
                sync = micro == accumulation - 1
                ctx = accelerator.no_sync(wrapped) if not sync else contextlib.nullcontext()
                with ctx:
                    accelerator.backward(terms["loss"] / accumulation)
                for k in sums:
                    sums[k] += float(accelerator.reduce(terms[k].detach().float(), "mean"))
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for k, v in sums.items():                  # means over the micro-batches
                history[k].append(v / accumulation)
            history["step"].append(step + 1)
            history["seconds"].append(time.perf_counter() - t0)
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}", refresh=False)
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done == steps or stop.requested:
                if accelerator.is_main_process:
                    save_checkpoint(ckpt, accelerator.unwrap_model(wrapped), opt, done, history,
                                    key, trainable_only=True)
                accelerator.wait_for_everyone()
            if stop.requested:
                bar.close()
                raise interrupted(stop, "forgetting", done, ckpt)
    bar.close()
    wrapped.eval()
    accelerator.print(f"trained {len(params)} parameter tensors ({cfg.train_method}), "
                      f"{steps} steps of {cfg.effective_batch} items, lr {cfg.learning_rate():g}")
    return history


def save_result(cfg: SDForgetConfig, pipe: Any, adapter: SDAdapter, accelerator: Any,
                history: dict[str, list[float]]) -> Path:
    """Save the forgetful pipeline (diffusers folder) and the history, on process 0."""
    out = Path(cfg.output_dir) / "pipeline"
    if accelerator.is_main_process:
        pipe.unet = accelerator.unwrap_model(adapter).unet
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)                       # a half-written pipeline is never left
        save_json(Path(cfg.output_dir) / "history.json", history)
        save_json(Path(cfg.output_dir) / "config.json", dataclasses.asdict(cfg))
    accelerator.wait_for_everyone()
    return out


def run(cfg: SDForgetConfig, stage: str = "train", progress: bool = True) -> dict[str, Any]:
    """Run the stages up to ``stage`` (``data``, ``fisher`` or ``train``); returns what it made.

    Returns:
        ``{"pipe", "adapter", "surrogate", "replay", "fisher", "history", "pipeline_dir"}``
        (the later keys only when their stage ran).
    """
    from sa_kit.checks import check_choice
    from sa_kit.sd.pipeline import load_pipeline
    check_choice("stage", stage, STAGES)
    accelerator = make_accelerator(cfg)
    cfg.accumulation(accelerator.num_processes)          # the batch fits the processes: say so now
    torch.manual_seed(cfg.seed)
    pipe = load_pipeline(cfg.model, device=accelerator.device)
    adapter = SDAdapter.from_pipeline(pipe, sample_steps=cfg.gen_steps,
                                      guidance_scale=cfg.guidance_scale)
    surrogate, replay = build_data(cfg, pipe, accelerator)
    out: dict[str, Any] = {"pipe": pipe, "adapter": adapter, "surrogate": surrogate,
                           "replay": replay}
    if stage == "data":
        return out
    select_parameters(adapter.unet, cfg.train_method)  # the Fisher covers what is trained
    out["fisher"] = get_fisher(cfg, adapter, replay, accelerator)
    if stage == "fisher":
        return out
    out["history"] = train(cfg, adapter, surrogate, replay, out["fisher"], accelerator,
                           progress)
    out["pipeline_dir"] = save_result(cfg, pipe, adapter, accelerator, out["history"])
    return out


def parse_args(argv: Sequence[str] | None = None) -> tuple[SDForgetConfig, str]:
    """The command line -> ``(config, stage)``; a bad argument is a one-line ``ValueError``."""
    from sa_kit.cli import ArgParser
    ap = ArgParser(prog="sa-kit forget-sd", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a JSON or YAML file of SDForgetConfig keys")
    ap.add_argument("--stage", default="train", choices=STAGES, help="stop after this stage")
    ap.add_argument("overrides", nargs="*", help="key=value settings (override the file)")
    a = ap.parse_args(argv)
    overrides = {}
    for item in a.overrides:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"settings are key=value, got {item!r}")
        overrides[k.strip()] = v
    return load_config(a.config, **overrides), a.stage


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sa_kit.sd.forget --config FILE [--stage data|fisher|train] [key=value ...]``."""
    from sa_kit.cli import run_command
    return run_command(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> None:
    from sa_kit.cli import check_environment
    cfg, stage = parse_args(argv)
    check_environment()
    from sa_kit.sd.pipeline import check_model_source
    check_model_source(cfg.model)
    run(cfg, stage)


if __name__ == "__main__":
    raise SystemExit(main())
