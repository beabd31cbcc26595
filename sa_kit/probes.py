"""Is it really forgotten? Probes that try to bring a forgotten concept c_f back (chapter 4).

A forgetting method passes the plain test when the evaluator no longer sees c_f in samples drawn
for c_f. The probes here ask harder questions, each of a model that implements
:class:`~sa_kit.objective.ForgettableModel` (``neg_elbo(x, c, noise)``, ``draw_noise(x)``):

1. **Condition inversion** -- is there *another* condition that draws c_f?
   :func:`invert_relaxed_condition` (cVAE): ``max_{a, z} E log p_clf(c_f | decode(z, softmax(a)))``
   through the evaluator's gradient. :func:`learn_embedding_row` (DDPM class embedding; a new
   text token for the text-to-image model, as *Concept Inversion* / textual inversion do):
   ``min_e E_{x ~ real c_f} -ELBO(x, e)`` with every weight frozen but the one embedding row e.
2. **Relearning** -- :func:`relearn`: fine-tune on k real images of c_f with the model's own
   loss and count the steps until ``P(c_f) >= 0.5`` on its own label.
3. **Likelihood** -- :func:`sample_nll`: the negative ELBO (cVAE: nats; diffusion: the
   epsilon-loss) of real held-out images, with the same noise draws before and after.
4. **Guidance** -- :func:`guidance_sweep` (DDPM): how often c_f appears with the label c_f at
   weak guidance, and among unconditional (w = 0) samples -- the null class was never told to
   forget.

Every probe returns plain numbers; :func:`recovery_rate` is the share of samples the evaluator
calls c_f with probability >= 0.5.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from sa_kit.checks import check_positive_int

__all__ = ["recovery_rate", "invert_relaxed_condition", "learn_embedding_row", "relearn",
           "sample_nll", "guidance_sweep", "take"]


def recovery_rate(p_forget: Tensor, threshold: float = 0.5) -> float:
    """Share of samples whose evaluator probability of c_f is at least ``threshold``."""
    return float((torch.as_tensor(p_forget) >= threshold).float().mean())


def take(c: Any, idx: Tensor) -> Any:
    """Rows ``idx`` of a condition: a tensor of labels/embeddings or a list of prompts."""
    return c[idx] if isinstance(c, Tensor) else [c[int(i)] for i in idx]


# ---- 1. condition inversion -------------------------------------------------------------------
def invert_relaxed_condition(model: nn.Module, classifier: nn.Module, forget_class: int, *,
                             samples: int = 64, steps: int = 200, lr: float = 0.05,
                             optimise_z: bool = True, seed: int = 0) -> dict[str, Any]:
    """Search a relaxed one-hot condition (and latents) that make the cVAE draw c_f.

    ``a`` (logits over the classes, shared by the batch) and, with ``optimise_z``, the latents
    z are optimised with Adam to maximise ``mean log p_clf(c_f | sigmoid(decoder(z, softmax(a))))``;
    the model and the evaluator stay frozen. ``a`` starts at zero (the uniform mixture of every
    class) and z at N(0, I) draws.

    Returns:
        ``recovery`` (share of the optimised batch called c_f with p >= 0.5), ``recovery_fresh``
        (the found condition with fresh z ~ N(0, I)), ``p_forget`` per sample, ``condition``
        (softmax(a)), ``images`` and ``curve`` (mean p(c_f) per step).
    """
    steps = check_positive_int("steps", steps)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    frozen = [p.requires_grad for p in (*model.parameters(), *classifier.parameters())]
    model.requires_grad_(False).eval()
    classifier.requires_grad_(False).eval()
    logits = torch.zeros(model.num_classes, device=device, requires_grad=True)
    z = torch.randn(samples, model.z_dim, generator=g).to(device).requires_grad_(optimise_z)
    opt = torch.optim.Adam([logits] + ([z] if optimise_z else []), lr=lr)

    def draw(latents: Tensor) -> Tensor:
        cond = torch.softmax(logits, 0).expand(len(latents), -1)
        return torch.sigmoid(model.decode_logits(latents, cond)).view(-1, *model.data_shape)

    curve = []
    for _ in range(steps):
        logp = torch.log_softmax(classifier(draw(z)), -1)[:, forget_class]
        opt.zero_grad()
        (-logp.mean()).backward()
        opt.step()
        curve.append(float(logp.detach().exp().mean()))
    with torch.no_grad():
        images = draw(z)
        p = torch.softmax(classifier(images), -1)[:, forget_class].cpu()
        fresh = torch.randn(samples, model.z_dim, generator=g).to(device)
        p_fresh = torch.softmax(classifier(draw(fresh)), -1)[:, forget_class].cpu()
    for param, flag in zip((*model.parameters(), *classifier.parameters()), frozen):
        param.requires_grad_(flag)            # both models as they came
    return {"recovery": recovery_rate(p), "recovery_fresh": recovery_rate(p_fresh),
            "p_forget": p, "condition": torch.softmax(logits.detach(), 0).cpu(),
            "images": images.cpu(), "curve": curve, "steps": steps}


def learn_embedding_row(embedding: nn.Embedding, row: int, loss: Callable[[int], Tensor], *,
                        steps: int, lr: float = 5e-3, init: Tensor | None = None
                        ) -> list[float]:
    """Learn one row of an embedding table with everything else frozen (condition inversion).

    ``loss(step)`` is the model's own training loss on real images of c_f conditioned on the
    row (e.g. ``-ELBO(x, e)``); only ``embedding.weight[row]`` moves -- the model's weights
    and every other row stay exactly as they are (their gradients are masked). The caller
    freezes the model's other parameters. Returns the loss per step.
    """
    steps = check_positive_int("steps", steps)
    if not 0 <= row < embedding.num_embeddings:
        raise ValueError(f"row must be in 0..{embedding.num_embeddings - 1}, got {row}")
    weight = embedding.weight
    with torch.no_grad():
        if init is not None:
            weight[row] = init.to(weight)
    keep = weight.detach().clone()
    mask = torch.zeros_like(weight[:, :1])
    mask[row] = 1.0
    weight.requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    curve = []
    for step in range(steps):
        value = loss(step)
        opt.zero_grad()
        value.backward()
        weight.grad.mul_(mask)
        opt.step()
        with torch.no_grad():           # Adam's state must not move the other rows either
            weight.copy_(torch.where(mask.bool(), weight, keep))
        curve.append(float(value.detach()))
    weight.requires_grad_(False)
    return curve


# ---- 2. relearning ----------------------------------------------------------------------------
def relearn(model: nn.Module, x: Tensor, c: Any, judge: Callable[[nn.Module], float], *,
            checks: Sequence[int] = (5, 10, 20, 40, 80), lr: float = 1e-4,
            batch_size: int = 16, threshold: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Fine-tune a copy of ``model`` on ``(x, c)`` with its own loss until ``judge >= threshold``.

    ``judge(model)`` is P(c_f) on the model's own samples for c_f's label (the evaluator's mean
    probability), measured before training and after each step count in ``checks``. The loss
    is the batch mean of ``model.neg_elbo(x, c)`` (Adam; batches of ``min(batch_size, k)``).

    Returns:
        ``steps`` (the first checked step count where the judge reached ``threshold``; None if
        it did not within ``max(checks)``), ``curve`` [(step, P(c_f))] from step 0, and the
        fine-tuned ``model`` copy.
    """
    checks = sorted(check_positive_int("checks", n) for n in checks)
    model = copy.deepcopy(model).requires_grad_(True).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    device = next(model.parameters()).device
    curve = [(0, float(judge(model)))]
    step = 0
    for stop in checks:
        if curve[-1][1] >= threshold:
            break
        model.train()
        while step < stop:
            idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + step)
                loss = model.neg_elbo(x[idx].to(device), _to(take(c, idx), device)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        curve.append((step, float(judge(model))))
    reached = next((s for s, p in curve if p >= threshold), None)
    return {"steps": reached, "curve": curve, "model": model.eval()}


def _to(c: Any, device: Any) -> Any:
    return c.to(device) if isinstance(c, Tensor) else c


# ---- 3. likelihood ----------------------------------------------------------------------------
@torch.no_grad()
def sample_nll(model: nn.Module, x: Tensor, c: Any, *, repeats: int = 4, seed: int = 0,
               batch_size: int = 256) -> Tensor:
    """Per-image negative ELBO ``(N,)``, averaged over ``repeats`` seeded noise draws.

    The noise (cVAE: the reparameterisation noise; diffusion: the timestep and epsilon) comes
    from a generator seeded by ``seed`` and the repeat, so two models see the same draws and
    their difference measures the models, not the noise.
    """
    repeats = check_positive_int("repeats", repeats)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(len(x))
    for r in range(repeats):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + r)
            for i in range(0, len(x), batch_size):
                idx = torch.arange(i, min(i + batch_size, len(x)))
                xb = x[idx].to(device)
                total[idx] += model.neg_elbo(xb, _to(take(c, idx), device),
                                             model.draw_noise(xb)).float().cpu()
    model.train(was_training)
    return total / repeats


# ---- 4. guidance ------------------------------------------------------------------------------
@torch.no_grad()
def guidance_sweep(model: nn.Module, classifier: nn.Module, forget_class: int, *,
                   scales: Sequence[float] = (0.0, 0.5, 1.0, 3.0), samples: int = 64,
                   seed: int = 0) -> dict[float, dict[str, float]]:
    """P(c_f) and the recovery rate of samples drawn for c_f at each guidance weight w.

    The kit writes classifier-free guidance as ``eps(null) + w (eps(c) - eps(null))``: w = 0 is
    the unconditional model (the label plays no part: the row then says how often c_f appears
    among unconditional samples), w = 1 the conditional one, w > 1 pushes away from the null
    class.
    """
    from sa_kit.metrics import class_probabilities
    out = {}
    device = next(model.parameters()).device
    c = torch.full((samples,), forget_class, device=device)
    for w in scales:
        g = torch.Generator(device=device).manual_seed(seed)
        p = class_probabilities(classifier, model.sample(c, guidance_scale=w, generator=g))
        out[float(w)] = {"P_cf": float(p[:, forget_class].mean()),
                         "recovery": recovery_rate(p[:, forget_class]),
                         "share_cf": float((p.argmax(1) == forget_class).float().mean())}
    return out

