"""EWC visibly acts in every chapter, at every CPU profile's own settings.

For each chapter's model (its profile's architecture, briefly trained), its Fisher computed the
chapter's way, and its profile's lambda, batch size and learning rate, forgetting for the same
number of steps ends much closer to theta* in the Fisher norm sum_i F_i (theta_i - theta*_i)^2
with the profile's lambda than with lambda = 0. (With the official scale the penalty acts; before
the kit adopted it, chapter 2's penalty was 1e-11 of the official one and this test would fail.)
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sa_kit import seed_everything
from sa_kit.forget import forget_one_class
from sa_kit.profiles import get_profile

pytestmark = pytest.mark.slow
FACTOR = 3.0          # the profile's lambda must keep the Fisher norm at least 3x smaller


def fisher_norm(model: torch.nn.Module, fisher: dict, theta_star: dict) -> float:
    return sum(float((fisher[k] * (p.detach() - theta_star[k]) ** 2).sum())
               for k, p in model.named_parameters() if k in fisher)


def _drift(make, fisher, lmbda: float, **kw) -> float:
    model = make()
    theta_star = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    seed_everything(1)
    forget_one_class(model, 0, fisher=fisher if lmbda > 0 else None, lmbda=lmbda,
                     progress=False, **kw)
    return fisher_norm(model, fisher, theta_star)


@pytest.mark.parametrize("profile", ["ci", "cpu"])
def test_chapter1_cvae(profile):
    from sa_kit.chapters.mnist_cvae import mnist_splits
    from sa_kit.fisher import model_fisher
    from sa_kit.models.cvae import ConditionalVAE, train_cvae
    sizes = get_profile(profile).mnist
    train, _ = mnist_splits(verbose=False)
    seed_everything(0)
    base = ConditionalVAE()
    train_cvae(base, train.x, train.y, steps=300, progress=False)
    fisher = model_fisher(base, range(10), 500, progress=False)
    make = lambda: __import__("copy").deepcopy(base)  # noqa: E731
    kw = dict(mapping="noise", gamma=sizes.gamma, steps=300, batch_size=sizes.forget_batch,
              lr=sizes.forget_lr)
    held, free = _drift(make, fisher, sizes.lmbda, **kw), _drift(make, fisher, 0.0, **kw)
    print(f"ch1 {profile}: Fisher norm lambda={sizes.lmbda:g}: {held:.4g}, lambda=0: {free:.4g}")
    assert held * FACTOR < free


@pytest.mark.parametrize("profile", ["ci", "cpu"])
def test_chapter2_ddpm(profile):
    from sa_kit.chapters.ddpm_digits import load_data, make_ddpm
    from sa_kit.diffusion_fisher import diffusion_fisher
    from sa_kit.models.ddpm import train_ddpm
    sizes = get_profile(profile).ddpm
    data = load_data(sizes, verbose=False)
    seed_everything(0)
    base = make_ddpm(sizes, 10, 3, sizes.image_size)
    train_ddpm(base, data.x, data.y, steps=150, batch_size=32, lr=sizes.train_lr,
               progress=False)
    c = torch.arange(10)
    fisher = diffusion_fisher(base, base.sample(c), c, sizes.fisher_timesteps, progress=False)
    make = lambda: __import__("copy").deepcopy(base).requires_grad_(True)  # noqa: E731
    kw = dict(mapping="noise", gamma=sizes.gamma, steps=30, batch_size=sizes.forget_batch,
              lr=sizes.forget_lr, grad_clip=sizes.grad_clip, replay_buffer=64)
    held, free = _drift(make, fisher, sizes.lmbda, **kw), _drift(make, fisher, 0.0, **kw)
    print(f"ch2 {profile}: Fisher norm lambda={sizes.lmbda:g}: {held:.4g}, lambda=0: {free:.4g}")
    assert held * FACTOR < free


@pytest.mark.parametrize("profile", ["ci", "cpu"])
def test_chapter3_text_to_image(profile, tmp_path):
    """The profile's forgetting run on a (briefly trained) coloured-digit pipeline."""
    pytest.importorskip("diffusers")
    from sa_kit.sd.digits import T2ISizes, train_pipeline
    from sa_kit.sd.forget import run
    from sa_kit.sd.pipeline import load_pipeline
    sizes = get_profile(profile).sd
    small = T2ISizes(vae_channels=(8, 16), vae_steps=100, unet_channels=(32, 64),
                     text_width=32, train_steps=150, batch_size=32, num_examples=2000)
    model = str(train_pipeline(tmp_path / "model", small, progress=False))
    runs = {}
    for lmbda in (sizes.run.lmbda, 0.0):
        cfg = dataclasses.replace(sizes.run, model=model, output_dir=str(tmp_path / f"l{lmbda}"),
                                  data_dir=str(tmp_path / "data"), lmbda=lmbda, steps=10,
                                  num_surrogate=32, num_replay=32, gen_steps=4,
                                  checkpoint_every=10_000)
        runs[lmbda] = run(cfg, progress=False)
    fisher = runs[sizes.run.lmbda]["fisher"]
    theta_star = {f"unet.{k}": p.detach() for k, p in load_pipeline(model).unet.named_parameters()}
    held, free = (fisher_norm(runs[lmbda]["adapter"], fisher, theta_star)
                  for lmbda in (sizes.run.lmbda, 0.0))
    print(f"ch3 {profile}: Fisher norm lambda={sizes.run.lmbda:g}: {held:.4g}, lambda=0: {free:.4g}")
    assert held * FACTOR < free
