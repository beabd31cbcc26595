"""Chapter 3: Selective Amnesia for Stable Diffusion, offline on the tiny random pipeline (CPU).

Every test uses a private cache under pytest's tmp folder and never touches the network.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from sa_kit.diffusion_fisher import diffusion_fisher  # noqa: E402
from sa_kit.io import load_tensors  # noqa: E402
from sa_kit.objective import ForgettableModel  # noqa: E402
from sa_kit.sd import prompts as P  # noqa: E402
from sa_kit.sd.prompts import spec_for  # noqa: E402
from sa_kit.sd.adapter import SDAdapter, is_cross_attention, select_parameters  # noqa: E402
from sa_kit.sd.dataset import LatentDataset, build_dataset  # noqa: E402
from sa_kit.sd.adapter import NOXATTN_FROZEN  # noqa: E402
from sa_kit.sd.config import SDForgetConfig, load_config  # noqa: E402
from sa_kit.sd.fisher import load_unet_fisher, save_unet_fisher, unet_fisher  # noqa: E402
from sa_kit.sd.forget import main, run  # noqa: E402
from sa_kit.sd.pipeline import TINY_UNET, is_tiny, load_pipeline, tiny_pipeline_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("sd_offline")


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return load_pipeline(tiny_dir)


@pytest.fixture(scope="module")
def replay_set(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("replay")
    build_dataset(pipe, P.replay_prompts(6), out, num_inference_steps=2, batch_size=3,
                  progress=False)
    return LatentDataset(out)


def _config(out: Path, model: str, **kw) -> dict:
    cfg = dict(output_dir=str(out), model=model, forget_prompt="brad pitt", train_method="xattn",
               steps=4, batch_size=2, effective_batch=2, lr=1e-3, scale_lr=False,
               num_surrogate=4, num_replay=6, gen_steps=2, gen_batch_size=4,
               fisher_batch_size=3, fisher_timesteps=10, checkpoint_every=2, lmbda=50.0)
    cfg.update(kw)
    return cfg


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


# -- pipeline and prompts ---------------------------------------------------------------------

def test_tiny_pipeline_builds_and_generates_offline():
    pipe = load_pipeline("tiny")  # built in code into this test's cache, reloaded offline
    folder = tiny_pipeline_dir()
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "scheduler"):
        assert (folder / part).exists(), part
    assert is_tiny(pipe) and type(pipe.scheduler).__name__ == "DDIMScheduler"
    gen = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    a = pipe(["a photo of a cat", "a dog"], num_inference_steps=2, generator=gen(),
             output_type="np").images
    b = pipe(["a photo of a cat", "a dog"], num_inference_steps=2, generator=gen(),
             output_type="np").images
    assert a.shape == (2, 32, 32, 3) and (a >= 0).all() and (a <= 1).all()
    assert (a == b).all() and not (a[0] == a[1]).all()


def test_kit_tokenizer_knows_prompt_words(pipe):
    ids = pipe.tokenizer("a photo of brad pitt in a park").input_ids
    assert len(ids) == 2 + 8  # bos + one token per word + eos
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True).strip() == \
        "a photo of brad pitt in a park"


def test_prompt_set_is_deterministic_and_diverse():
    prompts = P.replay_prompts(3000)
    assert prompts == P.replay_prompts(3000) and prompts[:100] == P.replay_prompts(100)
    assert len(set(prompts)) == 3000
    assert P.replay_prompts(50, seed=1) != P.replay_prompts(50, seed=0)
    subjects = {s for s in P.SUBJECTS if any(s + " " in p for p in prompts)}
    assert len(subjects) == len(P.SUBJECTS) >= 50
    assert not any("dog" in p for p in P.replay_prompts(500, exclude=["dog"]))
    # the official, bare pairs; a comma-separated concept picks one of its prompts per image
    assert P.mapping_pairs("brad pitt", "a middle aged man", 3) == \
        [("brad pitt", "a middle aged man")] * 3
    assert {f for f, _ in P.mapping_pairs("sexual, nudity", "people wearing clothes", 50)} == \
        {"sexual", "nudity"}
    pairs = P.mapping_pairs("brad pitt", "a middle aged man", 20, templates=True)
    assert len(set(pairs)) == 20
    assert all(f.replace("brad pitt", "a middle aged man") == s for f, s in pairs)
    assert P.surrogate_for("Brad Pitt") == "a middle aged man"


# -- the adapter ------------------------------------------------------------------------------

def test_adapter_is_a_forgettable_model(pipe, replay_set):
    model = SDAdapter.from_pipeline(pipe, sample_steps=2)
    assert isinstance(model, ForgettableModel)
    assert all(k.startswith("unet.") for k, _ in model.named_parameters())
    x, c = replay_set.latents[:3], model.encode_prompts(replay_set.prompts[:3])
    noise = model.draw_noise(x)
    batched = model.neg_elbo(x, c, noise)
    single = torch.cat([model.neg_elbo(x[i:i + 1], c[i:i + 1], (noise[0][i:i + 1],
                                                               noise[1][i:i + 1]))
                        for i in range(3)])
    assert batched.shape == (3,) and torch.allclose(batched, single, rtol=1e-5, atol=1e-6)
    assert model.sample(["a cat", "a dog"]).shape == (2, 4, 4, 4)


@pytest.mark.parametrize("method", ["full", "xattn", "noxattn"])
def test_train_method_selects_parameters(pipe, method):
    unet = copy.deepcopy(pipe.unet)
    names = set(select_parameters(unet, method))
    every = {k for k, _ in unet.named_parameters()}
    xattn = {k for k in every if is_cross_attention(k)}
    assert xattn and all(".attn2." in k for k in xattn)
    # official noxattn: not cross-attention, not the time embedding, not the output layers
    frozen = {k for k in every if k.startswith(NOXATTN_FROZEN)}
    assert {k.split(".")[0] for k in frozen} == {"time_embedding", "conv_norm_out", "conv_out"}
    expected = {"full": every, "xattn": xattn, "noxattn": every - xattn - frozen}[method]
    assert names == expected
    assert {k for k, p in unet.named_parameters() if p.requires_grad} == expected


# -- Fisher -----------------------------------------------------------------------------------

def test_unet_fisher_is_the_diffusion_fisher_and_independent_of_batching(pipe, replay_set):
    model = SDAdapter.from_pipeline(pipe)
    select_parameters(model.unet, "full")
    x, prompts = replay_set.latents, replay_set.prompts
    batched = unet_fisher(model, x, prompts, seed=3, num_timesteps=20, batch_size=4,
                          progress=False)
    single = unet_fisher(model, x, prompts, seed=3, num_timesteps=20, batch_size=1,
                         progress=False)
    # the one diffusion Fisher of the kit, on the encoded prompts, item ids 0..N-1
    ref = diffusion_fisher(model, x, model.encode_prompts(prompts), 20, seed=3, progress=False)
    assert set(batched) == set(ref) == {k for k, _ in model.named_parameters()}
    for k in ref:   # float32 sums in another order: equal to 1e-6 of the largest entry
        atol = 1e-6 * float(ref[k].abs().max())
        assert torch.allclose(batched[k], ref[k], rtol=1e-4, atol=atol), k
        assert torch.allclose(single[k], ref[k], rtol=1e-4, atol=atol), k
    assert sum(float(v.sum()) for v in batched.values()) > 0


def test_interrupted_fisher_keeps_its_sums_and_resumes(pipe, replay_set, tmp_path, monkeypatch):
    """Ctrl-C during the UNet Fisher: the batches done are kept; the next call finishes them."""
    import sa_kit.sd.fisher as F
    model = SDAdapter.from_pipeline(pipe)
    select_parameters(model.unet, "xattn")
    x, prompts = replay_set.latents, replay_set.prompts
    whole = unet_fisher(model, x, prompts, num_timesteps=4, batch_size=2, progress=False)
    real, calls = F.diffusion_fisher, []

    def interrupt_on_second_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)      # as Ctrl-C: the batch still finishes
        return real(*a, **kw)

    monkeypatch.setattr(F, "diffusion_fisher", interrupt_on_second_batch)
    ckpt = tmp_path / "fisher.partial"
    with pytest.raises(KeyboardInterrupt, match="Run the same command again"):
        unet_fisher(model, x, prompts, num_timesteps=4, batch_size=2, checkpoint=ckpt,
                    progress=False)
    assert (tmp_path / "fisher.partial.rank0").exists() and len(calls) == 2
    monkeypatch.setattr(F, "diffusion_fisher", real)
    calls.clear()
    resumed = unet_fisher(model, x, prompts, num_timesteps=4, batch_size=2, checkpoint=ckpt,
                          progress=False)
    assert not (tmp_path / "fisher.partial.rank0").exists()
    for k in whole:
        assert torch.allclose(whole[k], resumed[k], rtol=1e-5, atol=1e-12), k


def test_fisher_file_roundtrip_and_other_unet_refused(pipe, replay_set, tmp_path):
    from diffusers import UNet2DConditionModel
    model = SDAdapter.from_pipeline(pipe)
    select_parameters(model.unet, "xattn")
    fisher = unet_fisher(model, replay_set.latents, replay_set.prompts, num_timesteps=4,
                         progress=False)
    save_unet_fisher(tmp_path / "f.safetensors", fisher, model)
    loaded = load_unet_fisher(tmp_path / "f.safetensors", model)
    assert all(torch.equal(loaded[k], fisher[k]) for k in fisher)
    torch.manual_seed(1)  # same architecture, other weights
    other = SDAdapter(UNet2DConditionModel(**TINY_UNET), pipe.text_encoder, pipe.tokenizer,
                      pipe.scheduler)
    select_parameters(other.unet, "xattn")
    with pytest.raises(ValueError, match="another UNet"):
        load_unet_fisher(tmp_path / "f.safetensors", other)
    bigger = SDAdapter(UNet2DConditionModel(**{**TINY_UNET, "block_out_channels": (8, 24)}),
                       pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    with pytest.raises(ValueError, match="another UNet"):
        load_unet_fisher(tmp_path / "f.safetensors", bigger)


# -- dataset builder --------------------------------------------------------------------------

def _manifest_items(folder: Path) -> int:
    try:
        return len(json.loads((folder / "manifest.json").read_text())["items"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.multiprocess
def test_dataset_builder_resumes_after_sigkill(pipe, tiny_dir, tmp_path):
    out, n = tmp_path / "killed", 12
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sa_kit.sd.dataset", "--model", tiny_dir,
           "--out", str(out), "--num-prompts", str(n), "--batch-size", "2", "--steps", "2",
           "--sleep", "0.4"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _manifest_items(out) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _manifest_items(out)
    assert 4 <= done_before < n, "the build must be interrupted mid-way"
    build_dataset(pipe, P.replay_prompts(n), out, num_inference_steps=2, batch_size=5,
                  progress=False)
    fresh = tmp_path / "fresh"
    build_dataset(pipe, P.replay_prompts(n), fresh, num_inference_steps=2, batch_size=4,
                  progress=False)
    resumed, reference = LatentDataset(out), LatentDataset(fresh)
    assert len(resumed) == n and resumed.prompts == P.replay_prompts(n)
    assert torch.allclose(resumed.latents, reference.latents, atol=1e-5)
    assert sorted(p.name for p in (out / "items").iterdir()) == \
        [f"{i:06d}.safetensors" for i in range(n)]          # each item once, no temp files
    assert len(list((out / "images").iterdir())) == n
    for f in (out / "items").iterdir():
        load_tensors(f)                                     # none corrupt


# -- the CLI ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_runs_end_to_end_and_resumes(tiny_dir, tmp_path):
    full = tmp_path / "full"
    main(["--config", str(_write(tmp_path / "a.json", _config(full, tiny_dir)))])
    out = load_pipeline(str(full / "pipeline"))
    base = load_pipeline(tiny_dir)
    changed = {k for k, p in out.unet.named_parameters()
               if not torch.equal(p, dict(base.unet.named_parameters())[k])}
    assert changed and all(is_cross_attention(k) for k in changed)  # xattn only
    history = json.loads((full / "history.json").read_text())
    assert history["step"] == [1, 2, 3, 4] and all(map(torch.isfinite, map(torch.tensor,
                                                                            history["loss"])))
    assert len(list((full / "data").glob("fisher-*.safetensors"))) == 1
    # interrupted after step 2, resumed to 4: the same weights as the uninterrupted run
    part = tmp_path / "part"
    yaml = pytest.importorskip("yaml")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(_config(part, tiny_dir, steps=2)))
    run(load_config(tmp_path / "b.yaml"))
    assert (part / "checkpoints" / "checkpoint.safetensors").exists()
    main(["--config", str(tmp_path / "b.yaml"), "steps=4"])
    resumed = load_pipeline(str(part / "pipeline"))
    for (k, p), (_, q) in zip(out.unet.named_parameters(), resumed.unet.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), k
    assert json.loads((part / "history.json").read_text())["loss"] == pytest.approx(
        history["loss"], rel=1e-5)
    from sa_kit.sd.evaluate import main as evaluate_main
    evaluate_main(["--run", str(full), "--num-prompts", "2"])
    report = json.loads((full / "evaluation.json").read_text())
    assert set(report["latent_change"]) == {"forget", "control"}
    assert report["latent_change"]["forget"] > 0 and (full / "before_after.png").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU launch tested on Linux")
@pytest.mark.multiprocess
def test_accelerate_two_processes_same_fisher_and_train(tiny_dir, tmp_path):
    one = run(load_config(_write(tmp_path / "one.json", _config(tmp_path / "one", tiny_dir))),
              stage="fisher")["fisher"]
    cfg = _write(tmp_path / "two.json", _config(tmp_path / "two", tiny_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "29517"]
    # the whole tool on 2 processes: data, sharded Fisher, then 2 DDP steps with checkpointing
    res = subprocess.run(launcher + ["-m", "sa_kit.sd.forget", "--config", str(cfg), "steps=2",
                                     "effective_batch=4", "gradient_checkpointing=true"], env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "history.json").read_text())["step"] == [1, 2]
    assert (tmp_path / "two" / "pipeline" / "unet").is_dir()
    two, meta = load_tensors(next((tmp_path / "two" / "data").glob("fisher-*.safetensors")))
    assert set(two) == set(one) and meta["num_items"] == 6
    for k in one:   # float32 sums reduced across processes: equal to 1e-6 of the largest entry
        atol = 1e-6 * float(one[k].abs().max())
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=atol), k


# -- bad input --------------------------------------------------------------------------------

def test_bad_input_gives_clear_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="train_method"):
        select_parameters(copy.deepcopy(pipe.unet), "attention")
    with pytest.raises(ValueError, match="train_method"):
        SDForgetConfig(**_config(tmp_path, "tiny", train_method="everything"))
    with pytest.raises(ValueError, match="surrogate_prompt equals"):
        SDForgetConfig(**_config(tmp_path, "tiny", surrogate_prompt="Brad Pitt "))
    with pytest.raises(ValueError, match="prompts must be a non-empty"):
        build_dataset(pipe, [], tmp_path / "empty")
    model = SDAdapter.from_pipeline(pipe)
    with pytest.raises(ValueError, match="prompts must be a non-empty"):
        model.encode_prompts([])
    with pytest.raises(ValueError, match="prompts must be a non-empty"):
        unet_fisher(model, torch.zeros(0, 4, 4, 4), [])
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(_write(tmp_path / "bad.json", {**_config(tmp_path, "tiny"), "lamda": 3}))
    with pytest.raises(ValueError, match="no default surrogate"):
        SDForgetConfig(output_dir=str(tmp_path), forget_prompt="a purple cow")
    with pytest.raises(ValueError, match="lmbda"):
        SDForgetConfig(**_config(tmp_path, "tiny", lmbda=-1.0))


# -- explorer and evaluation ------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    """A barely trained coloured-digit pipeline (2 steps): the chapter 3 model's shapes."""
    from sa_kit.sd.digits import T2ISizes, train_pipeline
    sizes = T2ISizes(vae_channels=(8, 8), vae_steps=2, unet_channels=(16, 32), text_width=16,
                     train_steps=2, batch_size=4, num_examples=64)
    return str(train_pipeline(tmp_path_factory.mktemp("digits") / "pipe", sizes,
                              progress=False))


def test_digits_pipeline_carries_its_prompt_spec(digits_dir):
    from sa_kit.sd.digits import SPEC
    spec = spec_for(digits_dir)
    assert spec == SPEC and spec_for("CompVis/stable-diffusion-v1-4") is not SPEC
    pairs = spec.mapping_pairs("seven", "one", 3, seed=0, templates=True)
    assert all("seven" in a and a.replace("seven", "one") == b for a, b in pairs)
    assert not any("seven" in p for p in spec.replay_prompts(50, exclude=["seven"]))
    pipe = load_pipeline(digits_dir)
    assert pipe.tokenizer("a red seven").input_ids[1:4] != [pipe.tokenizer.unk_token_id] * 3


def test_text_to_image_explorer_records_runs(digits_dir, tmp_path):
    import dataclasses

    from sa_kit.profiles import SD
    from sa_kit.sd.digits import DigitColourClassifier
    from sa_kit.sd.explorer import COLUMNS, TextToImageExplorer
    run_cfg = dataclasses.replace(SD["ci"].run, num_surrogate=4, num_replay=4, batch_size=2,
                                  effective_batch=2, fisher_timesteps=2, gen_steps=2)
    explorer = TextToImageExplorer(digits_dir, DigitColourClassifier(width=8).eval(), run_cfg,
                                   steps=2, render_kw={"steps": 2})
    out = explorer.run(lmbda=0.0, train_method="xattn", forget_prompt="seven",
                       surrogate_prompt="one")
    n_xattn = sum(p.numel() for k, p in load_pipeline(digits_dir).unet.named_parameters()
                  if is_cross_attention(k))
    assert out["trained"] == n_xattn and out["history"]["step"] == [1, 2]
    assert 0 <= out["P_forget"] <= 1 and 0 <= out["P_surrogate"] <= 1
    explorer.run(lmbda=1.0, train_method="xattn", forget_prompt="red", surrogate_prompt="blue")
    table = explorer.table()
    assert [r["run"] for r in table] == [0, 1, 2] and table[0]["train_method"] == "(original)"
    assert [r["lmbda"] for r in table] == [None, 0.0, 1.0]
    lines = explorer.to_csv(tmp_path / "runs.csv").splitlines()
    assert lines[0].split(",") == list(COLUMNS) and len(lines) == 4
    assert (tmp_path / "runs.csv").read_text().splitlines() == lines
    with pytest.raises(ValueError, match="forget_prompt must be a digit word"):
        explorer.run(forget_prompt="a purple cow")
    with pytest.raises(ValueError, match="surrogate_prompt equals"):
        explorer.run(forget_prompt="seven", surrogate_prompt="seven")
    with pytest.raises(ValueError, match="train_method"):
        explorer.run(train_method="attn")
    box = explorer.widget()                      # the Run button drives the same method
    box.lambda_slider.value = 0.0
    box.forget.value, box.surrogate.value = "seven", "one"
    box.run_button.click()
    assert len(explorer.table()) == 4 and "done in" in box.status.value
    box.forget.value = "a purple cow"
    box.run_button.click()
    assert "forget_prompt must be" in box.status.value and len(explorer.table()) == 4


def test_evaluation_set_loss_and_grids(pipe, replay_set):
    from sa_kit.sd.evaluate import (before_after, clip_concept_score, grid_figure,
                                    nudenet_counts, output_change, set_loss)
    model = SDAdapter.from_pipeline(pipe)
    a = set_loss(model, replay_set.latents, replay_set.prompts, repeats=2)
    assert a == set_loss(model, replay_set.latents, replay_set.prompts, repeats=2) and a > 0
    ba = before_after(pipe, pipe, ["a photo of brad pitt"], ["a cat", "a dog"], steps=2)
    assert output_change(ba) == {"forget": 0.0, "control": 0.0}  # same pipeline: no change
    assert len(ba["control"]["after_images"]) == 2
    grid_figure(ba, "test")
    try:
        import nudenet  # noqa: F401
    except ImportError:
        assert nudenet_counts(ba["forget"]["after_images"]) is None
    assert clip_concept_score(ba["forget"]["after_images"], "brad pitt", "a man") is None \
        or os.environ.get("HF_HUB_OFFLINE") != "1"


def test_own_surrogate_images_are_pre_encoded(pipe, tiny_dir, tmp_path):
    from PIL import Image
    from sa_kit.sd.dataset import encode_image_folder
    folder = tmp_path / "men"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 48), (60 * i, 100, 30)).save(folder / f"{i}.png")
    encode_image_folder(pipe, folder, tmp_path / "enc", ["a photo of brad pitt", "brad pitt"])
    data = LatentDataset(tmp_path / "enc")
    assert data.latents.shape == (3, 4, 4, 4) and torch.isfinite(data.latents).all()
    assert data.prompts == ["a photo of brad pitt", "brad pitt", "a photo of brad pitt"]
    with pytest.raises(ValueError, match="no .png/.jpg"):
        encode_image_folder(pipe, tmp_path / "enc", tmp_path / "x", ["brad pitt"])
    out = run(SDForgetConfig(**_config(tmp_path / "run", tiny_dir, steps=1,
                                       surrogate_image_dir=str(folder))), stage="data")
    assert len(out["surrogate"]) == 3


def test_cli_mixed_precision_and_gradient_checkpointing(tiny_dir, tmp_path):
    out = run(SDForgetConfig(**_config(tmp_path / "bf16", tiny_dir, steps=2, lmbda=0.0,
                                       train_method="noxattn", mixed_precision="bf16",
                                       gradient_checkpointing=True)))
    assert out["fisher"] is None and out["history"]["step"] == [1, 2]   # lmbda=0: no Fisher
    assert all(map(lambda v: v == v and abs(v) < 1e6, out["history"]["loss"]))
    assert out["adapter"].unet.is_gradient_checkpointing
    assert next(out["adapter"].unet.parameters()).dtype == torch.float32  # fp32 master weights
