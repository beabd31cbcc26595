"""Chapter 2: the class-conditional DDPM adapter, its Fisher, and forgetting with it.

Tiny UNets built in code after ``torch.manual_seed(0)`` (widths 8-16, 8x8 images, 2 inference
steps), as diffusers' own fast tests do.
"""
from __future__ import annotations

import pytest
import torch

from sa_kit.checks import check_weight
from sa_kit.diffusion_fisher import diffusion_fisher, fisher_agreement, stratified_timesteps
from sa_kit.fisher import check_fisher, fisher_per_sample, fisher_fast, load_fisher, save_fisher
from sa_kit.forget import forget_one_class as forget_class
from sa_kit.models.ddpm import (ClassConditionalDDPM, build_unet, guidance_from_official,
                                train_ddpm)
from sa_kit.objective import ClassConditionalModel, ForgettableModel

NUM_CLASSES = 3


def tiny_ddpm(seed: int = 0, channels: tuple[int, ...] = (8, 16), timesteps: int = 1000,
              ddpm_kw: dict | None = None, **kw) -> ClassConditionalDDPM:
    ddpm_kw = ddpm_kw or {}
    torch.manual_seed(seed)
    unet = build_unet(NUM_CLASSES, image_size=8, in_channels=3, block_out_channels=channels,
                      norm_num_groups=4, **kw)
    return ClassConditionalDDPM(unet, NUM_CLASSES, num_train_timesteps=timesteps,
                                guidance_scale=2.0, num_inference_steps=2, **ddpm_kw)


@pytest.fixture(scope="module")
def model() -> ClassConditionalDDPM:
    return tiny_ddpm()


def test_adapter_is_a_forgettable_model(model):
    assert isinstance(model, ForgettableModel) and isinstance(model, ClassConditionalModel)
    assert model.loss_reduction == "mean"                # official: mean over the batch
    assert model.data_shape == (3, 8, 8) and model.data_range == (0.0, 1.0)
    assert model.unet.config.num_class_embeds == NUM_CLASSES + 1      # + the CFG null class
    x = torch.rand(4, 3, 8, 8)
    t, eps = model.draw_noise(x)
    assert t.shape == (4,) and t.dtype == torch.long and eps.shape == x.shape
    assert 0 <= int(t.min()) and int(t.max()) < 1000
    assert int(t[0]) + int(t[3]) == 999                    # antithetic pairs (t, T-1-t)


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
    torch.testing.assert_close(loss, ((pred - eps) ** 2).sum((1, 2, 3)))  # official: a sum
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
                                      (float("inf"), ValueError), ("2", TypeError)])
def test_bad_guidance_scale(model, bad, err):
    with pytest.raises(err, match="guidance_scale"):
        check_weight("guidance_scale", bad)
    with pytest.raises(err, match="guidance_scale"):
        model.sample(torch.tensor([0]), guidance_scale=bad)


def test_guidance_convention_matches_the_official_cond_scale(model):
    """Official: (1 + s) eps(c) - s eps(null) with s = 2; the kit: w = 1 + s = 3."""
    w = guidance_from_official(2.0)
    assert w == 3.0
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor(500), torch.tensor([0, 1])
    eps_c = model.unet(x, t, class_labels=c).sample
    eps_u = model.unet(x, t, class_labels=torch.full_like(c, model.null_class)).sample
    torch.testing.assert_close(model.guided_eps(x, t, c, w), (1 + 2.0) * eps_c - 2.0 * eps_u,
                               rtol=1e-4, atol=1e-5)


def test_ancestral_sampler_is_the_official_generalized_steps_with_eta_1():
    """eta = 1 over all T steps: x_{t-1} = sqrt(a') x0_t + c1 z + c2 eps (ddim's generalized_steps)."""
    m = tiny_ddpm(timesteps=10)
    c = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    out = m.sample(c, guidance_scale=1.0, num_inference_steps=10, eta=1.0, generator=g)
    # the same loop written from the official formula, with the same random numbers
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3, 8, 8), generator=g)
    abar = m.scheduler.alphas_cumprod
    for t in reversed(range(10)):
        at, at_next = abar[t], abar[t - 1] if t > 0 else torch.tensor(1.0)
        e = m.unet(x, torch.tensor(t), class_labels=c).sample
        x0 = (x - e * (1 - at).sqrt()) / at.sqrt()
        c1 = ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
        c2 = ((1 - at_next) - c1 ** 2).sqrt()
        z = torch.randn(x.shape, generator=g)
        x = at_next.sqrt() * x0 + c1 * z + c2 * e
    torch.testing.assert_close(out, ((x + 1) / 2).clamp(0, 1), rtol=1e-4, atol=1e-4)


def test_ema_copy_is_used_for_sampling_and_never_trained():
    m = tiny_ddpm(ddpm_kw={"ema_decay": 0.5})
    assert m.ema_unet is not None
    assert not any(p.requires_grad for p in m.ema_unet.parameters())
    m.requires_grad_(True)
    assert not any(p.requires_grad for p in m.ema_unet.parameters())
    trainable = {k for k, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(k.startswith("unet.") for k in trainable)
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.ema_unet.parameters()]
    m.update_ema()
    for b, e, p in zip(before, m.ema_unet.parameters(), m.unet.parameters()):
        torch.testing.assert_close(e, 0.5 * b + 0.5 * p)
    assert "ema_unet.conv_in.weight" in m.state_dict()


def test_class_outside_the_embedding(model):
    with pytest.raises(ValueError, match=r"c must hold classes in 0\.\.2"):
        model.sample(torch.tensor([0, NUM_CLASSES]))      # the null class is not a sampling class
    with pytest.raises(ValueError, match=r"c must hold classes in 0\.\.3"):
        model.neg_elbo(torch.rand(1, 3, 8, 8), torch.tensor([7]))
    with pytest.raises(TypeError, match="integer class"):
        model.sample(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="forget_class"):
        forget_class(tiny_ddpm(), 5, fisher=None, lmbda=0.0, steps=1, batch_size=2)


def test_exact_fisher_is_the_squared_gradient_of_the_all_timestep_sum():
    m = tiny_ddpm(timesteps=20)
    torch.manual_seed(2)
    x, c = torch.rand(2, 3, 8, 8), torch.tensor([0, 2])
    eps = torch.randn(2, 20, 3, 8, 8)
    exact = diffusion_fisher(m, x, c, None, eps=eps, chunk_size=7, progress=False)
    check_fisher(exact, m)
    # by hand: one backward per sample of the loss *summed* over all 20 timesteps
    name, p = "unet.conv_in.weight", m.unet.conv_in.weight
    ref = torch.zeros_like(p)
    for n in range(2):
        loss = m.eps_loss(x[n:n + 1].expand(20, -1, -1, -1), c[n:n + 1].expand(20),
                          torch.arange(20), eps[n]).sum()
        ref += torch.autograd.grad(loss, p)[0] ** 2
    torch.testing.assert_close(exact[name], ref / 2, rtol=1e-4, atol=1e-10)
    # K = T stratified timesteps are all the timesteps: "square" is then exact
    full = diffusion_fisher(m, x, c, 20, estimator="square", eps=eps, chunk_size=20,
                            progress=False)
    agree = fisher_agreement(full, exact)
    assert agree["rel_error"] < 1e-4 and agree["spearman"] > 0.9999


def test_stratified_estimators_agree_with_the_exact_fisher_and_product_is_unbiased():
    m = tiny_ddpm(timesteps=100)
    torch.manual_seed(3)
    c = torch.tensor([0, 1, 2, 0])
    x = m.sample(c)
    eps = torch.randn(4, 100, 3, 8, 8)
    exact = diffusion_fisher(m, x, c, None, eps=eps, chunk_size=100, progress=False)
    for est in ("square", "product"):
        fast = diffusion_fisher(m, x, c, 40, estimator=est, eps=eps, chunk_size=40,
                                seed=1, progress=False)
        agree = fisher_agreement(fast, exact)
        assert agree["spearman"] > 0.7, (est, agree)
        assert agree["rel_error"] < 1.0, (est, agree)
    # bias of the total mass, averaged over many seeds: "square" is biased up, "product" not
    total = lambda f: sum(float(v.sum()) for v in f.values())  # noqa: E731
    ref = total(exact)
    sq = [total(diffusion_fisher(m, x, c, 4, estimator="square", eps=eps, seed=s,
                                 progress=False)) / ref - 1 for s in range(12)]
    pr = [total(diffusion_fisher(m, x, c, 4, estimator="product", eps=eps, seed=s,
                                 progress=False)) / ref - 1 for s in range(12)]
    assert sum(sq) / len(sq) > abs(sum(pr) / len(pr))
    t, w = stratified_timesteps(1000, 10, torch.Generator().manual_seed(0))
    assert ((t // 100) == torch.arange(10)).all() and float(w.sum()) == 1000  # one per stratum
    t, w = stratified_timesteps(1000, 3)
    assert float(w.sum()) == 1000 and (t < 1000).all()
    with pytest.raises(ValueError, match="num_timesteps"):
        diffusion_fisher(m, x, c, 0, progress=False)
    with pytest.raises(ValueError, match="product"):
        diffusion_fisher(m, x, c, 1, progress=False)


def test_diffusion_fisher_does_not_depend_on_how_items_are_split():
    m = tiny_ddpm(timesteps=50)
    torch.manual_seed(4)
    c = torch.tensor([0, 1, 2, 1])
    x = torch.rand(4, 3, 8, 8)
    whole = diffusion_fisher(m, x, c, 10, seed=7, progress=False)
    halves = [diffusion_fisher(m, x[i::2], c[i::2], 10, seed=7, item_ids=list(range(i, 4, 2)),
                               clamp=False, progress=False) for i in (0, 1)]
    for k in whole:   # shards are averaged first, then clamped at 0, as the SD sharding does
        torch.testing.assert_close(whole[k], ((halves[0][k] + halves[1][k]) / 2).clamp_min(0),
                                   rtol=1e-4, atol=1e-6 * float(whole[k].abs().max()))


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
    assert (tmp_path / "a" / "train_checkpoint.safetensors").exists()
    assert again == full
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
