"""The forgetting loop: minimise the SA objective (:func:`sa_kit.objective.sa_loss`).

:func:`forget` is model-agnostic and deliberately explicit -- it is the method: each step draws
a surrogate batch (term 1) and a replay batch (term 2), adds the EWC penalty (term 3), takes an
Adam step, records every term, and calls the callbacks. It shows a progress bar, writes
checkpoints from which an interrupted run resumes exactly (weights, optimiser, random state,
theta* and history), and stops cleanly on Ctrl-C or SIGTERM after saving the last finished step.

:func:`forget_one_class` builds the surrogate and replay for a class-conditional model;
:func:`naive_forget` is the paper's "naive" ablation.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sa_kit.checks import check_class, check_positive_int, check_weight
from sa_kit.fisher import check_fisher
from sa_kit.io import config_hash
from sa_kit.mappings import make_mapping, mapping_key
from sa_kit.objective import sa_loss
from sa_kit.replay import GenerativeReplay, ModelSamples, frozen_copy
from sa_kit.train import GracefulStop, History, interrupted, load_checkpoint, save_checkpoint

Callback = Callable[[int, History, nn.Module], Any]
CHECKPOINT = "forget_checkpoint.safetensors"

__all__ = ["forget", "forget_one_class", "naive_forget", "NonFiniteLossError", "BatchSource"]


class BatchSource(Protocol):
    def sample(self, batch_size: int) -> tuple[Any, Any]: ...


class NonFiniteLossError(ValueError):
    """The loss became NaN/inf; the model keeps the weights of the last good step.

    ``.history`` holds the loss history up to that step.
    """

    history: History = {}


def forget(model: nn.Module, surrogate: BatchSource, replay: BatchSource | None,
           fisher: Mapping[str, Tensor] | None, *, lmbda: float, gamma: float, steps: int,
           batch_size: int, lr: float = 1e-4, grad_clip: float | None = None,
           naive: bool = False, callbacks: Sequence[Callback] = (),
           checkpoint_dir: str | Path | None = None, checkpoint_every: int = 200,
           run_config: Mapping[str, Any] | None = None, progress: bool = True) -> History:
    """Train ``model`` in place on the SA objective; returns the history of each term.

    Args:
        model: a :class:`~sa_kit.objective.ForgettableModel` at theta* (the original weights).
            If it has an ``update_ema()`` method (the DDPM), it is called after every step.
        surrogate: batches ``(x, c_f)`` of the surrogate q(x | c_f) (term 1).
        replay: batches of remembered concepts from the frozen original (term 2), or None.
        fisher: diagonal Fisher at theta* (term 3); required when ``lmbda > 0``.
        lmbda, gamma: EWC and replay weights (>= 0), in the official code's scale.
        steps, batch_size, lr, grad_clip: optimisation settings (Adam).
        naive: the paper's naive objective -- term (1) maximises ``-log p`` of the batches of
            ``surrogate`` (then samples of c_f itself) instead of minimising it.
        callbacks: ``f(step, history, model)`` called after every step.
        checkpoint_dir: if set, a checkpoint is written there every ``checkpoint_every`` steps,
            at the end and on interruption; a run started with a checkpoint resumes from it.
        run_config: what identifies this run (mapping, seed, ...); a checkpoint made with
            other settings is refused rather than silently resumed.

    Raises:
        ValueError/TypeError: bad settings; :class:`NonFiniteLossError` if the loss turns
        NaN/inf (the model keeps the weights of the last good step); KeyboardInterrupt after a
        requested stop (the checkpoint of the last finished step is saved first).
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
                       "lr": lr, "grad_clip": grad_clip, "naive": naive,
                       **dict(run_config or {})})
    start = 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists():
        theta_star, start, history = load_checkpoint(ckpt, model, opt, key)
    update_ema = getattr(model, "update_ema", None)
    model.train()
    t0 = time.perf_counter() - (history["seconds"][-1] if history["seconds"] else 0.0)
    bar = tqdm(range(start, steps), desc="forgetting", disable=not progress,
               initial=start, total=steps)
    with GracefulStop() as stop:
        for step in bar:
            terms = sa_loss(model, surrogate.sample(batch_size),
                            replay.sample(batch_size) if replay is not None and gamma > 0
                            else None, fisher, theta_star, lmbda, gamma, naive=naive)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
            if not (torch.isfinite(terms["loss"]) and torch.isfinite(norm)):
                bar.close()
                model.eval()
                error = NonFiniteLossError(
                    f"the SA loss became {terms['loss'].item()} at step {step}; stopped, and the "
                    "model keeps the weights of the last good step. Try a smaller lr or lmbda, "
                    "or a grad_clip.")
                error.history = history              # what happened up to the last good step
                raise error
            opt.step()
            if update_ema is not None:
                update_ema()
            for k in ("loss", "surrogate", "replay", "ewc"):
                history[k].append(float(terms[k].detach()))
            history["step"].append(step + 1)
            history["seconds"].append(time.perf_counter() - t0)
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}", refresh=False)
            for cb in callbacks:
                cb(step + 1, history, model)
            done = step + 1
            if ckpt is not None and (done % checkpoint_every == 0 or done == steps
                                     or stop.requested):
                save_checkpoint(ckpt, model, opt, done, history, key, extra=theta_star)
            if stop.requested:
                bar.close()
                model.eval()
                raise interrupted(stop, "forgetting", done, ckpt)
    bar.close()
    model.eval()
    return history


def forget_one_class(model: nn.Module, forget_class: int, *,
                     fisher: Mapping[str, Tensor] | None, mapping: Any = "noise",
                     lmbda: float = 100.0, gamma: float = 1.0, steps: int = 1000,
                     batch_size: int = 256, lr: float = 1e-4,
                     replay_buffer: int | None = None, **kwargs: Any) -> History:
    """Make a class-conditional model forget class ``forget_class`` (c_f) with SA.

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
    run_config = {"forget_class": forget_class, "mapping": mapping_key(mapping),
                  **dict(kwargs.pop("run_config", None) or {})}
    return forget(model, surrogate, replay, fisher, lmbda=lmbda, gamma=gamma, steps=steps,
                  batch_size=batch_size, lr=lr, run_config=run_config, **kwargs)


def naive_forget(model: nn.Module, forget_class: int, *, fisher: Mapping[str, Tensor] | None,
                 lmbda: float, gamma: float, steps: int, batch_size: int = 256,
                 lr: float = 1e-4, replay_buffer: int | None = None,
                 grad_clip: float | None = 10.0, **kwargs: Any) -> History:
    """The paper's "naive" ablation (its eq. 3; Figure 2's "naive" column).

    The same replay (term 2) and EWC (term 3) as SA, but term (1) *minimises* the likelihood of
    c_f on samples of c_f -- drawn from a frozen copy of the original, since no training data is
    used -- instead of maximising that of a surrogate. A likelihood has no floor, so this loss
    typically runs to -inf; :class:`NonFiniteLossError` then reports the last good step.
    """
    num_classes = int(model.num_classes)
    forget_class = check_class("forget_class", forget_class, num_classes)
    frozen = frozen_copy(model)
    forgotten = ModelSamples(frozen, [forget_class], replay_buffer)
    replay = GenerativeReplay(frozen, num_classes, forget_class, replay_buffer) \
        if check_weight("gamma", gamma) > 0 else None
    run_config = {"naive": forget_class, **dict(kwargs.pop("run_config", None) or {})}
    return forget(model, forgotten, replay, fisher, lmbda=lmbda, gamma=gamma, steps=steps,
                  batch_size=batch_size, lr=lr, grad_clip=grad_clip, naive=True,
                  run_config=run_config, **kwargs)
