"""The Selective Amnesia objective (Heng & Soh 2023, eq. 4 of the paper; eq. 1-3 of the README).

    L(theta) = E_{c~p_f, x~q(x|c)}   [-log p(x|theta,c)]                 (1) surrogate term
             + gamma * E_{c~p_r, x~p(x|theta*,c)} [-log p(x|theta,c)]    (2) generative replay
             + lambda * sum_i F_i * (theta_i - theta*_i)^2               (3) EWC penalty

``-log p`` is replaced by each model's negative ELBO. The code here knows nothing about VAEs,
DDPMs or Stable Diffusion: a model takes part through :class:`ForgettableModel`.

**Scale is part of the method.** The paper writes the penalty as ``lambda sum F/2 (...)^2``;
its official code (clear-nus/selective-amnesia), whose lambda values the paper publishes, drops
the 1/2 and sums or averages the data terms per model. The kit follows the code, so that a
published lambda means here what it meant there:

============  ==================================  ======================  =================
model         per-sample -log p (``neg_elbo``)     terms (1), (2)          Fisher F_i
============  ==================================  ======================  =================
cVAE          BCE summed over pixels + KL          summed over the batch   mean_n g_n^2
DDPM          (eps - eps_theta)^2 summed over       mean over the batch    mean_n (grad of
              pixels, one timestep                                        sum over all T)^2
Stable Diff.  (eps - eps_theta)^2 mean over         mean over the batch    as the DDPM, on
              latent dims, one timestep                                   the replay set
============  ==================================  ======================  =================

Each adapter states its reduction over the batch in ``loss_reduction``; ``tests/test_scale.py``
re-implements the official formulas and checks the ratio of penalty to data terms.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from sa_kit.checks import check_weight

Batch = tuple[Any, Any]  # (x, c): data and condition (class labels, prompts, ...)
Reduction = Literal["sum", "mean"]

__all__ = ["ForgettableModel", "ClassConditionalModel", "Batch", "reduce_batch", "ewc_penalty",
           "sa_loss", "check_weight"]


@runtime_checkable
class ForgettableModel(Protocol):
    """What a generative model needs to offer to be made to forget.

    ``neg_elbo(x, c, noise=None)`` returns one negative ELBO per sample, shape ``(B,)``, in the
    official code's per-sample scale (see the table above); its randomness (the VAE's epsilon,
    the DDPM's timestep and noise) is drawn by ``draw_noise(x)`` as a tuple of tensors with batch
    dimension first, so that a per-sample computation can reproduce a batched one exactly.
    ``sample(c)`` draws x ~ p(x | theta, c). ``loss_reduction`` says how terms (1) and (2) reduce
    a batch: ``"sum"`` (cVAE) or ``"mean"`` (diffusion models).
    """

    loss_reduction: Reduction

    def neg_elbo(self, x: Tensor, c: Any, noise: tuple[Tensor, ...] | None = None) -> Tensor: ...

    def draw_noise(self, x: Tensor) -> tuple[Tensor, ...]: ...

    def sample(self, c: Any) -> Tensor: ...


@runtime_checkable
class ClassConditionalModel(ForgettableModel, Protocol):
    """A :class:`ForgettableModel` conditioned on a class index ``c`` in ``0..num_classes-1``.

    The class-conditional tools (mappings, replay, metrics, the explorer) also read what the
    samples look like: ``data_shape`` ``(C, H, W)`` and ``data_range`` ``(low, high)``.
    """

    num_classes: int
    data_shape: tuple[int, ...]
    data_range: tuple[float, float]


def reduce_batch(model: ForgettableModel, nll: Tensor) -> Tensor:
    """Per-sample ``-log p`` of a batch reduced as the model's official code does (terms 1, 2)."""
    reduction = getattr(model, "loss_reduction", "sum")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {reduction!r}")
    return nll.sum() if reduction == "sum" else nll.mean()


def ewc_penalty(model: nn.Module, fisher: Mapping[str, Tensor],
                theta_star: Mapping[str, Tensor]) -> Tensor:
    """Eq. (3) without lambda: ``sum_i F_i (theta_i - theta*_i)^2``, as in the official code.

    (The paper's equation has ``F_i / 2``; its code -- and so every published lambda -- does not.)
    Its gradient is ``2 F (theta - theta*)``; it is zero at ``theta*``. Parameters missing from
    ``fisher`` are not penalised (e.g. frozen ones).
    """
    total = None
    for name, p in model.named_parameters():
        if name in fisher:
            term = (fisher[name] * (p - theta_star[name]) ** 2).sum()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("fisher shares no parameter names with the model")
    return total


def sa_loss(model: ForgettableModel, surrogate: Batch, replay: Batch | None,
            fisher: Mapping[str, Tensor] | None, theta_star: Mapping[str, Tensor] | None,
            lmbda: float, gamma: float, naive: bool = False) -> dict[str, Tensor]:
    """The SA loss for one step; returns every term so that they can be plotted.

    Terms (1) and (2) reduce the batch as the model's official code does (``loss_reduction``:
    a sum for the cVAE, a mean for the DDPM and Stable Diffusion) and the penalty has no 1/2,
    so the published lambda values carry over unchanged (module docstring).

    Args:
        model: the model being trained (theta).
        surrogate: a batch ``(x, c_f)`` with x ~ q(x | c_f), the surrogate (eq. 1).
        replay: a batch ``(x, c)`` with x ~ p(x | theta*, c) for remembered c (eq. 2), or None.
        fisher, theta_star: the diagonal Fisher F and the original weights (eq. 3), or None.
        lmbda, gamma: the EWC and replay weights.
        naive: the paper's "naive" objective (its eq. 3): term (1) becomes ``+log p(x | c_f)``
            on samples of c_f itself -- minimising their likelihood, which is unbounded.

    Returns:
        ``{"loss", "surrogate", "replay", "ewc"}``: ``loss`` is the total to minimise; the
        others, detached for plots, are the per-sample means of terms (1) and (2) (nats per
        sample for the cVAE, the diffusion loss for diffusion models) and the unweighted
        penalty (3).
    """
    x_f, c_f = surrogate
    surrogate_nll = model.neg_elbo(x_f, c_f)                                 # (1)
    loss = reduce_batch(model, surrogate_nll)
    loss = -loss if naive else loss
    replay_nll = torch.zeros(1, device=loss.device)
    if replay is not None and gamma > 0:
        x_r, c_r = replay
        replay_nll = model.neg_elbo(x_r, c_r)                                # (2)
        loss = loss + gamma * reduce_batch(model, replay_nll)
    ewc_term = torch.zeros((), device=loss.device)
    if fisher is not None and lmbda > 0:
        ewc_term = ewc_penalty(model, fisher, theta_star)                    # (3)
        loss = loss + lmbda * ewc_term
    return {"loss": loss, "surrogate": surrogate_nll.detach().mean(),
            "replay": replay_nll.detach().mean(), "ewc": ewc_term.detach()}
