"""Chapter 2: the class-conditional DDPM adapter, its Fisher, and forgetting with it.

Tiny UNets built in code after ``torch.manual_seed(0)`` (widths 8-16, 8x8 images, 2 inference
steps), as diffusers' own fast tests do.
"""
from __future__ import annotations

import pytest
import torch

from sa_kit.diffusion_fisher import (diffusion_fisher_exact, diffusion_fisher_fast,
                                     fisher_agreement, stratified_timesteps)
from sa_kit.fisher import check_fisher, fisher_per_sample, fisher_fast, load_fisher, save_fisher
from sa_kit.forget import forget_class
from sa_kit.models.ddpm import (ClassConditionalDDPM, build_unet, check_guidance_scale,
                                train_ddpm)
from sa_kit.objective import ForgettableModel

NUM_CLASSES = 3


def tiny_ddpm(seed: int = 0, channels: tuple[int, ...] = (8, 16), timesteps: int = 1000,
              **kw) -> ClassConditionalDDPM:
    torch.manual_seed(seed)
    unet = build_unet(NUM_CLASSES, image_size=8, in_channels=3, block_out_channels=channels,
                      norm_num_groups=4, **kw)
    return ClassConditionalDDPM(unet, NUM_CLASSES, num_train_timesteps=timesteps,
                                guidance_scale=2.0, num_inference_steps=2)


@pytest.fixture(scope="module")
def model() -> ClassConditionalDDPM:
    return tiny_ddpm()


def test_adapter_is_a_forgettable_model(model):
    assert isinstance(model, ForgettableModel)
    assert model.data_shape == (3, 8, 8) and model.data_range == (0.0, 1.0)
    assert model.unet.config.num_class_embeds == NUM_CLASSES + 1      # + the CFG null class
    x = torch.rand(4, 3, 8, 8)
    t, eps = model.draw_noise(x)
    assert t.shape == (4,) and t.dtype == torch.long and eps.shape == x.shape
    assert 0 <= int(t.min()) and int(t.max()) < 1000


def test_neg_elbo_is_the_epsilon_prediction_loss(model):
    torch.manual_seed(1)
    x, c = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])  # 3 = null class is allowed
    noise = model.draw_noise(x)
    loss = model.neg_elbo(x, c, noise)
    assert loss.shape == (4,) and torch.isfinite(loss).all() and (loss > 0).all()
    t, eps = noise                                               # recompute eq. (14) by hand
    abar = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * (2 * x - 1) + (1 - abar).sqrt() * eps
    pred = model.unet(x_t, t, class_labels=c).sample
    torch.testing.assert_close(loss, ((pred - eps) ** 2).mean((1, 2, 3)))
    # the same noise gives the same loss, one sample at a time (what the Fisher relies on)
    one = model.neg_elbo(x[1:2], c[1:2], (t[1:2], eps[1:2]))
    torch.testing.assert_close(one, loss[1:2], rtol=1e-4, atol=1e-6)


def test_guided_sampler_shapes_range_and_determinism(model):
    c = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(0)
    a = model.sample(c)
    torch.manual_seed(0)
    b = model.sample(c)
    assert a.shape == (4, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)
    torch.manual_seed(0)
    plain = model.sample(c, guidance_scale=1.0)
    assert not torch.allclose(a, plain)                 # guidance changes the samples
    torch.manual_seed(0)
    # w = 1 through the guided formula equals the conditional branch alone
    eps_w1 = model.guided_eps(torch.randn(4, 3, 8, 8), torch.tensor(10), c, 1.0 + 1e-9)
    torch.manual_seed(0)
    eps_c = model.unet(torch.randn(4, 3, 8, 8), torch.tensor(10), class_labels=c).sample
    torch.testing.assert_close(eps_w1, eps_c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, err", [(-0.5, ValueError), (float("nan"), ValueError),
                                      ("2", TypeError)])
def test_bad_guidance_scale(model, bad, err):
    with pytest.raises(err, match="guidance_scale"):
        model.sample(torch.tensor([0]), guidance_scale=bad)
    with pytest.raises(err, match="guidance_scale"):
        check_guidance_scale(bad)


def test_class_outside_the_embedding(model):
    with pytest.raises(ValueError, match=r"c must hold classes in 0\.\.2"):
        model.sample(torch.tensor([0, NUM_CLASSES]))      # the null class is not a sampling class
    with pytest.raises(ValueError, match=r"c must hold classes in 0\.\.3"):
        model.neg_elbo(torch.rand(1, 3, 8, 8), torch.tensor([7]))
    with pytest.raises(TypeError, match="integer class"):
        model.sample(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="forget_class"):
        forget_class(tiny_ddpm(), 5, fisher=None, lmbda=0.0, steps=1, batch_size=2)


def test_exact_fisher_is_the_squared_gradient_of_the_all_timestep_loss():
    m = tiny_ddpm(timesteps=20)
    torch.manual_seed(2)
    x, c = torch.rand(2, 3, 8, 8), torch.tensor([0, 2])
    eps = torch.randn(2, 20, 3, 8, 8)
    exact = diffusion_fisher_exact(m, x, c, eps, chunk_size=7, progress=False)
    check_fisher(exact, m)
    # by hand: one backward per sample of the mean loss over all 20 timesteps
    name, p = "unet.conv_in.weight", m.unet.conv_in.weight
    ref = torch.zeros_like(p)
    for n in range(2):
        loss = m.eps_loss(x[n:n + 1].expand(20, -1, -1, -1), c[n:n + 1].expand(20),
                          torch.arange(20), eps[n]).mean()
        ref += torch.autograd.grad(loss, p)[0] ** 2
    torch.testing.assert_close(exact[name], ref / 2, rtol=1e-4, atol=1e-10)
    # K = T stratified timesteps are all the timesteps: the fast estimator is then exact
    full = diffusion_fisher_fast(m, x, c, num_timesteps=20, eps=eps, chunk_size=20,
                                 progress=False)
    agree = fisher_agreement(full, exact)
    assert agree["rel_error"] < 1e-4 and agree["spearman"] > 0.9999


def test_fast_fisher_agrees_with_exact_on_a_tiny_unet():
    m = tiny_ddpm(timesteps=100)
    torch.manual_seed(3)
    c = torch.tensor([0, 1, 2, 0])
    x = m.sample(c)
    eps = torch.randn(4, 100, 3, 8, 8)
    exact = diffusion_fisher_exact(m, x, c, eps, chunk_size=100, progress=False)
    fast = diffusion_fisher_fast(m, x, c, num_timesteps=25, eps=eps, chunk_size=25, progress=False,
                                 generator=torch.Generator().manual_seed(0))
    agree = fisher_agreement(fast, exact)
    assert agree["spearman"] > 0.8, agree
    assert agree["rel_error"] < 0.5, agree
    t = stratified_timesteps(1000, 10, torch.Generator().manual_seed(0))
    assert ((t // 100) == torch.arange(10)).all()        # one timestep per stratum
    with pytest.raises(ValueError, match="num_timesteps"):
        diffusion_fisher_fast(m, x, c, num_timesteps=0, progress=False)


def test_core_fisher_estimators_work_on_the_unet(model):
    torch.manual_seed(4)
    x, c = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])
    noise = model.draw_noise(x)
    ref = fisher_per_sample(model, x, c, noise)
    fast = fisher_fast(model, x, c, noise)
    assert fisher_agreement(fast, ref)["rel_error"] < 1e-3


def test_fisher_of_another_unet_is_refused(model, tmp_path):
    other = tiny_ddpm(channels=(8, 8))
    torch.manual_seed(5)
    x, c = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    fisher = fisher_fast(other, x, c)
    save_fisher(tmp_path / "f.safetensors", fisher, other)
    with pytest.raises(ValueError, match="fisher does not match"):
        load_fisher(tmp_path / "f.safetensors", model)
    with pytest.raises(ValueError, match="fisher does not match"):
        forget_class(tiny_ddpm(), 0, fisher=fisher, lmbda=1.0, steps=1, batch_size=2)


def test_forgetting_steps_and_ewc_hold_parameters_near_theta_star():
    torch.manual_seed(6)
    base = tiny_ddpm()
    theta_star = {k: p.detach().clone() for k, p in base.named_parameters()}
    fisher = {k: torch.ones_like(v) for k, v in theta_star.items()}    # F = 1: plain L2 pull

    def drift(lmbda: float) -> float:
        m = tiny_ddpm()
        torch.manual_seed(7)
        hist = forget_class(m, 0, fisher=fisher, mapping="noise", lmbda=lmbda, gamma=1.0,
                            steps=3, batch_size=2, lr=1e-2, replay_buffer=4, progress=False)
        assert len(hist["loss"]) == 3 and all(torch.isfinite(torch.tensor(hist["loss"])))
        return sum(float(((p.detach() - theta_star[k]) ** 2).sum()) for k, p in m.named_parameters())

    assert drift(1e4) < 0.5 * drift(0.0)


def test_train_ddpm_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(8)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, NUM_CLASSES, (16,))
    whole = tiny_ddpm()
    torch.manual_seed(9)
    full = train_ddpm(whole, x, y, steps=4, batch_size=4, checkpoint_dir=tmp_path / "a",
                      checkpoint_every=2, progress=False)
    part = tiny_ddpm()
    calls = {"n": 0}
    real = part.neg_elbo

    def crash_on_third_step(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill at step 3")
        return real(*args, **kw)

    part.neg_elbo = crash_on_third_step
    torch.manual_seed(9)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm(part, x, y, steps=4, batch_size=4, checkpoint_dir=tmp_path / "b",
                   checkpoint_every=2, progress=False)
    resumed = tiny_ddpm()                                 # a fresh process picks the run up
    torch.manual_seed(123)                                # the checkpoint restores the RNG
    again = train_ddpm(resumed, x, y, steps=4, batch_size=4, checkpoint_dir=tmp_path / "b",
                       checkpoint_every=2, progress=False)
    assert (tmp_path / "a" / "ddpm_checkpoint.safetensors").exists()
    assert again == full
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
