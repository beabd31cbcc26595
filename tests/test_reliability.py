"""Interruptions and damaged caches.

* A chapter-1 forgetting run killed with SIGKILL after a checkpoint resumes from it and ends
  with exactly the weights and loss history of an uninterrupted run with the same seed.
* A truncated, corrupt or config-mismatched cache file is detected, reported (a warning) and
  rebuilt: :func:`sa_kit.io.load_cached`, :func:`sa_kit.io.load_or_train`,
  :func:`sa_kit.mnist.cvae_fisher`.
* Writes are atomic (:func:`sa_kit.io.atomic_write`): a failure, or a SIGKILL, mid-write leaves
  the old file intact.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sa_kit.forget import CHECKPOINT
from sa_kit.forget import forget_one_class as forget_class
from sa_kit.io import atomic_write, config_hash, load_cached, load_or_train, load_tensors, \
    save_tensors
from sa_kit.models import ConditionalVAE
from sa_kit.profiles import MNISTSizes

STEPS, EVERY = 60, 10
HISTORY_KEYS = ("step", "loss", "surrogate", "replay", "ewc")   # all but wall-clock "seconds"

# One chapter-1 forgetting run (tiny cVAE, noise surrogate, replay, EWC) in its own process.
# argv: checkpoint_dir out_file seconds_per_step
WORKER = textwrap.dedent(f"""
    import json, sys, time
    import torch
    from safetensors.torch import save_file
    from sa_kit import seed_everything
    from sa_kit.forget import forget_one_class as forget_class
    from sa_kit.models import ConditionalVAE

    ckpt_dir, out, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    torch.set_num_threads(1)
    seed_everything(0)
    model = ConditionalVAE(h_dims=(32, 16), z_dim=4)
    fisher = {{k: torch.rand_like(p) for k, p in model.named_parameters()}}
    seen = []
    def slow(step, history, m):
        seen.append(step)
        time.sleep(pause)           # gives the test time to kill us mid-run; no effect on math
    history = forget_class(model, 0, fisher=fisher, mapping="noise", lmbda=10.0, gamma=1.0,
                           steps={STEPS}, batch_size=16, lr=1e-3, checkpoint_dir=ckpt_dir,
                           checkpoint_every={EVERY}, callbacks=[slow], progress=False)
    save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, out,
              metadata={{"history": json.dumps(history), "first_step": str(seen[0])}})
""")


def _start(tmp_path: Path, name: str, pause: float) -> tuple[subprocess.Popen, Path, Path]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ckpt_dir, out = tmp_path / f"ckpt-{name}", tmp_path / f"{name}.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt_dir), str(out), str(pause)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, ckpt_dir, out


def _finish(proc: subprocess.Popen, timeout: float = 240) -> None:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output


def _result(out: Path) -> tuple[dict[str, torch.Tensor], dict, int]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(out)), json.loads(meta["history"]), int(meta["first_step"])


@pytest.mark.multiprocess
def test_sigkilled_forgetting_run_resumes_to_the_same_result(tmp_path):
    # The uninterrupted reference run, and the run we are going to kill, side by side.
    ref, _, ref_out = _start(tmp_path, "reference", pause=0.0)
    victim, ckpt_dir, out = _start(tmp_path, "killed", pause=0.1)
    ckpt = ckpt_dir / CHECKPOINT
    deadline = time.monotonic() + 180
    while not ckpt.exists():
        assert victim.poll() is None, "the run ended before writing a checkpoint:\n" + \
            victim.communicate()[0]
        assert time.monotonic() < deadline, "no checkpoint appeared within 180 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not out.exists(), "the killed run must not have finished"
    _, meta = load_tensors(ckpt)              # the checkpoint on disk is complete and readable
    killed_at = int(meta["step"])
    assert 0 < killed_at < STEPS and killed_at % EVERY == 0

    resumed, _, _ = _start(tmp_path, "killed", pause=0.0)     # same checkpoint_dir: resume
    _finish(resumed)
    _finish(ref)
    weights, history, first_step = _result(out)
    ref_weights, ref_history, ref_first = _result(ref_out)
    assert ref_first == 1
    assert first_step > killed_at, "the restarted run should resume, not start over"
    assert set(weights) == set(ref_weights)
    for k in ref_weights:
        assert torch.equal(weights[k], ref_weights[k]), f"{k} differs after resume"
    for k in HISTORY_KEYS:
        assert history[k] == ref_history[k], f"history[{k!r}] differs after resume"
    assert history["step"] == list(range(1, STEPS + 1))


def test_a_checkpoint_from_other_settings_is_refused(tmp_path, tiny_vae):
    fisher = {k: torch.ones_like(p) for k, p in tiny_vae.named_parameters()}
    kw = dict(fisher=fisher, steps=4, batch_size=8, checkpoint_dir=tmp_path, checkpoint_every=2,
              progress=False)
    import copy
    forget_class(copy.deepcopy(tiny_vae), 0, lmbda=1.0, **kw)
    assert (tmp_path / CHECKPOINT).exists()
    with pytest.raises(ValueError, match="other settings"):
        forget_class(copy.deepcopy(tiny_vae), 0, lmbda=2.0, **kw)


# --- damaged cache files ---------------------------------------------------------------------

def _weights_file(path: Path, key: str) -> dict[str, torch.Tensor]:
    tensors = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3)}
    save_tensors(path, tensors, {"kind": "weights", "config_hash": key})
    return tensors


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    path.write_bytes(b"\x00\x01not a safetensors file" * 10)


@pytest.mark.parametrize("damage", [_truncate, _garble, lambda p: p.write_bytes(b"")],
                         ids=["truncated", "garbage", "empty"])
def test_load_cached_reports_an_unreadable_file(tmp_path, damage):
    path = tmp_path / "w.safetensors"
    _weights_file(path, "abc")
    damage(path)
    with pytest.warns(UserWarning, match="unreadable and will be rebuilt"):
        assert load_cached(path, "abc") is None


def test_load_cached_reports_a_file_from_another_config(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = _weights_file(path, "abc")
    loaded = load_cached(path, "abc")
    assert loaded is not None and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with pytest.warns(UserWarning, match="another config"):
        assert load_cached(path, "xyz") is None
    assert load_cached(tmp_path / "missing.safetensors", "abc") is None


def test_load_or_train_rebuilds_a_damaged_or_mismatched_cache(tmp_path, tiny_vae):
    from sa_kit.io import cache_dir

    calls = []

    def train(m, checkpoint_dir):
        calls.append(checkpoint_dir)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5)

    config = {"steps": 3}
    model = load_or_train("tiny", tiny_vae, config, train, verbose=False)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    (path,) = cache_dir().glob("tiny-*.safetensors")
    assert len(calls) == 1

    fresh = lambda: ConditionalVAE(h_dims=(32, 16), z_dim=4)     # noqa: E731
    load_or_train("tiny", fresh(), config, train, verbose=False)  # a clean cache: loaded
    assert len(calls) == 1

    _truncate(path)
    with pytest.warns(UserWarning, match="unreadable"):
        again = load_or_train("tiny", fresh(), config, train, verbose=False)
    assert len(calls) == 2 and load_tensors(path)[1]["config_hash"] in path.name
    on_disk = load_tensors(path)[0]
    assert set(on_disk) == set(trained)
    assert all(torch.equal(on_disk[k], v) for k, v in again.state_dict().items())

    # a file at the right name whose header says another config made it
    save_tensors(path, fresh().state_dict(), {"kind": "weights", "config_hash": "0" * 16})
    with pytest.warns(UserWarning, match="another config"):
        load_or_train("tiny", fresh(), config, train, verbose=False)
    assert len(calls) == 3
    load_or_train("tiny", fresh(), config, train, verbose=False)  # rebuilt file is good again
    assert len(calls) == 3
    assert [p.name for p in cache_dir().iterdir()] == [path.name], "no stray temp files"


def test_cvae_fisher_rebuilds_a_damaged_or_mismatched_cache(tiny_vae):
    from sa_kit.io import cache_dir
    from sa_kit.chapters.mnist_cvae import cvae_fisher

    sizes = MNISTSizes(fisher_samples=20)
    first = cvae_fisher(tiny_vae, sizes, progress=False)
    (path,) = cache_dir().glob("mnist_fisher-*.safetensors")
    stamp = path.stat().st_mtime_ns

    cached = cvae_fisher(tiny_vae, sizes, progress=False)          # reloaded, not recomputed
    assert path.stat().st_mtime_ns == stamp
    assert all(torch.equal(first[k], cached[k]) for k in first)

    _truncate(path)
    with pytest.warns(UserWarning, match="unreadable"):
        rebuilt = cvae_fisher(tiny_vae, sizes, progress=False)
    assert all(torch.equal(first[k], rebuilt[k]) for k in first), "seeded: same Fisher"
    assert load_tensors(path)[1]["kind"] == "fisher"

    save_tensors(path, {k: torch.zeros_like(v) for k, v in first.items()},
                 {"kind": "fisher", "config_hash": config_hash({"someone": "else"})})
    with pytest.warns(UserWarning, match="another config"):
        rebuilt = cvae_fisher(tiny_vae, sizes, progress=False)
    assert all(torch.equal(first[k], rebuilt[k]) for k in first), "zeros must not be reused"


# --- atomic writes ---------------------------------------------------------------------------

def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "artifact.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text('{"version": 1}'))
    assert json.loads(path.read_text()) == {"version": 1}

    def half_then_crash(tmp: str) -> None:
        Path(tmp).write_text('{"version": 2, "trunc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.json"]

    atomic_write(path, lambda tmp: Path(tmp).write_text('{"version": 3}'))
    assert json.loads(path.read_text()) == {"version": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.json"]


def test_save_tensors_failure_keeps_the_old_weights(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = _weights_file(path, "abc")
    with pytest.raises(Exception):
        save_tensors(path, {"w": torch.zeros(2), "not a tensor": "oops"}, {"config_hash": "x"})
    loaded, meta = load_tensors(path)
    assert meta["config_hash"] == "abc" and torch.equal(loaded["w"], tensors["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


@pytest.mark.multiprocess
def test_sigkill_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = _weights_file(path, "old")
    started = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from safetensors.torch import save_file
        from sa_kit.io import atomic_write
        def slow(tmp):
            save_file({{"w": torch.zeros(1000)}}, tmp, metadata={{"sa_kit": "{{}}"}})
            with open(tmp, "r+b") as f:
                f.truncate(100)                       # half written
            Path({str(started)!r}).touch()
            time.sleep(60)
        atomic_write({str(path)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    loaded = load_cached(path, "old")
    assert loaded is not None and torch.equal(loaded["w"], tensors["w"])
