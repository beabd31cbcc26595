"""A catalogue of mistakes a learner or researcher can make, across the three chapters.

Each must end in a clear ``ValueError``/``TypeError`` that names the argument (or in the
documented recovery), never in a raw traceback from deep inside torch.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from sa_kit.fisher import load_fisher, model_fisher, save_fisher
from sa_kit.forget import NonFiniteLossError, forget_one_class
from sa_kit.io import load_cached, save_tensors
from sa_kit.mappings import ImageMapping, make_mapping
from sa_kit.models import ConditionalVAE
from sa_kit.replay import frozen_copy


def _vae() -> ConditionalVAE:
    torch.manual_seed(0)
    return ConditionalVAE(h_dims=(16, 8), z_dim=2)


def _ones(model) -> dict:
    return {k: torch.ones_like(p) for k, p in model.named_parameters()}


def _forget(**kw):
    model = kw.pop("model", None) or _vae()
    args = dict(fisher=_ones(model), mapping="noise", lmbda=1.0, gamma=1.0, steps=2,
                batch_size=4, progress=False)
    args.update(kw)
    return forget_one_class(model, args.pop("c_f", 0), **args)


def _ddpm(channels=(8, 16)):
    from sa_kit.models.ddpm import ClassConditionalDDPM, build_unet
    torch.manual_seed(0)
    unet = build_unet(10, image_size=8, in_channels=3, block_out_channels=channels,
                      norm_num_groups=4)
    return ClassConditionalDDPM(unet, 10, guidance_scale=1.0, num_inference_steps=2)


def _truncated_fisher(tmp: Path):
    model = _vae()
    save_fisher(tmp / "f.safetensors", _ones(model), model)
    data = (tmp / "f.safetensors").read_bytes()
    (tmp / "f.safetensors").write_bytes(data[: len(data) // 2])
    return load_fisher(tmp / "f.safetensors", model)


def _other_model_fisher(tmp: Path):
    other = ConditionalVAE(h_dims=(32, 8), z_dim=2)
    save_fisher(tmp / "other.safetensors", _ones(other), other)
    return load_fisher(tmp / "other.safetensors", _vae())


def _nan_loss(tmp: Path):
    model = _vae()
    model.neg_elbo = lambda x, c, noise=None: torch.full((len(x),), float("nan"))
    return _forget(model=model)


def _wrong_device_fisher(tmp: Path):
    model = _vae()
    return _forget(model=model, fisher={k: v.to("meta") for k, v in _ones(model).items()})


def _sd_config(**kw):
    from sa_kit.sd.config import SDForgetConfig
    return SDForgetConfig(**{"output_dir": "unused", "model": "tiny", **kw})


def _sd_unknown_train_method(tmp: Path):
    from diffusers import UNet2DConditionModel

    from sa_kit.sd.adapter import select_parameters
    from sa_kit.sd.pipeline import TINY_UNET
    return select_parameters(UNet2DConditionModel(**TINY_UNET), "attention-only")


def _sd_empty_prompts(tmp: Path):
    from sa_kit.sd.dataset import build_dataset
    return build_dataset(None, [], tmp / "replay")


def _sd_config_typo(tmp: Path):
    from sa_kit.sd.config import load_config
    (tmp / "run.json").write_text('{"output_dir": "x", "lamda": 5}')
    return load_config(tmp / "run.json")


CASES = {
    # chapter 1 and the shared core
    "forget class out of range": (lambda t: _forget(c_f=10), ValueError, "forget_class"),
    "forget class not an int": (lambda t: _forget(c_f="0"), TypeError, "forget_class"),
    "negative lambda": (lambda t: _forget(lmbda=-1.0), ValueError, "lmbda"),
    "negative gamma": (lambda t: _forget(gamma=-1.0), ValueError, "gamma"),
    "infinite lambda": (lambda t: _forget(lmbda=float("inf")), ValueError, "lmbda"),
    "unknown mapping name": (lambda t: _forget(mapping="gaussian"), ValueError, "unknown mapping"),
    "mapping c_f onto itself": (lambda t: _forget(mapping=0), ValueError, "forget class itself"),
    "mapping target out of range": (lambda t: _forget(mapping=11), ValueError, "mapping target"),
    "mapping images of the wrong rank": (
        lambda t: ImageMapping(0, torch.rand(28, 28)), ValueError, "images must be"),
    "mapping folder without images": (
        lambda t: make_mapping(str(t), 0, frozen_copy(_vae()), 10), ValueError, "no .png"),
    "steps <= 0": (lambda t: _forget(steps=0), ValueError, "steps"),
    "fractional steps": (lambda t: _forget(steps=2.5), ValueError, "steps must be a positive"),
    "gamma as a string": (lambda t: _forget(gamma="1"), TypeError, "gamma must be a number"),
    "batch size <= 0": (lambda t: _forget(batch_size=0), ValueError, "batch_size"),
    "lambda > 0 without a Fisher": (lambda t: _forget(fisher=None), ValueError, "needs a fisher"),
    "Fisher of another model": (_other_model_fisher, ValueError, "another model"),
    "Fisher on another device": (_wrong_device_fisher, ValueError, "fisher is on"),
    "truncated Fisher file": (_truncated_fisher, ValueError, "truncated or corrupt"),
    "NaN loss during forgetting": (_nan_loss, NonFiniteLossError, "last good step"),
    "unknown Fisher estimator": (
        lambda t: model_fisher(_vae(), range(10), 10, estimator="kfac"), ValueError, "estimator"),
    "unknown run profile": (
        lambda t: __import__("sa_kit.profiles").profiles.get_profile("laptop"), ValueError,
        "profile must be one of ci, cpu, gpu"),
    "unknown dataset source": (
        lambda t: __import__("sa_kit.data").data.load_mnist(source="kaggle"), ValueError,
        "source"),
    # chapter 2: the DDPM adapter
    "guidance scale < 0": (lambda t: _ddpm().sample(torch.tensor([0]), guidance_scale=-1.0),
                           ValueError, "guidance_scale"),
    "class outside the embedding": (lambda t: _ddpm().sample(torch.tensor([10])), ValueError,
                                    "0..9"),
    "float class labels": (lambda t: _ddpm().sample(torch.tensor([1.0])), TypeError, "integer"),
    "Fisher of another UNet": (
        lambda t: _forget(model=_ddpm(), fisher=_ones(_ddpm((8, 8))), replay_buffer=4),
        ValueError, "fisher does not match"),
    # chapter 3: Stable Diffusion
    "unknown train_method": (_sd_unknown_train_method, ValueError, "train_method"),
    "unknown train_method in a config": (
        lambda t: _sd_config(train_method="everything"), ValueError, "train_method"),
    "surrogate equal to the forget prompt": (
        lambda t: _sd_config(forget_prompt="brad pitt", surrogate_prompt=" Brad Pitt"),
        ValueError, "surrogate_prompt equals"),
    "empty prompt list": (_sd_empty_prompts, ValueError, "prompts must be a non-empty list"),
    "misspelt config key": (_sd_config_typo, ValueError, "unknown config key"),
    "negative lambda in a config": (lambda t: _sd_config(lmbda=-5.0), ValueError, "lmbda"),
    "a word where a number belongs in a config": (
        lambda t: _sd_config(lr="fast"), ValueError, "lr must be a number"),
    "a word where a boolean belongs in a config": (
        lambda t: _sd_config(gradient_checkpointing="maybe"), ValueError,
        "gradient_checkpointing must be true/false"),
    "a fractional step count in a config": (
        lambda t: _sd_config(steps=2.5), ValueError, "steps must be an integer"),
    "effective batch not a multiple of the batch": (
        lambda t: _sd_config(batch_size=3, effective_batch=16), ValueError,
        "effective_batch"),
    "a fisher_path that does not exist": (
        lambda t: _sd_config(fisher_path=str(t / "nope.safetensors")), ValueError,
        "fisher_path"),
}


def test_the_catalogue_has_at_least_20_cases_over_three_chapters():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_a_clear_error(case, tmp_path):
    call, error, words = CASES[case]
    with pytest.raises(error, match=words) as info:
        call(tmp_path)
    tb = info.traceback[-1]          # raised by sa_kit itself, not deep inside torch
    assert "sa_kit" in str(tb.path), f"{case}: raised from {tb.path}"


def test_unreadable_cache_file_is_reported_and_rebuilt(tmp_path):
    """The documented recovery: a corrupt cache file gives a warning and None (rebuild)."""
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"a": torch.ones(3)}, {"config_hash": "k"})
    path.write_bytes(b"\x00garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_cached(path, "k") is None
    assert any("rebuilt" in str(w.message) for w in caught)
