"""The front doors: every command checks its arguments before any work and answers bad input in
one clear line (exit status 2, no traceback, within seconds); the demo exits 0 on a completed
run; Ctrl-C and SIGTERM keep a checkpoint that the next run resumes from.

Each bad invocation runs as a real subprocess, as a user would type it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SECONDS = 60          # a generous bound for "returned within seconds": python + torch start-up


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SA_KIT_CACHE": str(tmp / "cache"), "SA_KIT_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "SA_KIT_PROFILE": "ci", "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


_NAMES = iter(range(10**6))


def _sd_config(tmp: Path, name: str | None = None, **kw: object) -> str:
    cfg = {"output_dir": str(tmp / "out"), "model": "tiny", "steps": 2, "num_surrogate": 2,
           "num_replay": 2, "gen_steps": 2, "batch_size": 1, "effective_batch": 1}
    cfg.update(kw)
    path = tmp / (name or f"run{next(_NAMES)}.yaml")
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()) + "\n")
    return str(path)


def _catalogue(tmp: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """name -> (command, extra environment, words the one-line message must contain)."""
    (tmp / "a_file").write_text("not a folder")
    (tmp / "not_a_pipeline").mkdir()
    ddpm_folder = tmp / "ddpm_pipeline"
    ddpm_folder.mkdir()
    (ddpm_folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    (tmp / "bad.yaml").write_text("output_dir: [unclosed\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "half_run").mkdir()
    demo = [PY, "-m", "sa_kit.demo"]
    forget = [PY, "-m", "sa_kit.sd.forget", "--config"]
    evaluate = [PY, "-m", "sa_kit.sd.evaluate", "--run"]
    dataset = [PY, "-m", "sa_kit.sd.dataset"]
    unwritable = str(tmp / "a_file" / "cache")         # a folder below a file: cannot exist
    return {
        "demo: class 12": (demo + ["--forget-class", "12"], {}, "--forget-class must be a digit"),
        "demo: class -1": (demo + ["--forget-class", "-1"], {}, "--forget-class"),
        "demo: class not a number": (demo + ["--forget-class", "x"], {}, "invalid int value"),
        "demo: unknown mapping": (demo + ["--map-to", "blur"], {}, "--map-to must be 'noise'"),
        "demo: mapped onto itself": (demo + ["--map-to", "0"], {}, "forgotten digit itself"),
        "demo: mapping out of range": (demo + ["--map-to", "10"], {}, "--map-to"),
        "demo: unknown profile flag": (demo + ["--profile", "laptop"], {},
                                       "profile must be one of ci, cpu, gpu"),
        "demo: unknown SA_KIT_PROFILE": (demo, {"SA_KIT_PROFILE": "laptop"},
                                         "SA_KIT_PROFILE must be one of ci, cpu, gpu"),
        "demo: unwritable SA_KIT_CACHE": (demo, {"SA_KIT_CACHE": unwritable}, "SA_KIT_CACHE"),
        "demo: bad SA_KIT_OFFLINE": (demo, {"SA_KIT_OFFLINE": "maybe"}, "SA_KIT_OFFLINE"),
        "demo: negative seed": (demo + ["--seed", "-3"], {}, "--seed"),
        "demo: unknown option": (demo + ["--fast"], {}, "unrecognized arguments"),
        "forget-sd: missing config": (forget + [str(tmp / "missing.yaml")], {},
                                      "does not exist"),
        "forget-sd: invalid YAML": (forget + [str(tmp / "bad.yaml")], {}, "not valid YAML"),
        "forget-sd: config not a mapping": (forget + [str(tmp / "list.yaml")], {},
                                            "key: value pairs"),
        "forget-sd: a word for a number": (forget + [_sd_config(tmp, lr="fast")], {},
                                           "lr must be a number"),
        "forget-sd: a word for a boolean": (
            forget + [_sd_config(tmp), "gradient_checkpointing=maybe"], {},
            "gradient_checkpointing must be true/false"),
        "forget-sd: unknown key": (forget + [_sd_config(tmp, lamda=3)], {},
                                   "unknown config key(s) lamda"),
        "forget-sd: unknown train_method": (forget + [_sd_config(tmp), "train_method=all"], {},
                                            "train_method must be one of"),
        "forget-sd: negative lambda": (forget + [_sd_config(tmp), "lmbda=-1"], {}, "lmbda"),
        "forget-sd: fractional steps": (forget + [_sd_config(tmp), "steps=2.5"], {},
                                        "steps must be an integer"),
        "forget-sd: setting without =": (forget + [_sd_config(tmp), "steps"], {},
                                         "settings are key=value"),
        "forget-sd: batch does not divide": (
            forget + [_sd_config(tmp), "batch_size=3", "effective_batch=16"], {},
            "effective_batch"),
        "forget-sd: missing fisher_path": (
            forget + [_sd_config(tmp), f"fisher_path={tmp / 'f.safetensors'}"], {},
            "fisher_path"),
        "forget-sd: no output_dir": (forget + [_sd_config(tmp, output_dir="")], {},
                                     "output_dir is required"),
        "forget-sd: unknown stage": (forget + [_sd_config(tmp), "--stage", "all"], {},
                                     "invalid choice"),
        "forget-sd: folder is not a pipeline": (
            forget + [_sd_config(tmp, model=str(tmp / "not_a_pipeline"))], {},
            "not a diffusers pipeline"),
        "forget-sd: a config made for another model": (
            forget + [_sd_config(tmp, model=str(ddpm_folder))], {},
            "not a Stable Diffusion one"),
        "forget-sd: hub model offline": (
            forget + [_sd_config(tmp, model="CompVis/stable-diffusion-v1-4")], {},
            "not in the Hugging Face cache"),
        "forget-sd: unwritable SA_KIT_CACHE": (forget + [_sd_config(tmp)],
                                               {"SA_KIT_CACHE": unwritable}, "SA_KIT_CACHE"),
        "evaluate-sd: missing run": (evaluate + [str(tmp / "missing")], {}, "is not a folder"),
        "evaluate-sd: unfinished run": (evaluate + [str(tmp / "half_run")], {},
                                        "no config.json"),
        "evaluate-sd: zero prompts": (evaluate + [str(tmp / "half_run"), "--num-prompts", "0"],
                                      {}, "no config.json"),
        "sd-dataset: zero prompts": (dataset + ["--out", str(tmp / "ds"), "--num-prompts", "0"],
                                     {}, "--num-prompts must be a positive integer"),
        "sd-dataset: out is a file": (dataset + ["--out", str(tmp / "a_file")], {},
                                      "exists and is not a folder"),
        "sd-dataset: unknown model": (dataset + ["--out", str(tmp / "ds"), "--model", "nope"],
                                      {}, "neither 'tiny', 'digits'"),
        "sa-kit: unknown command": ([PY, "-m", "sa_kit.cli", "train"], {}, "unknown command"),
    }


def _run(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=SECONDS * 3)
    return res, time.perf_counter() - start


@pytest.mark.slow
def test_every_bad_invocation_exits_2_with_one_clear_line(tmp_path):
    cases = _catalogue(tmp_path)
    assert len(cases) >= 25
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(lambda c: _run(c[0], _env(tmp_path, **c[1])),
                                           cases.values())))
    problems = []
    for name, (res, seconds) in results.items():
        words = cases[name][2]
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        if res.returncode != 2 or "Traceback" in res.stderr + res.stdout or len(lines) != 1 \
                or words not in lines[0] or seconds > SECONDS:
            problems.append(f"{name}: exit {res.returncode}, {seconds:.0f} s, stderr "
                            f"{res.stderr.strip()[-300:]!r}")
    assert not problems, "\n".join(problems)
    assert not (tmp_path / "out").exists(), "nothing was written before the checks"
    assert not any((tmp_path / "cache").glob("*.safetensors")), "nothing was trained"


@pytest.mark.slow
def test_demo_completes_with_exit_0_and_names_its_settings(tmp_path):
    env = _env(tmp_path)
    res = subprocess.run([PY, "-m", "sa_kit.demo", "--forget-class", "3", "--map-to", "noise"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "forgetting digit 3 -> noise" in out.splitlines()[0]
    assert "targets:" in out and ("[met]" in out or "[MISSED]" in out)
    assert "published (Heng & Soh 2023)" not in out   # published numbers: digit 0 only
    strict = subprocess.run([PY, "-m", "sa_kit.demo", "--forget-class", "3", "--strict"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert strict.returncode == (1 if "[MISSED]" in strict.stdout else 0)


# --- interruption: SIGINT / SIGTERM keep the last finished step ------------------------------

def _forget_cmd(cfg: str) -> list[str]:
    return [PY, "-m", "sa_kit.sd.forget", "--config", cfg]


def _wait_for(path: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.2)


FORGET_RUN = dict(steps=400, checkpoint_every=1000, lmbda=0.5, fisher_timesteps=4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The reference: the same forgetting run, start to end, and its shared data folder."""
    tmp = tmp_path_factory.mktemp("whole")
    env = _env(tmp)
    cfg = _sd_config(tmp, "whole.yaml", output_dir=str(tmp / "whole"),
                     data_dir=str(tmp / "data"), **FORGET_RUN)
    res = subprocess.run(_forget_cmd(cfg), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return tmp, env


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_forgetting_command_resumes_to_the_same_result(uninterrupted, tmp_path, sig):
    from safetensors.torch import load_file
    whole, env = uninterrupted
    part = _sd_config(tmp_path, "part.yaml", output_dir=str(tmp_path / "part"),
                      data_dir=str(whole / "data"), **FORGET_RUN)   # data and Fisher: cached
    proc = subprocess.Popen(_forget_cmd(part), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(7)                                        # loaded, and inside the 400 steps
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Run the same command again to resume" in out + err
    ckpt = tmp_path / "part" / "checkpoints" / "checkpoint.safetensors"
    assert ckpt.exists() and not (tmp_path / "part" / "pipeline").exists()
    res = subprocess.run(_forget_cmd(part), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "resumed from" in res.stdout + res.stderr, res.stderr[-2000:]
    unet = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"
    a, b = load_file(str(whole / "whole" / unet)), load_file(str(tmp_path / "part" / unet))
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, sig):
    """The demo's cVAE training, stopped mid-way, resumes from its checkpoint to the same model."""
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\n"
        "from sa_kit.chapters.mnist_cvae import mnist_splits, pretrained_cvae\n"
        "from sa_kit.profiles import get_profile\n"
        "train, _ = mnist_splits(verbose=False)\n"
        "pretrained_cvae(train, get_profile('ci').mnist, progress=False)\n")
    env = _env(tmp_path, SA_KIT_CACHE=str(tmp_path / "a"))
    assert subprocess.run([PY, str(script)], env=env, timeout=600).returncode == 0
    env_b = _env(tmp_path, SA_KIT_CACHE=str(tmp_path / "b"))
    proc = subprocess.Popen([PY, str(script)], env=env_b, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(8)                                        # training is under way
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Run the same command again to resume" in out + err
    assert list((tmp_path / "b").glob("mnist_cvae-*.partial/train_checkpoint.safetensors"))
    assert not list((tmp_path / "b").glob("mnist_cvae-*.safetensors"))
    assert subprocess.run([PY, str(script)], env=env_b, timeout=600).returncode == 0
    from safetensors.torch import load_file
    (a,) = (tmp_path / "a").glob("mnist_cvae-*.safetensors")
    (b,) = (tmp_path / "b").glob("mnist_cvae-*.safetensors")
    wa, wb = load_file(str(a)), load_file(str(b))
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert not list((tmp_path / "b").glob("*.partial")), "the checkpoint folder is cleaned up"


# --- disk trouble ----------------------------------------------------------------------------

def test_a_full_disk_is_reported_with_the_folder_and_leaves_no_partial_file(tmp_path,
                                                                             monkeypatch):
    import errno

    import torch

    import sa_kit.io as io
    target = tmp_path / "cache" / "w.safetensors"

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(io.CacheDirError, match="SA_KIT_CACHE") as info:
        io.save_tensors(target, {"a": torch.ones(2)})
    assert str(target.parent) in str(info.value) and "No space left" in str(info.value)
    assert list(target.parent.iterdir()) == []
