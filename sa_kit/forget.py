"""The forgetting loop: minimise the SA objective (:func:`sa_kit.objective.sa_loss`).

:func:`forget` is model-agnostic: it takes a surrogate and a replay batch source and trains the
model with Adam, showing a progress bar, calling callbacks, returning the history of every loss
term, and saving checkpoints from which an interrupted run resumes exactly (weights, optimiser,
random state and history). :func:`forget_class` builds the surrogate and replay for a
class-conditional model and calls it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sa_kit.fisher import check_fisher
from sa_kit.io import config_hash, load_tensors, save_tensors
from sa_kit.mappings import make_mapping
from sa_kit.objective import check_weight, sa_loss
from sa_kit.replay import GenerativeReplay, frozen_copy

History = dict[str, list[float]]
Callback = Callable[[int, History, nn.Module], Any]
CHECKPOINT = "forget_checkpoint.safetensors"


class BatchSource(Protocol):
    def sample(self, batch_size: int) -> tuple[Any, Any]: ...


class NonFiniteLossError(ValueError):
    """The loss became NaN/inf; the model keeps the weights of the last good step.

    ``.history`` holds the loss history up to that step.
    """

    history: History = {}


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int > 0, or a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     theta_star: Mapping[str, Tensor], step: int, history: History,
                     key: str) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"theta_star.{k}": v for k, v in theta_star.items()})
    opt_state = opt.state_dict()
    for i, state in opt_state["state"].items():
        tensors.update({f"optim.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_tensors(path, tensors, {"kind": "forget_checkpoint", "config_hash": key, "step": step,
                                 "history": history,
                                 "param_groups": opt_state["param_groups"]})


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, key: str
                     ) -> tuple[dict[str, Tensor], int, History]:
    device = next(model.parameters()).device
    tensors, meta = load_tensors(path)
    if meta.get("config_hash") != key:
        raise ValueError(f"checkpoint {path} was made by another forgetting run "
                         "(different settings); delete it or use another checkpoint_dir")
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items()  # noqa: E731
                           if k.startswith(prefix)}
    model.load_state_dict(part("model."))
    theta_star = {k: v.to(device) for k, v in part("theta_star.").items()}
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in part("optim.").items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v.to(device) if v.dim() else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return theta_star, int(meta["step"]), meta["history"]


def forget(model: nn.Module, surrogate: BatchSource, replay: BatchSource | None,
           fisher: Mapping[str, Tensor] | None, *, lmbda: float, gamma: float, steps: int,
           batch_size: int, lr: float = 1e-4, grad_clip: float | None = None,
           callbacks: Sequence[Callback] = (), checkpoint_dir: str | Path | None = None,
           checkpoint_every: int = 200, run_config: Mapping[str, Any] | None = None,
           progress: bool = True) -> History:
    """Train ``model`` in place on the SA objective; returns the history of each term.

    Args:
        model: a :class:`~sa_kit.objective.ForgettableModel` at theta* (the original weights).
        surrogate: batches ``(x, c_f)`` of the surrogate q(x | c_f) (term 1).
        replay: batches of remembered concepts from the frozen original (term 2), or None.
        fisher: diagonal Fisher at theta* (term 3); required when ``lmbda > 0``.
        lmbda, gamma: EWC and replay weights (>= 0).
        steps, batch_size, lr, grad_clip: optimisation settings (Adam).
        callbacks: ``f(step, history, model)`` called after every step.
        checkpoint_dir: if set, a checkpoint is written there every ``checkpoint_every`` steps
            and at the end, and a run started with an existing checkpoint resumes from it.
        run_config: what identifies this run (mapping, seed, ...); a checkpoint made with
            other settings is refused rather than silently resumed.

    Raises:
        ValueError/TypeError: bad settings; :class:`NonFiniteLossError` if the loss turns
        NaN/inf (the model keeps the weights of the last good step).
    """
    lmbda, gamma = check_weight("lmbda", lmbda), check_weight("gamma", gamma)
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    check_positive_int("checkpoint_every", checkpoint_every)
    if lmbda > 0:
        if fisher is None:
            raise ValueError("lmbda > 0 needs a fisher (or set lmbda=0 to drop the EWC term)")
        check_fisher(fisher, model)
    params = [p for p in model.parameters() if p.requires_grad]
    theta_star = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(params, lr=lr)
    history: History = {"step": [], "loss": [], "surrogate": [], "replay": [], "ewc": [],
                        "seconds": []}
    key = config_hash({"lmbda": lmbda, "gamma": gamma, "steps": steps, "batch_size": batch_size,
                       "lr": lr, "grad_clip": grad_clip, **dict(run_config or {})})
    start = 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists():
        theta_star, start, history = _load_checkpoint(ckpt, model, opt, key)
    model.train()
    t0 = time.perf_counter() - (history["seconds"][-1] if history["seconds"] else 0.0)
    bar = tqdm(range(start, steps), desc="forgetting", disable=not progress,
               initial=start, total=steps)
    for step in bar:
        terms = sa_loss(model, surrogate.sample(batch_size),
                        replay.sample(batch_size) if replay is not None and gamma > 0 else None,
                        fisher, theta_star, lmbda, gamma)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
        if not (torch.isfinite(terms["loss"]) and torch.isfinite(norm)):
            bar.close()
            model.eval()
            error = NonFiniteLossError(
                f"the SA loss became {terms['loss'].item()} at step {step}; stopped, and the "
                "model keeps the weights of the last good step. Try a smaller lr or lmbda, or "
                "a grad_clip.")
            error.history = history                  # what happened up to the last good step
            raise error
        opt.step()
        for k in ("loss", "surrogate", "replay", "ewc"):
            history[k].append(float(terms[k].detach()))
        history["step"].append(step + 1)
        history["seconds"].append(time.perf_counter() - t0)
        bar.set_postfix(loss=f"{history['loss'][-1]:.1f}", refresh=False)
        for cb in callbacks:
            cb(step + 1, history, model)
        if ckpt is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            _save_checkpoint(ckpt, model, opt, theta_star, step + 1, history, key)
    bar.close()
    model.eval()
    return history


def check_class(name: str, value: Any, num_classes: int) -> int:
    """``value`` as a class index in ``0..num_classes-1``, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int class index, got {type(value).__name__}")
    if not 0 <= value < num_classes:
        raise ValueError(f"{name} must be in 0..{num_classes - 1}, got {value}")
    return value


def forget_class(model: nn.Module, forget_class: int, *, fisher: Mapping[str, Tensor] | None,
                 mapping: Any = "noise", lmbda: float = 100.0, gamma: float = 1.0,
                 steps: int = 1000, batch_size: int = 256, lr: float = 1e-4,
                 replay_buffer: int | None = None, **kwargs: Any) -> History:
    """Make a class-conditional model forget class ``forget_class`` (c_f).

    Builds the surrogate from ``mapping`` (see :func:`sa_kit.mappings.make_mapping`) and the
    generative replay from a frozen copy of ``model`` over every other class, then calls
    :func:`forget`. ``replay_buffer`` pre-draws that many frozen-model samples (for slow
    samplers). Other keyword arguments go to :func:`forget`.
    """
    num_classes = int(model.num_classes)
    gamma = check_weight("gamma", gamma)
    forget_class = check_class("forget_class", forget_class, num_classes)
    frozen = frozen_copy(model)
    surrogate = make_mapping(mapping, forget_class, frozen, num_classes, replay_buffer)
    replay = GenerativeReplay(frozen, num_classes, forget_class, replay_buffer) \
        if gamma > 0 else None
    label = mapping if isinstance(mapping, (int, str)) else type(mapping).__name__
    run_config = {"forget_class": forget_class, "mapping": label,
                  **dict(kwargs.pop("run_config", None) or {})}
    return forget(model, surrogate, replay, fisher, lmbda=lmbda, gamma=gamma, steps=steps,
                  batch_size=batch_size, lr=lr, run_config=run_config, **kwargs)


class _Negated(nn.Module):
    """A model whose "negative ELBO" is the ELBO: minimising it *lowers* the likelihood."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def neg_elbo(self, x: Any, c: Any, noise: Any = None) -> Tensor:
        return -self.model.neg_elbo(x, c, noise)


def naive_forget(model: nn.Module, forget_class: int, *, steps: int, batch_size: int = 256,
                 lr: float = 1e-4, grad_clip: float | None = 10.0, **kwargs: Any) -> History:
    """The "naive" ablation: minimise log p(x | theta, c_f) on samples of c_f, nothing else.

    No surrogate, no replay, no EWC -- the unbounded objective that SA replaces with eq. (1).
    The samples of c_f come from a frozen copy of the original model (no real data needed).
    """
    from sa_kit.replay import ModelSamples

    forget_class = check_class("forget_class", forget_class, int(model.num_classes))
    forgotten = ModelSamples(frozen_copy(model), [forget_class])
    return forget(_Negated(model), forgotten, None, None, lmbda=0.0, gamma=0.0, steps=steps,
                  batch_size=batch_size, lr=lr, grad_clip=grad_clip,
                  run_config={"naive": forget_class}, **kwargs)
