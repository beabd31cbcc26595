"""Selective Amnesia for Stable Diffusion: the training CLI (diffusers + accelerate).

    python -m sa_kit.sd.forget --config run.yaml                       # one process
    accelerate launch -m sa_kit.sd.forget --config run.yaml            # one or many GPUs

Stages (all by default; ``--stage data|fisher`` stops early):

1. **data** -- the frozen original pipeline draws the surrogate set (images of the surrogate
   prompts, trained under the forget prompts: eq. 1) and the replay set (the kit's replay
   prompts: eq. 2), cached and resumable (:mod:`sa_kit.sd.dataset`).
2. **fisher** -- the UNet's diagonal Fisher on the replay set (eq. 3), sharded over processes,
   cached as safetensors; or ``fisher_path`` to load a precomputed one.
3. **train** -- Adam on :func:`sa_kit.objective.sa_loss` over the parameters chosen by
   ``train_method`` (``full``, ``xattn``, ``noxattn``), with mixed precision, gradient
   checkpointing, checkpoints every ``checkpoint_every`` steps and exact resume; the result is
   saved as a diffusers pipeline folder ``output_dir/pipeline``.

Every step draws its batches and noise from a generator seeded by ``(seed, step, process)``,
so a resumed run continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from sa_kit.fisher import ESTIMATORS
from sa_kit.forget import NonFiniteLossError, check_positive_int
from sa_kit.io import config_hash, save_json
from sa_kit.objective import check_weight, sa_loss
from sa_kit.sd.adapter import TRAIN_METHODS, SDAdapter, select_parameters
from sa_kit.sd.dataset import LatentDataset, build_dataset, encode_image_folder
from sa_kit.sd.fisher import load_unet_fisher, save_unet_fisher, unet_fisher
from sa_kit.sd.pipeline import load_pipeline
from sa_kit.sd.prompts import check_mapping, mapping_pairs, replay_prompts, surrogate_for

STAGES = ("data", "fisher", "train")
PRECISIONS = ("no", "fp16", "bf16")


@dataclasses.dataclass
class SDForgetConfig:
    """Settings of one SD forgetting run (the config file's keys). Paper defaults.

    ``forget_prompt`` -> ``surrogate_prompt`` is the mapping (eq. 1); ``lmbda``/``gamma`` weigh
    eq. 3/2; ``num_surrogate``/``num_replay`` size the generated sets (paper: 1000 surrogate
    images, ~5000 Fisher prompts).
    """

    output_dir: str
    model: str = "CompVis/stable-diffusion-v1-4"
    forget_prompt: str = "brad pitt"
    surrogate_prompt: str | None = None
    surrogate_image_dir: str | None = None  # your own surrogate images instead of generated
    train_method: str = "full"
    lmbda: float = 50.0
    gamma: float = 1.0
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-5
    grad_clip: float | None = 1.0
    num_surrogate: int = 1000
    num_replay: int = 5000
    fisher_path: str | None = None
    data_dir: str | None = None  # generated sets + cached Fisher (default: output_dir/data)
    fisher_batch_size: int = 8
    fisher_estimator: str = "per_sample"  # measured faster than vmap on conv-heavy UNets (CPU)
    gen_steps: int = 50
    gen_batch_size: int = 8
    guidance_scale: float = 7.5
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_method not in TRAIN_METHODS:
            raise ValueError(f"train_method must be one of {TRAIN_METHODS}, "
                             f"got {self.train_method!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {PRECISIONS}, "
                             f"got {self.mixed_precision!r}")
        if self.fisher_estimator not in ESTIMATORS:
            raise ValueError(f"fisher_estimator must be one of {sorted(ESTIMATORS)}, "
                             f"got {self.fisher_estimator!r}")
        self.surrogate_prompt = self.surrogate_prompt or surrogate_for(self.forget_prompt)
        check_mapping(self.forget_prompt, self.surrogate_prompt)
        self.lmbda, self.gamma = check_weight("lmbda", self.lmbda), check_weight("gamma",
                                                                                self.gamma)
        for name in ("steps", "batch_size", "num_surrogate", "num_replay", "gen_steps",
                     "gen_batch_size", "fisher_batch_size", "checkpoint_every",
                     "keep_checkpoints"):
            check_positive_int(name, getattr(self, name))

    def run_key(self) -> str:
        """Hash of what makes a checkpoint resumable (everything but length and bookkeeping)."""
        skip = {"steps", "checkpoint_every", "keep_checkpoints", "output_dir", "data_dir"}
        return config_hash({k: v for k, v in dataclasses.asdict(self).items() if k not in skip})


def load_config(path: str | os.PathLike, **overrides: Any) -> SDForgetConfig:
    """Read a JSON or YAML config file into :class:`SDForgetConfig` (unknown keys: ValueError)."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml
        raw = yaml.safe_load(text) or {}
    else:
        raw = json.loads(text)
    raw.update(overrides)
    known = {f.name for f in dataclasses.fields(SDForgetConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(known)}")
    return SDForgetConfig(**raw)


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
    surr_dir = data_root(cfg) / "surrogate-{}".format(
        _made_by(cfg, "surrogate_prompt", "num_surrogate", "surrogate_image_dir"))
    replay_dir = data_root(cfg) / f"replay-{_made_by(cfg, 'num_replay')}"
    pairs = mapping_pairs(cfg.forget_prompt, cfg.surrogate_prompt, cfg.num_surrogate, cfg.seed)
    replay = replay_prompts(cfg.num_replay, cfg.seed, exclude=[cfg.forget_prompt])
    gen = dict(seed=cfg.seed, batch_size=cfg.gen_batch_size, guidance_scale=cfg.guidance_scale,
               num_inference_steps=cfg.gen_steps, progress=accelerator.is_main_process)
    if accelerator.is_main_process:
        if cfg.surrogate_image_dir:  # your own surrogate images, under the forget prompts
            encode_image_folder(pipe, cfg.surrogate_image_dir, surr_dir,
                                train_prompts=[f for f, _ in pairs])
        else:
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
    made_by = _made_by(cfg, "num_replay", "train_method", "fisher_estimator")
    path = Path(cfg.fisher_path or data_root(cfg) / f"fisher-{made_by}.safetensors")
    if path.exists():
        return load_unet_fisher(path, adapter)
    if cfg.fisher_path:
        raise ValueError(f"fisher_path {cfg.fisher_path} does not exist")
    fisher = unet_fisher(adapter, replay.latents, replay.prompts, seed=cfg.seed,
                         batch_size=cfg.fisher_batch_size, estimator=cfg.fisher_estimator,
                         accelerator=accelerator, progress=accelerator.is_main_process)
    if accelerator.is_main_process:
        save_unet_fisher(path, fisher, adapter, {"train_method": cfg.train_method,
                                                 "num_items": len(replay)})
    accelerator.wait_for_everyone()
    return fisher


class _Trainee:
    """The prepared (possibly DDP-wrapped) adapter seen through ``ForgettableModel``.

    ``neg_elbo`` goes through the wrapper's forward (so gradients are synchronised);
    ``named_parameters`` are the unwrapped adapter's, so ``ewc_penalty`` matches the Fisher.
    """

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


def _latest_checkpoint(ckpt_root: Path, key: str) -> tuple[Path | None, dict[str, Any]]:
    """The newest complete checkpoint of this run (``state.json`` is written last)."""
    done = sorted((p for p in ckpt_root.glob("step-*") if (p / "state.json").exists()),
                  key=lambda p: int(p.name.split("-")[1]))
    if not done:
        return None, {}
    state = json.loads((done[-1] / "state.json").read_text())
    if state.get("run_key") != key:
        raise ValueError(f"checkpoints in {ckpt_root} come from a run with other settings; "
                         "use another output_dir or delete them")
    return done[-1], state


def _save_checkpoint(accelerator: Any, ckpt_root: Path, step: int, history: dict,
                     key: str, keep: int) -> None:
    folder = ckpt_root / f"step-{step}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        save_json(folder / "state.json", {"step": step, "history": history, "run_key": key})
        old = sorted((p for p in ckpt_root.glob("step-*")), key=lambda p: int(p.name[5:]))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()


def _step_batches(cfg: SDForgetConfig, step: int, rank: int, surrogate: LatentDataset,
                  replay: LatentDataset, device: torch.device) -> tuple[Any, Any]:
    """The batches of ``step`` on process ``rank``; seeds the noise too (exact resume)."""
    g = torch.Generator().manual_seed(int(config_hash({"s": cfg.seed, "t": step, "r": rank}),
                                          16) % (2 ** 63))
    torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=g)))  # draw_noise's (t, eps)
    x_f, c_f = surrogate.sample(cfg.batch_size, g)
    batch_r = None
    if cfg.gamma > 0:
        x_r, c_r = replay.sample(cfg.batch_size, g)
        batch_r = (x_r.to(device), c_r)
    return (x_f.to(device), c_f), batch_r


def _prepare(cfg: SDForgetConfig, adapter: SDAdapter, fisher: dict[str, torch.Tensor] | None,
             accelerator: Any) -> tuple[Any, Any, list, dict, dict | None]:
    """Freeze by ``train_method``, keep theta*, build Adam and hand both to accelerate."""
    select_parameters(adapter.unet, cfg.train_method)
    if cfg.gradient_checkpointing:
        adapter.unet.enable_gradient_checkpointing()
    params = [p for p in adapter.parameters() if p.requires_grad]
    theta_star = {k: p.detach().clone().float() for k, p in adapter.named_parameters()
                  if p.requires_grad}                                   # theta* of eq. 3
    if fisher is not None:
        fisher = {k: fisher[k] for k in theta_star}
    wrapped, opt = accelerator.prepare(adapter, torch.optim.Adam(params, lr=cfg.lr))
    return wrapped, opt, params, theta_star, fisher


def _resume(cfg: SDForgetConfig, accelerator: Any) -> tuple[int, dict[str, list[float]]]:
    """Load the newest checkpoint of this run, if any; returns ``(step, history)``."""
    last, state = _latest_checkpoint(Path(cfg.output_dir) / "checkpoints", cfg.run_key())
    history = state.get("history") or {k: [] for k in ("step", "loss", "surrogate", "replay",
                                                       "ewc", "seconds")}
    if last is not None:
        accelerator.load_state(str(last))       # weights, Adam moments, RNG states
        accelerator.print(f"resumed from {last} (step {state['step']})")
    return int(state.get("step", 0)), history


def train(cfg: SDForgetConfig, adapter: SDAdapter, surrogate: LatentDataset,
          replay: LatentDataset, fisher: dict[str, torch.Tensor] | None, accelerator: Any,
          progress: bool = True) -> dict[str, list[float]]:
    """Stage 3: minimise the SA loss (eq. 1-3) with Adam; checkpoints and exact resume.

    Returns:
        The history: ``step``, ``loss``, ``surrogate``, ``replay``, ``ewc``, ``seconds``.
    """
    from tqdm.auto import tqdm
    wrapped, opt, params, theta_star, fisher = _prepare(cfg, adapter, fisher, accelerator)
    model = _Trainee(wrapped, adapter)
    start, history = _resume(cfg, accelerator)
    wrapped.train()
    t0 = time.perf_counter() - (history["seconds"][-1] if history["seconds"] else 0.0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="forgetting",
               disable=not (progress and accelerator.is_main_process))
    for step in bar:
        surr, rep = _step_batches(cfg, step, accelerator.process_index, surrogate, replay,
                                  accelerator.device)
        terms = sa_loss(model, surr, rep, fisher, theta_star, cfg.lmbda, cfg.gamma)
        if not torch.isfinite(terms["loss"]):
            raise NonFiniteLossError(f"the SA loss became {terms['loss'].item()} at step "
                                     f"{step}; try a smaller lr or lmbda")
        accelerator.backward(terms["loss"])
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for k in ("loss", "surrogate", "replay", "ewc"):
            history[k].append(float(accelerator.reduce(terms[k].detach().float(), "mean")))
        history["step"].append(step + 1)
        history["seconds"].append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", refresh=False)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(accelerator, Path(cfg.output_dir) / "checkpoints", step + 1,
                             history, cfg.run_key(), cfg.keep_checkpoints)
    bar.close()
    wrapped.eval()
    accelerator.print(f"trained {len(params)} parameter tensors ({cfg.train_method})")
    return history


def save_result(cfg: SDForgetConfig, pipe: Any, adapter: SDAdapter, accelerator: Any,
                history: dict[str, list[float]]) -> Path:
    """Save the forgetful pipeline (diffusers folder) and the history, on process 0."""
    out = Path(cfg.output_dir) / "pipeline"
    if accelerator.is_main_process:
        pipe.unet = accelerator.unwrap_model(adapter).unet
        pipe.save_pretrained(str(out), safe_serialization=True)
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
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    accelerator = make_accelerator(cfg)
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


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sa_kit.sd.forget --config FILE [--stage data|fisher|train] [key=value ...]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a JSON or YAML file of SDForgetConfig keys")
    ap.add_argument("--stage", default="train", choices=STAGES, help="stop after this stage")
    ap.add_argument("overrides", nargs="*", help="key=value settings (JSON values)")
    a = ap.parse_args(argv)
    overrides = {}
    for item in a.overrides:
        k, _, v = item.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    run(load_config(a.config, **overrides), a.stage)


if __name__ == "__main__":
    main()
