"""Chapter 4's probes (sa_kit.probes) and tables (sa_kit.chapters.is_it_forgotten).

Small random models, a few seconds in all: each probe is checked against an independent
re-implementation of what it computes, and for what it must leave untouched.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sa_kit import probes
from sa_kit.chapters import is_it_forgotten as C
from sa_kit.models.classifier import MNISTClassifier
from sa_kit.models.cvae import ConditionalVAE
from sa_kit.profiles import get_profile


@pytest.fixture()
def cvae():
    torch.manual_seed(0)
    return ConditionalVAE(h_dims=(64, 32), z_dim=4)


@pytest.fixture()
def clf():
    torch.manual_seed(1)
    return MNISTClassifier()


def test_recovery_rate_counts_samples_at_or_above_the_threshold():
    assert probes.recovery_rate(torch.tensor([0.1, 0.5, 0.49, 0.9])) == 0.5
    assert probes.recovery_rate(torch.tensor([0.3, 0.35]), threshold=0.3) == 1.0


def test_sample_nll_is_the_official_cvae_loss_with_the_same_noise(cvae):
    x = torch.rand(6, 1, 28, 28)
    c = torch.tensor([0, 1, 2, 3, 4, 5])
    got = probes.sample_nll(cvae, x, c, repeats=2, seed=3)
    want = torch.zeros(6)
    for r in range(2):                        # vae/model.py: loss_function, per sample
        torch.manual_seed(3 * 1000 + r)
        eps = torch.randn(6, cvae.z_dim)
        with torch.no_grad():
            onehot = F.one_hot(c, 10).float()
            h = F.relu(cvae.fc2(F.relu(cvae.fc1(torch.cat([x.flatten(1), onehot], 1)))))
            mu, logvar = cvae.fc_mu(h), cvae.fc_logvar(h)
            z = mu + eps * torch.exp(0.5 * logvar)
            logits = cvae.fc6(F.relu(cvae.fc5(F.relu(cvae.fc4(torch.cat([z, onehot], 1))))))
            bce = F.binary_cross_entropy(torch.sigmoid(logits), x.flatten(1),
                                         reduction="none").sum(1)
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), 1)
        want += (bce + kld) / 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_the_cvae_decoder_reads_a_relaxed_one_hot_as_the_one_hot(cvae):
    z = torch.randn(3, cvae.z_dim)
    c = torch.tensor([2, 7, 9])
    torch.testing.assert_close(cvae.decode_logits(z, c),
                               cvae.decode_logits(z, F.one_hot(c, 10).float()))


def test_condition_inversion_raises_p_cf_and_leaves_the_models_alone(cvae, clf):
    before = {k: v.clone() for k, v in {**cvae.state_dict(), **clf.state_dict()}.items()}
    start = probes.invert_relaxed_condition(cvae, clf, 3, samples=8, steps=1, lr=1e-9)
    out = probes.invert_relaxed_condition(cvae, clf, 3, samples=8, steps=40, lr=0.1)
    assert out["curve"][-1] > start["curve"][0]
    assert out["condition"].shape == (10,) and math.isclose(float(out["condition"].sum()), 1,
                                                            rel_tol=1e-5)
    after = {**cvae.state_dict(), **clf.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in cvae.parameters())      # restored
    assert out["recovery"] == probes.recovery_rate(out["p_forget"])


def test_learn_embedding_row_moves_one_row_only_and_fits_it():
    torch.manual_seed(0)
    emb = nn.Embedding(5, 3)
    target = torch.tensor([1.0, -2.0, 0.5])
    other = emb.weight.detach().clone()
    curve = probes.learn_embedding_row(
        emb, 2, lambda step: ((emb(torch.tensor([2])) - target) ** 2).sum(), steps=300, lr=0.05,
        init=torch.zeros(3))
    assert curve[-1] < 1e-3 < curve[0]
    torch.testing.assert_close(emb.weight[2].detach(), target, atol=0.03, rtol=0)
    keep = [0, 1, 3, 4]
    assert torch.equal(emb.weight[keep].detach(), other[keep])
    with pytest.raises(ValueError, match="row must be in 0..4"):
        probes.learn_embedding_row(emb, 5, lambda s: emb.weight.sum(), steps=1)


def test_relearn_checks_at_the_given_steps_and_stops_at_the_threshold(cvae):
    x, c = torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    calls = []

    def judge(model):                 # rises by 0.2 per check: 0.1, 0.3, 0.5, ...
        calls.append(1)
        return 0.1 + 0.2 * (len(calls) - 1)

    out = probes.relearn(cvae, x, c, judge, checks=(5, 10, 20, 40), lr=1e-3)
    assert [s for s, _ in out["curve"]] == [0, 5, 10]
    assert out["steps"] == 10
    assert not all(torch.equal(a, b) for a, b in zip(cvae.parameters(),
                                                     out["model"].parameters()))
    never = probes.relearn(cvae, x, c, lambda m: 0.0, checks=(2,), lr=1e-3)
    assert never["steps"] is None and [s for s, _ in never["curve"]] == [0, 2]


def test_the_unconditional_guidance_weight_ignores_the_label():
    from sa_kit.chapters.ddpm_digits import make_ddpm
    torch.manual_seed(0)
    ddpm = make_ddpm(get_profile("ci").ddpm, image_size=16)
    ddpm.num_inference_steps = 2
    draw = lambda k, w: ddpm.sample(torch.full((2,), k), guidance_scale=w,  # noqa: E731
                                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draw(0, 0.0), draw(7, 0.0))
    assert not torch.allclose(draw(0, 3.0), draw(7, 3.0))
    clf = MNISTClassifier(3, 10)
    out = probes.guidance_sweep(ddpm, clf, 0, scales=(0.0, 1.0), samples=2)
    assert set(out) == {0.0, 1.0} and all(0 <= r["P_cf"] <= 1 for r in out.values())


def test_summarise_gives_mean_std_and_counts_unrecovered_seeds():
    rows = {"SA": [{"P(c_f)": 0.1, "relearn k=1": 5}, {"P(c_f)": 0.3, "relearn k=1": None}],
            "retrained": [{"P(c_f)": 0.0, "relearn k=1": None}, {"P(c_f)": 0.0,
                                                                  "relearn k=1": None}]}
    s = C.summarise(rows, ["P(c_f)", "relearn k=1"])
    mean, std, n = s["SA"]["P(c_f)"]
    assert math.isclose(mean, 0.2) and math.isclose(std, float(torch.tensor([0.1, 0.3], dtype=torch.float64).std()))
    assert s["SA"]["relearn k=1"] == (5.0, 0.0, 1)
    assert s["retrained"]["relearn k=1"][2] == 0
    text = C.format_table(s, 2)
    assert "never" in text and "(1/2)" in text
    assert "<table>" in C.html_table(s, 2)


def test_the_relearning_explorer_records_runs_and_rejects_bad_input(cvae, clf):
    from sa_kit.data import ImageData
    real = ImageData(torch.rand(6, 1, 28, 28), torch.tensor([0, 0, 0, 1, 1, 1]), "test",
                     tuple(str(i) for i in range(10)))
    sizes = get_profile("ci").probes
    ex = C.RelearnExplorer({"original": cvae}, clf, real, 0, sizes)
    out = ex.run("original", 2, 1e-3)
    assert out["curve"][0][0] == 0 and len(ex.table()) == 1 and "curve" not in ex.table()[0]
    with pytest.raises(ValueError, match="k must be in 1..3"):
        ex.run("original", 4, 1e-3)
    with pytest.raises(ValueError, match="method"):
        ex.run("SA", 1, 1e-3)
    with pytest.raises(ValueError, match="lr must be > 0"):
        ex.run("original", 1, 0.0)


def test_without_class_drops_every_image_of_the_class():
    from sa_kit.data import ImageData
    data = ImageData(torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 0, 2, 1]), "x", ("a", "b", "c"))
    out = C.without_class(data, 0)
    assert out.y.tolist() == [1, 2, 1] and "without class 0" in out.source


def test_the_notebook_set_and_the_headline_set_share_rows(monkeypatch, tmp_path):
    """probe_family computes the profile's seeds; headline=True the headline seeds, reusing the
    notebook's cached rows, and keeps them for headline_rows / the notebook's headline cells."""
    import dataclasses
    monkeypatch.setenv("SA_KIT_CACHE", str(tmp_path))
    probed = []
    models = {"original": nn.Linear(1, 1), "SA": nn.Linear(1, 1)}
    monkeypatch.setattr(C, "_evaluator_and_test", lambda family, profile, progress: (None,) * 3)
    monkeypatch.setattr(C, "cvae_methods", lambda sizes, fc, seed, progress: {
        name: (m, 1.0) for name, m in models.items()})
    monkeypatch.setattr(C, "model_key", lambda model: str(id(model)))
    monkeypatch.setattr(C, "probe_class_conditional",
                        lambda model, clf, train, test, fc, ps, seed:
                        probed.append(seed) or {"P(c_f)": 0.1 * seed})
    ci = get_profile("ci")
    profile = dataclasses.replace(ci, probes=dataclasses.replace(ci.probes, seeds=(0,),
                                                                 headline_seeds=(0, 1, 2)))
    assert C.headline_rows("cvae", profile) is None
    rows = C.probe_family("cvae", profile)
    assert {m: len(r) for m, r in rows.items()} == {"original": 1, "SA": 1} and probed == [0, 0]
    head = C.probe_family("cvae", profile, headline=True)
    assert probed == [0, 0, 1, 1, 2, 2]                   # seed 0's rows came from the cache
    assert [r["P(c_f)"] for r in head["SA"]] == pytest.approx([0.0, 0.1, 0.2])
    assert C.headline_rows("cvae", profile) == head
    assert C.headline_rows("ddpm", profile) is None


def test_training_seconds_reads_the_record_and_says_none_without_one(tmp_path):
    """The text model's training time ('method seconds' of the retrained model) comes from the
    record pipeline_dir writes; a folder built before the record existed reports None ('-')."""
    import json
    from sa_kit.sd import digits as D
    assert D.training_seconds(tmp_path) is None
    (tmp_path / D.TRAINING_RECORD).write_text(json.dumps({"seconds": 412.5}))
    assert D.training_seconds(tmp_path) == 412.5
    s = C.summarise({"retrained": [{"method seconds": None}] * 2}, ["method seconds"])
    assert C.format_table(s, 2).split()[-1] == "-"
