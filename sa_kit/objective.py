"""The Selective Amnesia objective (Heng & Soh 2023, eq. 1-3 of DESIGN.md).

    L(theta) = E_{c~p_f, x~q(x|c)}   [-log p(x|theta,c)]                 (1) surrogate term
             + gamma * E_{c~p_r, x~p(x|theta*,c)} [-log p(x|theta,c)]    (2) generative replay
             + lambda * sum_i F_i / 2 * (theta_i - theta*_i)^2           (3) EWC penalty

``-log p`` is replaced by each model's negative ELBO. The code here knows nothing about VAEs,
DDPMs or Stable Diffusion: a model takes part through :class:`ForgettableModel`.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Batch = tuple[Any, Any]  # (x, c): data and condition (class labels, prompts, ...)


@runtime_checkable
class ForgettableModel(Protocol):
    """What a generative model needs to offer to be made to forget.

    ``neg_elbo(x, c, noise=None)`` returns one negative ELBO per sample, shape ``(B,)``; its
    randomness (the VAE's epsilon, the DDPM's timestep and noise) is drawn by
    ``draw_noise(x)`` as a tuple of tensors with batch dimension first, so that a per-sample
    computation can reproduce a batched one exactly. ``sample(c)`` draws x ~ p(x | theta, c).
    """

    def neg_elbo(self, x: Tensor, c: Any, noise: tuple[Tensor, ...] | None = None) -> Tensor: ...

    def draw_noise(self, x: Tensor) -> tuple[Tensor, ...]: ...

    def sample(self, c: Any) -> Tensor: ...


def check_weight(name: str, value: float) -> float:
    """Validate a loss weight such as ``lmbda`` or ``gamma``: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {type(value).__name__}")
    if not (value >= 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def ewc_penalty(model: nn.Module, fisher: Mapping[str, Tensor],
                theta_star: Mapping[str, Tensor]) -> Tensor:
    """Eq. (3) without lambda: ``sum_i F_i / 2 * (theta_i - theta*_i)^2``.

    Its gradient is ``F * (theta - theta*)``; it is zero at ``theta*``. Parameters missing from
    ``fisher`` are not penalised (e.g. frozen ones).
    """
    total = None
    for name, p in model.named_parameters():
        if name in fisher:
            term = (fisher[name] * (p - theta_star[name]) ** 2).sum() / 2
            total = term if total is None else total + term
    if total is None:
        raise ValueError("fisher shares no parameter names with the model")
    return total


def sa_loss(model: ForgettableModel, surrogate: Batch, replay: Batch | None,
            fisher: Mapping[str, Tensor] | None, theta_star: Mapping[str, Tensor] | None,
            lmbda: float, gamma: float) -> dict[str, Tensor]:
    """The SA loss for one step; returns every term so that they can be plotted.

    As in the original code, terms (1) and (2) are the negative log-likelihood of the whole
    batch (a sum over its samples), so the published lambda values carry over; the EWC term
    keeps the 1/2 of eq. (3), so lambda here equals twice the original code's lambda.

    Args:
        model: the model being trained (theta).
        surrogate: a batch ``(x, c_f)`` with x ~ q(x | c_f), the surrogate (eq. 1).
        replay: a batch ``(x, c)`` with x ~ p(x | theta*, c) for remembered c (eq. 2), or None.
        fisher, theta_star: the diagonal Fisher F and the original weights (eq. 3), or None.
        lmbda, gamma: the EWC and replay weights.

    Returns:
        ``{"loss", "surrogate", "replay", "ewc"}``: ``loss`` is the total to minimise; the
        others, detached for plots, are the per-sample means of terms (1) and (2) (nats per
        sample) and the unweighted penalty (3).
    """
    x_f, c_f = surrogate
    surrogate_nll = model.neg_elbo(x_f, c_f)                                 # (1)
    loss = surrogate_nll.sum()
    replay_nll = torch.zeros(1, device=loss.device)
    if replay is not None and gamma > 0:
        x_r, c_r = replay
        replay_nll = model.neg_elbo(x_r, c_r)                                # (2)
        loss = loss + gamma * replay_nll.sum()
    ewc_term = torch.zeros((), device=loss.device)
    if fisher is not None and lmbda > 0:
        ewc_term = ewc_penalty(model, fisher, theta_star)                    # (3)
        loss = loss + lmbda * ewc_term
    return {"loss": loss, "surrogate": surrogate_nll.detach().mean(),
            "replay": replay_nll.detach().mean(), "ewc": ewc_term.detach()}
