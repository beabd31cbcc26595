"""``make warm`` builds the caches a chapter then only loads, and says what it took.

Chapter 1's step runs for real with tiny sizes (the ci profile's layout, a few steps each):
afterwards the chapter's own functions load every model from the cache instead of training.
The report (time, disk) is checked on a stand-in step.
"""
from __future__ import annotations

import dataclasses

import pytest

from sa_kit import warm
from sa_kit.profiles import get_profile


def test_every_chapter_has_a_step_named_after_its_notebook():
    assert list(warm.STEPS)[:3] == ["01 cVAE (MNIST)", "02 DDPM", "03 text-to-image"]
    with pytest.raises(ValueError, match="only must name chapters"):
        warm.warm(get_profile("ci"), ["09"])


@pytest.mark.slow
def test_chapter1_step_fills_the_cache_the_chapter_loads_from(capsys, monkeypatch):
    from sa_kit.chapters import mnist_cvae as ch
    called = []                  # its 600 fixed steps are the slow part: checked by call only
    monkeypatch.setattr(ch, "outlier_aware_classifier", lambda *a, **k: called.append(a))
    profile = get_profile("ci")
    tiny = dataclasses.replace(profile.mnist, train_steps=20, classifier_steps=20,
                               fisher_samples=20)
    profile = dataclasses.replace(profile, mnist=tiny)
    seconds = warm.warm(profile, ["01"])
    assert list(seconds) == ["01 cVAE (MNIST)"]
    assert "trained and cached" in capsys.readouterr().out

    assert len(called) == 1
    train, _ = ch.mnist_splits(seed=0, verbose=False)
    vae = ch.pretrained_cvae(train, tiny, progress=False)        # as the notebook calls them
    ch.pretrained_classifier(train, tiny, progress=False)
    out = capsys.readouterr().out
    assert "trained" not in out and out.count("loaded cached weights") == 2, out
    from sa_kit.io import cache_root
    fisher_files = list(cache_root().glob("mnist_fisher*"))
    assert len(fisher_files) == 1
    stamp = fisher_files[0].stat().st_mtime_ns
    ch.cvae_fisher(vae, tiny, progress=False)                     # reused, not recomputed
    assert fisher_files[0].stat().st_mtime_ns == stamp


def test_main_reports_time_and_disk(monkeypatch, tmp_path, capsys):
    def fake_step(profile):
        from sa_kit.io import cache_root
        cache_root().mkdir(parents=True, exist_ok=True)
        (cache_root() / "model.bin").write_bytes(b"\0" * 2**20)
        return ["a model"]

    monkeypatch.setattr(warm, "STEPS", {"01 fake": fake_step})
    assert warm.main(["1"]) == 0
    out = capsys.readouterr().out
    assert "01 fake" in out and "(a model)" in out
    assert "warm in" in out and "the cache holds 1.0 MiB (+1.0 MiB now)" in out
    assert warm.main(["7"]) == 2
