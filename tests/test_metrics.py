"""The paper's metrics, the diversity measures, and the DDPM Fisher driver with its cache."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from sa_kit.metrics import (diversity, entropy, forgetting_metrics, frechet_distance,
                            sample_per_class)


class FixedClassifier(nn.Module):
    """Answers with given logits per input: the first pixel picks the row of ``table``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, x):
        return self.table[x.flatten(1)[:, 0].long()]

    def embed(self, x):
        return x.flatten(1)[:, :3]


def test_entropy_of_a_uniform_prediction_is_ln_k_and_of_a_certain_one_is_0():
    for k in (2, 10, 37):
        assert math.isclose(float(entropy(torch.full((1, k), 1.0 / k))), math.log(k), rel_tol=1e-6)
    assert float(entropy(torch.tensor([[0.0, 1.0, 0.0]]))) == pytest.approx(0.0, abs=1e-9)


def test_p_cf_and_remembered_accuracy_from_known_answers():
    # row 0: certain of class 0; row 1: uniform over 3 classes; row 2: certain of class 2
    big = 50.0
    clf = FixedClassifier(torch.tensor([[big, 0, 0], [0.0, 0, 0], [0, 0, big]]))
    img = lambda row, n: torch.full((n, 1, 2, 2), float(row))  # noqa: E731
    samples = {0: torch.cat([img(0, 3), img(1, 1)]),      # c_f: 3 certain zeros, 1 uniform
               1: img(2, 4),                               # class 1 drawn as a 2: all wrong
               2: img(2, 4)}                               # class 2: all right
    m = forgetting_metrics(clf, samples, forget_class=0, target_class=2)
    assert m["P_cf"] == pytest.approx((3 * 1.0 + 1 / 3) / 4, rel=1e-5)
    assert m["H"] == pytest.approx(math.log(3) / 4, rel=1e-5)
    assert m["P_target"] == pytest.approx(1 / 12, rel=1e-4)
    assert m["acc_per_class"] == {1: 0.0, 2: 1.0} and m["acc_remembered"] == 0.5


def test_frechet_distance_equals_torchmetrics_fid_formula():
    from torchmetrics.image.fid import _compute_fid
    torch.manual_seed(0)
    a, b = torch.randn(400, 6), 0.5 * torch.randn(300, 6) + 1.0
    ours = frechet_distance(a, b)
    ref = float(_compute_fid(a.double().mean(0), torch.cov(a.double().T),
                             b.double().mean(0), torch.cov(b.double().T)))
    assert ours == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="frechet_distance"):
        frechet_distance(a, torch.randn(10, 5))


def test_diversity_falls_when_samples_collapse():
    torch.manual_seed(1)
    spread = {k: torch.randn(50, 4) for k in range(3)}
    collapsed = {k: v[:1].repeat(50, 1) + 0.01 * torch.randn(50, 4) for k, v in spread.items()}
    assert diversity(collapsed) < 0.05 * diversity(spread)
    # two points at distance 2: the mean pairwise distance is 2
    assert diversity({0: torch.tensor([[0.0, 0.0], [2.0, 0.0]])}) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2"):
        diversity({0: torch.zeros(1, 2)})


def test_forgetting_metrics_add_diversity_and_frechet_against_real_images():
    clf = FixedClassifier(torch.eye(3) * 10)
    torch.manual_seed(2)
    samples = {k: torch.rand(20, 1, 3, 3) for k in range(3)}
    real = {k: torch.rand(20, 1, 3, 3) for k in range(3)}
    m = forgetting_metrics(clf, samples, 0, real=real)
    assert m["diversity"] > 0 and m["frechet"] >= 0


def test_sample_per_class_draws_n_of_each():
    class Model(nn.Module):
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def sample(self, c):
            return c.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2)

    out = sample_per_class(Model(), range(3), 7, batch_size=3)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (7, 1, 2, 2) for k in range(3)}
    assert all((v == k).all() for k, v in out.items())


def test_naive_forget_is_the_papers_eq3_with_replay_and_ewc(tiny_vae):
    """Term (1) maximises -log p of c_f's own samples; replay and EWC stay; the loss falls
    without a floor (it runs far below zero, or to -inf, reported as NonFiniteLossError)."""
    from sa_kit.forget import NonFiniteLossError, naive_forget
    fisher = {k: torch.ones_like(p) for k, p in tiny_vae.named_parameters()}
    try:
        hist = naive_forget(tiny_vae, 0, fisher=fisher, lmbda=1.0, gamma=1.0, steps=40,
                            batch_size=16, lr=1e-2, progress=False)
    except NonFiniteLossError as e:
        hist = e.history
    assert hist["loss"][-1] < hist["loss"][0] - 100           # unbounded below
    assert all(r > 0 for r in hist["replay"]) and any(e > 0 for e in hist["ewc"])


def test_ddpm_fisher_driver_and_its_cache(tmp_path):
    import dataclasses

    from sa_kit.chapters.ddpm_digits import ddpm_fisher
    from sa_kit.io import cache_dir
    from sa_kit.models.ddpm import ClassConditionalDDPM, build_unet
    from sa_kit.profiles import get_profile
    torch.manual_seed(0)
    unet = build_unet(10, image_size=8, in_channels=3, block_out_channels=(8, 16),
                      norm_num_groups=4)
    model = ClassConditionalDDPM(unet, 10, num_inference_steps=2)
    sizes = dataclasses.replace(get_profile("ci").ddpm, fisher_samples=10, fisher_timesteps=4)
    first = ddpm_fisher(model, sizes, progress=False)
    (path,) = cache_dir().glob("ddpm-fisher-*.safetensors")
    stamp = path.stat().st_mtime_ns
    again = ddpm_fisher(model, sizes, progress=False)
    assert path.stat().st_mtime_ns == stamp and all(torch.equal(first[k], again[k]) for k in first)
    path.write_bytes(path.read_bytes()[:100])                  # truncated: reported, rebuilt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = ddpm_fisher(model, sizes, progress=False)
    assert any("unreadable" in str(w.message) for w in caught)
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)
    with torch.no_grad():                                       # other weights: another file
        model.unet.conv_in.weight.add_(1.0)
    ddpm_fisher(model, sizes, progress=False)
    assert len(list(cache_dir().glob("ddpm-fisher-*.safetensors"))) == 2
