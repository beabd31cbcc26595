"""The one small training helper: progress bar, checkpoints, exact resume, safe interruption.

Every model the kit trains from scratch (the cVAE, the classifiers, the DDPM) goes through
:func:`train_loop`; the forgetting loop (:func:`sa_kit.forget.forget`) stays explicit because it
is the lesson, but shares the checkpoint format and the interruption handling defined here:

* a checkpoint holds the weights, the optimiser state, the random state and the history, in one
  safetensors file written atomically, tagged with a hash of the run's settings (a checkpoint
  from other settings is refused, never silently resumed);
* Ctrl-C, Jupyter's "interrupt kernel" (SIGINT) and a scheduler's SIGTERM do not stop a step
  half-way: the loop finishes the step it is in, writes a checkpoint of it, says how to resume,
  and raises :class:`KeyboardInterrupt`. A second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sa_kit.checks import check_positive_int
from sa_kit.io import config_hash, load_tensors, save_tensors

History = dict[str, list[float]]
CHECKPOINT = "train_checkpoint.safetensors"

__all__ = ["train_loop", "save_checkpoint", "load_checkpoint", "GracefulStop", "History"]


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                    history: Mapping[str, Any], key: str,
                    extra: Mapping[str, Tensor] | None = None,
                    trainable_only: bool = False) -> None:
    """Weights, optimiser state, RNG state and history of ``step``, atomically (safetensors).

    ``trainable_only`` keeps only the parameters that train (e.g. Stable Diffusion's
    cross-attention under ``xattn``): the rest is the original model, loaded anyway.
    """
    weights = {k: p for k, p in model.named_parameters() if p.requires_grad} \
        if trainable_only else model.state_dict()
    tensors = {f"model.{k}": v for k, v in weights.items()}
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    opt_state = opt.state_dict()
    for i, state in opt_state["state"].items():
        tensors.update({f"optim.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_tensors(path, tensors, {"kind": "checkpoint", "config_hash": key, "step": step,
                                 "history": dict(history), "trainable_only": trainable_only,
                                 "param_groups": opt_state["param_groups"]})


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, key: str
                    ) -> tuple[dict[str, Tensor], int, History]:
    """Restore what :func:`save_checkpoint` wrote; returns ``(extra, step, history)``.

    Raises:
        ValueError: the checkpoint was made by a run with other settings, or is unreadable.
    """
    device = next(model.parameters()).device
    tensors, meta = load_tensors(path)
    if meta.get("config_hash") != key:
        raise ValueError(f"checkpoint {path} was made by a run with other settings; delete it "
                         "or use another checkpoint folder")
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items()  # noqa: E731
                           if k.startswith(prefix)}
    loaded = model.load_state_dict(part("model."), strict=not meta.get("trainable_only", False))
    if loaded.unexpected_keys:
        raise ValueError(f"checkpoint {path} holds weights this model does not have: "
                         f"{loaded.unexpected_keys[:5]}")
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in part("optim.").items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v.to(device) if v.dim() else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    extra = {k: v.to(device) for k, v in part("extra.").items()}
    return extra, int(meta["step"]), meta["history"]


class GracefulStop:
    """Within ``with GracefulStop() as stop:``, SIGINT/SIGTERM set ``stop.requested`` instead of
    interrupting; the loop checks it between steps. A second signal interrupts at once.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:             # second signal: stop now
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: finishing this step and saving a checkpoint "
              "(press Ctrl-C again to stop at once)", flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def interrupted(stop: GracefulStop, where: str, step: int, saved: Path | None) -> KeyboardInterrupt:
    """The exception to raise after a requested stop, saying what was kept and how to resume."""
    if saved is not None:
        msg = (f"{where} stopped by {stop.requested} after step {step}; checkpoint saved in "
               f"{saved}. Run the same command again to resume from step {step}.")
    else:
        msg = (f"{where} stopped by {stop.requested} after step {step}; no checkpoint folder "
               "was given, so the run must start again.")
    print(msg, flush=True)
    return KeyboardInterrupt(msg)


def train_loop(model: nn.Module, batch_loss: Callable[[int], Tensor], *, steps: int, lr: float,
               desc: str, run_key: Mapping[str, Any], grad_clip: float | None = None,
               after_step: Callable[[int], Any] | None = None,
               lr_decay_every: int | None = None, cosine: bool = False,
               checkpoint_dir: str | Path | None = None, checkpoint_every: int = 500,
               progress: bool = True) -> list[float]:
    """Minimise ``batch_loss(step)`` with Adam for ``steps`` steps; returns the loss per step.

    Args:
        model: trained in place (its parameters with ``requires_grad``).
        batch_loss: draws a batch and returns its scalar loss.
        steps, lr, grad_clip: optimisation settings.
        desc: the progress bar's label.
        run_key: what identifies the run (a checkpoint made with other settings is refused).
        after_step: called after every optimiser step (e.g. an EMA update).
        lr_decay_every: multiply the learning rate by 0.1 every this many steps (a step
            schedule, as the official MNIST classifier's ``StepLR``); None: constant.
        cosine: decay the learning rate from ``lr`` to 0 along a half cosine over ``steps``.
        checkpoint_dir: if set, a checkpoint is written every ``checkpoint_every`` steps, at the
            end and when the run is interrupted; a call that finds one resumes from it exactly.
    """
    steps = check_positive_int("steps", steps)
    check_positive_int("checkpoint_every", checkpoint_every)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    key = config_hash({"run": dict(run_key), "lr": lr, "grad_clip": grad_clip,
                       "decay": lr_decay_every, **({"cosine": True} if cosine else {})})
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    start, history = 0, {"loss": []}
    if ckpt is not None and ckpt.exists():
        _, start, history = load_checkpoint(ckpt, model, opt, key)
    model.train()
    bar = tqdm(range(start, steps), desc=desc, disable=not progress, initial=start, total=steps)
    with GracefulStop() as stop:
        for step in bar:
            if lr_decay_every or cosine:           # set from the step: exact after a resume
                factor = 0.1 ** (step // lr_decay_every) if lr_decay_every else \
                    0.5 * (1 + math.cos(math.pi * step / steps))
                for group in opt.param_groups:
                    group["lr"] = lr * factor
            loss = batch_loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if after_step is not None:
                after_step(step)
            history["loss"].append(loss.item())
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}", refresh=False)
            done = step + 1
            if ckpt is not None and (done % checkpoint_every == 0 or done == steps
                                     or stop.requested):
                save_checkpoint(ckpt, model, opt, done, history, key)
            if stop.requested:
                bar.close()
                raise interrupted(stop, desc, done, ckpt)
    bar.close()
    model.eval()
    return history["loss"]


@contextlib.contextmanager
def timed(times: dict[str, float], label: str) -> Iterator[None]:
    """Add the seconds the block took to ``times[label]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[label] = times.get(label, 0.0) + time.perf_counter() - start
