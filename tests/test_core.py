"""Unit tests of the model-agnostic core: objective, Fisher, replay, mappings, forgetting loop."""
from __future__ import annotations

import pytest
import torch

from sa_kit.fisher import (check_fisher, fisher_fast, fisher_per_sample, load_fisher,
                           model_fisher, save_fisher)
from sa_kit.forget import NonFiniteLossError, forget_one_class
from sa_kit.mappings import ClassMapping, ImageMapping, UniformNoise, make_mapping
from sa_kit.models import ConditionalVAE
from sa_kit.objective import ewc_penalty, sa_loss
from sa_kit.replay import GenerativeReplay, frozen_copy


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a)


def test_fast_fisher_equals_per_sample_reference():
    torch.manual_seed(0)
    vae = ConditionalVAE()                       # the paper's 784-512-256, z=8 cVAE
    c = torch.arange(10).repeat(3)
    x = vae.sample(c)
    noise = vae.draw_noise(x)
    ref = fisher_per_sample(vae, x, c, noise)
    fast = fisher_fast(vae, x, c, noise)
    assert set(ref) == set(fast) == {k for k, _ in vae.named_parameters()}
    assert _max_rel_diff(ref, fast) <= 1e-4


def test_vmap_path_equals_reference_for_non_linear_parameters(tiny_vae):
    class WithScale(ConditionalVAE):                  # a parameter outside any nn.Linear
        def __init__(self):
            super().__init__(h_dims=(32, 16), z_dim=4)
            self.scale = torch.nn.Parameter(torch.tensor(1.3))

        def neg_elbo(self, x, c, noise=None):
            return super().neg_elbo(x, c, noise) * self.scale

    model = WithScale()
    c = torch.arange(10)
    x = model.sample(c)
    noise = model.draw_noise(x)
    assert _max_rel_diff(fisher_per_sample(model, x, c, noise),
                         fisher_fast(model, x, c, noise)) <= 1e-4


def test_ewc_penalty_is_zero_at_theta_star_and_has_gradient_2_lambda_F_delta(tiny_vae):
    theta_star = {k: p.detach().clone() for k, p in tiny_vae.named_parameters()}
    fisher = {k: torch.rand_like(p) for k, p in tiny_vae.named_parameters()}
    assert float(ewc_penalty(tiny_vae, fisher, theta_star).detach()) == 0.0
    with torch.no_grad():
        for p in tiny_vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    lmbda = 7.0
    (lmbda * ewc_penalty(tiny_vae, fisher, theta_star)).backward()
    for k, p in tiny_vae.named_parameters():
        expected = 2 * lmbda * fisher[k] * (p.detach() - theta_star[k])   # no 1/2 (official)
        torch.testing.assert_close(p.grad, expected)


def test_sa_loss_is_the_weighted_sum_of_its_terms(tiny_vae):
    theta_star = {k: p.detach().clone() + 0.01 for k, p in tiny_vae.named_parameters()}
    fisher = {k: torch.ones_like(p) for k, p in tiny_vae.named_parameters()}
    x, c = torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)
    xr, cr = torch.rand(8, 1, 28, 28), torch.ones(8, dtype=torch.long)
    torch.manual_seed(1)
    t = sa_loss(tiny_vae, (x, c), (xr, cr), fisher, theta_star, lmbda=3.0, gamma=0.5)
    total = 8 * t["surrogate"] + 0.5 * 8 * t["replay"] + 3.0 * t["ewc"]
    torch.testing.assert_close(t["loss"].detach(), total, rtol=1e-5, atol=1e-3)
    assert t["ewc"] > 0


def test_replay_never_yields_the_forgotten_class(tiny_vae):
    replay = GenerativeReplay(frozen_copy(tiny_vae), num_classes=10, forget_class=3)
    x, c = replay.sample(2000)
    assert x.shape == (2000, 1, 28, 28) and 3 not in c.tolist()
    assert set(c.tolist()) == set(range(10)) - {3}
    buffered = GenerativeReplay(frozen_copy(tiny_vae), 10, 3, buffer_size=300)
    assert 3 not in buffered.sample(500)[1].tolist()


def test_mappings_give_the_right_shapes_values_and_labels(tiny_vae, tmp_path):
    frozen = frozen_copy(tiny_vae)
    noise = make_mapping("noise", 0, frozen, 10)
    assert isinstance(noise, UniformNoise)
    x, c = noise.sample(16)
    assert x.shape == (16, 1, 28, 28) and (c == 0).all() and 0 <= x.min() and x.max() <= 1
    to_six = make_mapping(6, 0, frozen, 10)
    assert isinstance(to_six, ClassMapping) and isinstance(make_mapping("6", 0, frozen, 10),
                                                           ClassMapping)
    x, c = to_six.sample(5)
    assert x.shape == (5, 1, 28, 28) and (c == 0).all()
    imgs = torch.rand(4, 1, 28, 28)
    x, c = make_mapping(imgs, 2, frozen, 10).sample(9)
    assert x.shape == (9, 1, 28, 28) and (c == 2).all()
    assert all(any(torch.equal(xi, im) for im in imgs) for xi in x)
    from PIL import Image
    for i in range(3):
        Image.fromarray((torch.rand(40, 30) * 255).to(torch.uint8).numpy()).save(tmp_path / f"{i}.png")
    folder = make_mapping(str(tmp_path), 1, frozen, 10)
    assert isinstance(folder, ImageMapping) and folder.images.shape == (3, 1, 28, 28)


def test_offline_mnist_is_real_and_class_balanced():
    from sa_kit.data import load_mnist
    data = load_mnist(source="auto", verbose=False)  # SA_KIT_OFFLINE=1: the embedded digits
    assert "embedded" in data.source and data.x.shape == (5000, 1, 28, 28)
    assert torch.bincount(data.y).tolist() == [500] * 10
    assert 0 <= data.x.min() and data.x.max() <= 1
    train, test = data.split(0.1, seed=0)
    assert len(test) == 500 and len(train) == 4500
    counts = torch.bincount(test.y, minlength=10)
    assert counts.min() >= 30                       # shuffled before splitting, not sorted


def test_fisher_save_load_roundtrip_and_model_fisher(tiny_vae, tmp_path):
    fisher = model_fisher(tiny_vae, range(10), num_samples=64, batch_size=32, progress=False)
    check_fisher(fisher, tiny_vae)
    assert all((v >= 0).all() for v in fisher.values())
    save_fisher(tmp_path / "f.safetensors", fisher, tiny_vae)
    loaded = load_fisher(tmp_path / "f.safetensors", tiny_vae)
    assert all(torch.equal(loaded[k], fisher[k]) for k in fisher)


def _forget(model, fisher_, **kw):
    args = dict(fisher=fisher_, mapping="noise", lmbda=1.0, gamma=1.0, steps=3, batch_size=8,
                progress=False)
    args.update(kw)
    c_f = args.pop("c_f", 0)
    return forget_one_class(model, c_f, **args)


@pytest.fixture
def tiny_fisher(tiny_vae):
    return {k: torch.ones_like(p) for k, p in tiny_vae.named_parameters()}


def test_fisher_for_another_model_is_refused(tiny_vae, tiny_fisher, tmp_path):
    missing = dict(tiny_fisher)
    missing.pop("fc1.weight")
    extra = {**tiny_fisher, "unet.conv_in.weight": torch.ones(3)}
    shaped = {**tiny_fisher, "fc2.weight": torch.ones(5, 5)}
    for bad, word in ((missing, "missing"), (extra, "unexpected"), (shaped, "wrong shape")):
        with pytest.raises(ValueError, match=word):
            _forget(tiny_vae, bad)
    other = ConditionalVAE(h_dims=(64, 16), z_dim=4)
    save_fisher(tmp_path / "other.safetensors", {k: torch.ones_like(p) for k, p in
                                                 other.named_parameters()}, other)
    with pytest.raises(ValueError, match="another model"):
        load_fisher(tmp_path / "other.safetensors", tiny_vae)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_weights(tiny_vae, tiny_fisher):
    calls = {"n": 0}
    original = tiny_vae.neg_elbo

    def poisoned(x, c, noise=None):      # the 3rd loss evaluation (step 2's surrogate) is NaN
        calls["n"] += 1
        out = original(x, c, noise)
        return out * float("nan") if calls["n"] == 3 else out

    tiny_vae.neg_elbo = poisoned
    seen = {}
    cb = lambda step, hist, m: seen.update({k: p.detach().clone()  # noqa: E731
                                            for k, p in m.named_parameters()})
    with pytest.raises(NonFiniteLossError, match="last good step"):
        _forget(tiny_vae, tiny_fisher, callbacks=[cb])
    for k, p in tiny_vae.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p, seen[k])


def test_history_has_every_term_and_the_surrogate_term_falls(tiny_vae, tiny_fisher):
    hist = _forget(tiny_vae, tiny_fisher, steps=60, batch_size=32, lr=1e-3)
    assert {"loss", "surrogate", "replay", "ewc", "step", "seconds"} <= set(hist)
    assert len(hist["loss"]) == 60 and hist["step"][-1] == 60
    assert sum(hist["surrogate"][-5:]) < sum(hist["surrogate"][:5])


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tiny_fisher, tmp_path):
    def run(steps_first: int | None, ckpt):
        torch.manual_seed(0)
        model = ConditionalVAE(h_dims=(32, 16), z_dim=4)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(1)
        if steps_first is not None:                          # a run cut short ...
            with pytest.raises(KeyboardInterrupt):
                _forget(model, tiny_fisher, steps=10, checkpoint_dir=ckpt, checkpoint_every=4,
                        callbacks=[lambda s, h, m: s == steps_first and
                                   (_ for _ in ()).throw(KeyboardInterrupt)])
            model.load_state_dict(original)                  # ... restarted from scratch
        hist = _forget(model, tiny_fisher, steps=10, checkpoint_dir=ckpt, checkpoint_every=4)
        return model.state_dict(), hist

    full, hist_full = run(None, tmp_path / "a")
    resumed, hist_resumed = run(6, tmp_path / "b")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)
    assert hist_resumed["loss"] == hist_full["loss"]
