"""The ``gpu`` profiles and the CLI defaults are the published setups (README: "paper setting ->
kit setting"); every row of that table is checked here, and the table names every row."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from sa_kit.models.ddpm import guidance_from_official
from sa_kit.profiles import PUBLISHED_SD, get_profile
from sa_kit.sd.adapter import NOXATTN_FROZEN
from sa_kit.sd.config import SDForgetConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
GPU = get_profile("gpu")
M, D = GPU.mnist, GPU.ddpm
CELEB, NUDITY = PUBLISHED_SD["celebrity"], PUBLISHED_SD["nudity"]

# (README row, kit value, published value) -- the published value from the official code
ROWS = [
    ("cVAE forgetting steps", M.forget_steps, 10_000),
    ("cVAE batch size", M.forget_batch, 256),
    ("cVAE learning rate", M.forget_lr, 1e-4),
    ("cVAE lambda / gamma", (M.lmbda, M.gamma), (100.0, 1.0)),
    ("cVAE Fisher samples", M.fisher_samples, 50_000),
    ("DDPM guidance (official cond_scale 2)", D.guidance_scale, guidance_from_official(2.0)),
    ("DDPM evaluation sampler", (D.inference_steps, D.eta), (1000, 1.0)),
    ("DDPM EMA for sampling", D.ema_decay, 0.9999),
    ("DDPM dropout", D.dropout, 0.1),
    ("DDPM label dropout (CFG)", D.label_dropout, 0.1),
    ("DDPM UNet", (D.block_out_channels, D.layers_per_block, D.attention_resolutions),
     ((128, 256, 256, 256), 2, (16,))),
    ("DDPM Fisher", (D.fisher_samples // 10, D.fisher_timesteps), (500, None)),
    ("DDPM forgetting steps / batch", (D.forget_steps, D.forget_batch), (20_000, 128)),
    ("DDPM learning rate / gradient clip", (D.forget_lr, D.grad_clip), (1e-4, 1.0)),
    ("DDPM lambda / gamma", (D.lmbda, D.gamma), (10.0, 1.0)),
    ("SD lambda / gamma", (CELEB.lmbda, CELEB.gamma), (50.0, 1.0)),
    ("SD optimiser", CELEB.optimizer, "adamw"),
    ("SD effective batch", CELEB.effective_batch, 16),
    ("SD learning rate", CELEB.learning_rate(), 1e-5 * 16),
    ("SD celebrity run", (CELEB.train_method, CELEB.epochs, CELEB.num_surrogate,
                          CELEB.num_steps()), ("full", 200.0, 1000, 12_500)),
    ("SD nudity run", (NUDITY.train_method, NUDITY.epochs), ("noxattn", 500.0)),
    ("SD prompts", (CELEB.forget_prompt, CELEB.surrogate_prompt, CELEB.prompt_templates),
     ("brad pitt", "a middle aged man", False)),
    ("SD nudity prompts", (NUDITY.forget_prompt, NUDITY.surrogate_prompt),
     ("sexual, nudity, naked, erotic", "people wearing clothes")),
    ("SD Fisher", (CELEB.fisher_timesteps, CELEB.num_replay), (None, 5000)),
    ("SD noxattn frozen", NOXATTN_FROZEN, ("time_embedding.", "conv_norm_out.", "conv_out.")),
]


@pytest.mark.parametrize("row, kit, published", ROWS, ids=[r[0] for r in ROWS])
def test_paper_setting_equals_kit_setting(row, kit, published):
    assert row in README, f"README's 'paper setting -> kit setting' table lacks the row {row!r}"
    if isinstance(published, float):
        assert math.isclose(kit, published, rel_tol=1e-12), (row, kit, published)
    else:
        assert kit == published, (row, kit, published)


def test_cli_defaults_are_the_published_celebrity_run():
    assert SDForgetConfig() == CELEB


def test_profiles_switch_and_reject_unknown_names(monkeypatch):
    monkeypatch.setenv("SA_KIT_PROFILE", "ci")
    assert get_profile().name == "ci"
    monkeypatch.setenv("SA_KIT_PROFILE", "laptop")
    with pytest.raises(ValueError, match="SA_KIT_PROFILE must be one of ci, cpu, gpu; got 'laptop'"):
        get_profile()
    assert get_profile("CPU").name == "cpu"
    with pytest.raises(ValueError, match="profile must be one of"):
        get_profile("tiny")


def test_every_chapter_spells_the_forgetting_settings_the_same_way():
    p = get_profile("cpu")
    for sizes in (p.mnist, p.ddpm):
        for field in ("forget_steps", "forget_batch", "forget_lr", "lmbda", "gamma",
                      "eval_samples", "widget_steps", "train_steps"):
            assert hasattr(sizes, field), (type(sizes).__name__, field)
