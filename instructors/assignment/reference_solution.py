"""Reference solution of the assignment (instructors only): plain PyTorch, no sa_kit helpers.

``tests/test_assignment.py`` runs the autograder on this file (it must pass) and on broken
variants of it (they must fail).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor


def per_sample_fisher(model: Any, x: Tensor, c: Tensor, noise: tuple[Tensor, ...]
                      ) -> dict[str, Tensor]:
    """The diagonal Fisher ``F_i = mean_n (d/d theta_i  -log p(x_n | theta, c_n))^2``."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    n_samples = x.shape[0]
    for n in range(n_samples):
        one = slice(n, n + 1)
        loss = model.neg_elbo(x[one], c[one], tuple(t[one] for t in noise)).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for k, g in zip(params, grads):
            if g is not None:                  # a parameter this sample does not use: F = 0
                fisher[k] += g.detach() ** 2
    return {k: f / n_samples for k, f in fisher.items()}


def _reduce(model: Any, nll: Tensor) -> Tensor:
    return nll.sum() if model.loss_reduction == "sum" else nll.mean()


def sa_loss(model: Any, surrogate: tuple[Tensor, Tensor], replay: tuple[Tensor, Tensor] | None,
            fisher: Mapping[str, Tensor] | None, theta_star: Mapping[str, Tensor] | None,
            lmbda: float, gamma: float) -> Tensor:
    """The SA loss: surrogate term + gamma * replay term + lmbda * EWC penalty."""
    x_f, c_f = surrogate
    loss = _reduce(model, model.neg_elbo(x_f, c_f))                         # (1)
    if replay is not None and gamma > 0:
        x_r, c_r = replay
        loss = loss + gamma * _reduce(model, model.neg_elbo(x_r, c_r))      # (2)
    if fisher is not None and lmbda > 0:
        penalty = sum((fisher[k] * (p - theta_star[k]) ** 2).sum()
                      for k, p in model.named_parameters() if k in fisher)
        loss = loss + lmbda * penalty                                       # (3)
    return loss
