"""Autograder: your ``per_sample_fisher`` and ``sa_loss`` against the kit's reference.

    .venv/bin/python -m pytest instructors/assignment/autograder.py            # submission.py
    SA_SUBMISSION=path/to/file.py .venv/bin/python -m pytest instructors/assignment/autograder.py

Each test names its rubric item (README.md); points are in the test's first docstring line.
The reference is ``sa_kit.fisher.fisher_per_sample`` and ``sa_kit.objective.sa_loss``, on a small
conditional VAE with random weights; the noise of the ELBO is fixed so that the numbers must
agree to float32 precision.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from sa_kit.fisher import fisher_per_sample
from sa_kit.models import ConditionalVAE
from sa_kit.objective import sa_loss as reference_sa_loss

HERE = Path(__file__).resolve().parent
SUBMISSION = Path(os.environ.get("SA_SUBMISSION") or HERE / "submission.py")


def _load():
    spec = importlib.util.spec_from_file_location("submission", SUBMISSION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


student = _load()


class FixedNoise(nn.Module):
    """The cVAE with eps = 0 unless noise is passed: -log p is deterministic."""

    def __init__(self, model: ConditionalVAE, loss_reduction: str = "sum") -> None:
        super().__init__()
        self.model, self.loss_reduction = model, loss_reduction

    def draw_noise(self, x):
        return self.model.draw_noise(x)

    def neg_elbo(self, x, c, noise=None):
        if noise is None:
            noise = tuple(torch.zeros_like(t) for t in self.model.draw_noise(x))
        return self.model.neg_elbo(x, c, noise)

    def sample(self, c):
        return self.model.sample(c)


@pytest.fixture
def model() -> FixedNoise:
    torch.manual_seed(0)
    return FixedNoise(ConditionalVAE(h_dims=(24, 12), z_dim=3))


@pytest.fixture
def batch():
    torch.manual_seed(1)
    x = torch.rand(10, 1, 28, 28)
    c = torch.arange(10) % 10
    return x, c


def _close(a, b, what):
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()) + 1e-12), \
        f"{what}: yours {float(a.flatten()[0]):.6g}... vs reference {float(b.flatten()[0]):.6g}..."


# -- Fisher (40 points) -------------------------------------------------------------------------

def test_fisher_has_one_tensor_per_trainable_parameter(model, batch):
    """[F1, 5 pts] keys and shapes: every parameter that requires a gradient, its own shape."""
    x, c = batch
    model.model.fc1.requires_grad_(False)            # a frozen layer has no Fisher
    got = student.per_sample_fisher(model, x, c, model.draw_noise(x))
    want = {k: p.shape for k, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want), f"keys differ: {sorted(set(got) ^ set(want))}"
    assert all(got[k].shape == want[k] for k in want)


def test_fisher_matches_the_reference(model, batch):
    """[F2, 25 pts] values: mean over samples of the squared per-sample gradient."""
    x, c = batch
    noise = model.draw_noise(x)
    want = fisher_per_sample(model, x, c, noise)
    got = student.per_sample_fisher(model, x, c, noise)
    for k in want:
        _close(got[k], want[k], f"F[{k}]")


def test_fisher_is_a_mean_over_samples(model, batch):
    """[F3, 5 pts] the same batch twice gives the same Fisher (a mean, not a sum)."""
    x, c = batch
    noise = model.draw_noise(x)
    once = student.per_sample_fisher(model, x, c, noise)
    twice = student.per_sample_fisher(model, torch.cat([x, x]), torch.cat([c, c]),
                                      tuple(torch.cat([t, t]) for t in noise))
    for k in once:
        _close(twice[k], once[k], f"F[{k}] of a doubled batch")


def test_fisher_leaves_the_model_alone(model, batch):
    """[F4, 5 pts] no weight changes and no .grad left behind."""
    x, c = batch
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student.per_sample_fisher(model, x, c, model.draw_noise(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None or not p.grad.abs().sum() for p in model.parameters())


# -- SA loss (40 points) ------------------------------------------------------------------------

def _setting(model, batch):
    x, c = batch
    theta_star = {k: p.detach().clone() for k, p in model.named_parameters()}
    torch.manual_seed(2)
    fisher = {k: torch.rand_like(p) for k, p in model.named_parameters()}
    with torch.no_grad():                       # theta != theta*: the penalty is not zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    surrogate = (torch.rand(6, 1, 28, 28), torch.zeros(6, dtype=torch.long))
    replay = (x[1:], c[1:])
    return surrogate, replay, fisher, theta_star


def test_sa_loss_surrogate_term_alone(model, batch):
    """[L1, 10 pts] term (1) only (no replay, no Fisher), summed over the batch for a cVAE."""
    surrogate, _, _, _ = _setting(model, batch)
    want = reference_sa_loss(model, surrogate, None, None, None, lmbda=0.0, gamma=0.0)["loss"]
    got = student.sa_loss(model, surrogate, None, None, None, lmbda=0.0, gamma=0.0)
    _close(got.detach(), want.detach(), "loss with the surrogate term only")


def test_sa_loss_respects_the_models_batch_reduction(batch):
    """[L2, 10 pts] a model with loss_reduction "mean" (diffusion models) averages (1) and (2)."""
    torch.manual_seed(0)
    model = FixedNoise(ConditionalVAE(h_dims=(24, 12), z_dim=3), loss_reduction="mean")
    surrogate, replay, _, _ = _setting(model, batch)
    want = reference_sa_loss(model, surrogate, replay, None, None, lmbda=0.0, gamma=1.0)["loss"]
    got = student.sa_loss(model, surrogate, replay, None, None, lmbda=0.0, gamma=1.0)
    _close(got.detach(), want.detach(), "loss of a mean-reduced model")


@pytest.mark.parametrize("lmbda, gamma", [(100.0, 1.0), (10.0, 0.5), (1.0, 0.0)])
def test_sa_loss_matches_the_reference(model, batch, lmbda, gamma):
    """[L3, 15 pts] all three terms, the penalty without 1/2 (the official scale)."""
    surrogate, replay, fisher, theta_star = _setting(model, batch)
    want = reference_sa_loss(model, surrogate, replay, fisher, theta_star, lmbda, gamma)["loss"]
    got = student.sa_loss(model, surrogate, replay, fisher, theta_star, lmbda, gamma)
    _close(got.detach(), want.detach(), f"loss at lambda {lmbda}, gamma {gamma}")


def test_sa_loss_gradient_matches_the_reference(model, batch):
    """[L4, 5 pts] the loss back-propagates to the same gradient."""
    surrogate, replay, fisher, theta_star = _setting(model, batch)
    params = [p for p in model.parameters()]
    want = torch.autograd.grad(reference_sa_loss(model, surrogate, replay, fisher, theta_star,
                                                 100.0, 1.0)["loss"], params)
    got = torch.autograd.grad(student.sa_loss(model, surrogate, replay, fisher, theta_star,
                                              100.0, 1.0), params)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        _close(g, w, f"gradient of {name}")
