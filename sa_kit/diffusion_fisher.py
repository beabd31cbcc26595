"""The diagonal Fisher of a diffusion model -- one definition, the paper's, for the DDPM and SD.

The official code (``ddpm/runners/diffusion.py: save_fim``; ``sd/ldm/models/diffusion/
ddpm_fim.py: training_step``) takes each generated sample x_n of condition c_n, sums its
diffusion loss over *all* T = 1000 timesteps (a fresh eps for each), takes the gradient of that
sum, and squares it:

    F_i = 1/N sum_n ( d/d theta_i  sum_{t=0}^{T-1} l(x_n, c_n, t, eps_{n,t}) )^2            (*)

with ``l`` the model's per-sample loss at one timestep -- the adapter's ``neg_elbo(x, c, (t,
eps))`` (summed over pixels for the DDPM, averaged over latent dimensions for Stable Diffusion).
That is the Fisher of the ELBO summed over timesteps, the quantity the published lambdas were
tuned with. :func:`diffusion_fisher` computes it:

* ``num_timesteps=None`` -- exactly (*): T loss evaluations per sample, in chunks.
* ``num_timesteps=K`` -- the sum over t estimated from K *stratified* timesteps (one uniform draw
  in each of K equal strata of 0..T-1, each weighted by its stratum's size): an unbiased estimate
  g_hat of the gradient of the sum at ~K/T of the cost. Squaring it is biased upward,
  E[g_hat^2] = g^2 + Var(g_hat), so the default ``estimator="product"`` multiplies two independent
  stratified estimates of K/2 timesteps each, E[g_hat1 g_hat2] = g^2: unbiased (the mean over
  samples is clamped at 0). ``estimator="square"`` squares one estimate of K timesteps.
  ``benchmarks/ddpm_fisher.py`` prints speed, error, rank correlation and bias of both.

Each item's timesteps and noise come from a generator seeded by ``(seed, item id)``, so the result
does not depend on batching or on how many processes share the items (Stable Diffusion with
``accelerate``). The model is put in eval mode (dropout off), as the official DDPM code does.

Departure, said here: the official DDPM code also replaces 10% of the labels inside (*) by the
null class (its loss function's default label dropout); the kit keeps the true labels -- the
null class is not a concept being remembered, and forgetting never trains it.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sa_kit.checks import check_choice, check_positive_int
from sa_kit.fisher import Fisher, trainable

ESTIMATORS = ("product", "square")

__all__ = ["diffusion_fisher", "stratified_timesteps", "fisher_agreement", "ESTIMATORS"]


def stratified_timesteps(num_train_timesteps: int, k: int,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One timestep uniform in each of ``k`` equal strata of ``0..T-1``, and each stratum's size.

    Returns:
        ``(t, weight)``, both ``(k,)``: ``sum_j weight_j l(t_j)`` is an unbiased estimate of
        ``sum_{t<T} l(t)``; with ``k = T`` it is the sum itself.
    """
    T = num_train_timesteps
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= T:
        raise ValueError(f"num_timesteps must be an integer in 1..{T} (or None for all), got {k!r}")
    edges = torch.div(torch.arange(k + 1) * T, k, rounding_mode="floor")
    size = edges[1:] - edges[:-1]
    u = torch.rand(k, generator=generator)
    return edges[:-1] + (u * size).long().clamp(max=size - 1), size.double()


def _rows(c: Any, k: int) -> Any:
    """Condition of one item repeated ``k`` times (class labels or text hidden states)."""
    return c.expand(k, *c.shape[1:]) if isinstance(c, Tensor) else [c[0]] * k


def _grad_of_sum(model: Any, x1: Tensor, c1: Any, t: Tensor, weight: Tensor, eps: Tensor,
                 params: list[Tensor], chunk_size: int) -> list[Tensor]:
    """Gradient of ``sum_j weight_j l(x1, c1, t_j, eps_j)`` for one item, in chunks of t."""
    grads = [torch.zeros_like(p) for p in params]
    for i in range(0, len(t), chunk_size):
        tc, wc, ec = t[i:i + chunk_size], weight[i:i + chunk_size], eps[i:i + chunk_size]
        k = len(tc)
        losses = model.neg_elbo(x1.expand(k, *x1.shape[1:]), _rows(c1, k), (tc, ec))
        loss = (losses * wc.to(losses.dtype)).sum()
        for g, gi in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if gi is not None:
                g += gi.float()                        # grad of a sum = sum of chunk grads
    return grads


def _item_draws(model: Any, x1: Tensor, K: int | None, generator: torch.Generator,
                eps_table: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Timesteps, weights and noise of one item (all T timesteps when ``K`` is None)."""
    T = model.num_train_timesteps
    if K is None:
        t, w = torch.arange(T), torch.ones(T, dtype=torch.float64)
    else:
        t, w = stratified_timesteps(T, K, generator)
    if eps_table is not None:
        eps = eps_table[t]
    else:
        eps = torch.randn((len(t), *x1.shape[1:]), generator=generator)
    return t.to(x1.device), w.to(x1.device), eps.to(x1.device, x1.dtype)


def diffusion_fisher(model: Any, x: Tensor, c: Any, num_timesteps: int | None = None, *,
                     estimator: str = "product", seed: int = 0,
                     item_ids: Sequence[int] | None = None, eps: Tensor | None = None,
                     chunk_size: int = 50, clamp: bool = True, progress: bool = True) -> Fisher:
    """Eq. (*): each item's loss summed over all timesteps, its gradient squared, averaged.

    Args:
        model: a diffusion adapter: ``neg_elbo(x, c, (t, eps))`` per sample and
            ``num_train_timesteps`` (:class:`~sa_kit.models.ddpm.ClassConditionalDDPM`,
            :class:`~sa_kit.sd.adapter.SDAdapter`).
        x, c: generated samples ``(N, ...)`` and their conditions (labels or text states).
        num_timesteps: None for all T timesteps (exact), or K stratified timesteps.
        estimator: ``"product"`` (unbiased; needs K >= 2) or ``"square"`` (see module doc).
        seed, item_ids: item n's timesteps and noise come from ``(seed, item_ids[n])``
            (default ids ``0..N-1``).
        eps: optional noise table ``(N, T, ...)``: item n at timestep t uses ``eps[n, t]`` (to
            compare estimators, or an independent implementation, on the same noise).
        chunk_size: timesteps per forward/backward pass (memory vs speed).
        clamp: clamp the result at 0 (the product estimator's mean can dip below it). A caller
            that averages several calls over disjoint items (shards) passes False and clamps
            the average.

    Returns:
        ``{name: F}`` for every trainable parameter of ``model``.
    """
    check_choice("estimator", estimator, ESTIMATORS)
    check_positive_int("chunk_size", chunk_size)
    T = model.num_train_timesteps
    if num_timesteps is not None:
        stratified_timesteps(T, num_timesteps)                     # validates K
        if estimator == "product" and num_timesteps < 2:
            raise ValueError("estimator='product' needs num_timesteps >= 2 (two halves)")
    ids = list(range(len(x))) if item_ids is None else [int(i) for i in item_ids]
    if len(ids) != len(x):
        raise ValueError(f"item_ids must have one id per sample ({len(x)}), got {len(ids)}")
    if eps is not None and tuple(eps.shape) != (len(x), T, *x.shape[1:]):
        raise ValueError(f"eps must have shape (N, T, ...) = {(len(x), T, *x.shape[1:])}, "
                         f"got {tuple(eps.shape)}")
    named = trainable(model)
    params = list(named.values())
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in named.items()}
    was_training = getattr(model, "training", False)
    model.eval()
    label = "all T" if num_timesteps is None else f"{num_timesteps} stratified t"
    try:
        for n in tqdm(range(len(x)), desc=f"Fisher ({label})", disable=not progress):
            g = torch.Generator().manual_seed(seed * 1_000_003 + ids[n])
            x1, c1 = x[n:n + 1], c[n:n + 1]
            table = eps[n] if eps is not None else None
            if num_timesteps is None or estimator == "square":
                t, w, e = _item_draws(model, x1, num_timesteps, g, table)
                grads = _grad_of_sum(model, x1, c1, t, w, e, params, chunk_size)
                squares = [gi ** 2 for gi in grads]
            else:                                   # two independent halves: E[g1 g2] = g^2
                halves = []
                for k in (num_timesteps // 2, num_timesteps - num_timesteps // 2):
                    t, w, e = _item_draws(model, x1, k, g, table)
                    halves.append(_grad_of_sum(model, x1, c1, t, w, e, params, chunk_size))
                squares = [a * b for a, b in zip(*halves)]
            for k, s in zip(named, squares):
                fisher[k] += s
    finally:
        model.train(was_training)
    return {k: (f / len(x)).clamp_min(0) if clamp else f / len(x) for k, f in fisher.items()}


def fisher_agreement(estimate: Mapping[str, Tensor], reference: Mapping[str, Tensor]
                     ) -> dict[str, float]:
    """How close two Fishers are, over all their entries flattened into one vector.

    Returns:
        ``rel_error`` = ||F_est - F_ref|| / ||F_ref||; ``bias`` = (sum F_est - sum F_ref) /
        sum F_ref (the relative excess of total mass); ``spearman`` = rank correlation of the
        entries; ``top10_overlap`` = share of the reference's top-10% entries also in the
        estimate's top 10%.
    """
    a = torch.cat([estimate[k].flatten().double() for k in reference])
    b = torch.cat([reference[k].flatten().double() for k in reference])
    rank = lambda v: torch.empty_like(v).scatter_(  # noqa: E731
        0, v.argsort(), torch.arange(len(v), dtype=v.dtype))
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    k = max(1, len(b) // 10)
    top_a, top_b = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    return {"rel_error": float((a - b).norm() / b.norm()),
            "bias": float((a.sum() - b.sum()) / b.sum()),
            "spearman": float((ra * rb).sum() / (ra.norm() * rb.norm())),
            "top10_overlap": len(top_a & top_b) / k}
