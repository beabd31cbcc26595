"""Safe, atomic, self-describing artifacts: weights, Fisher files and checkpoints.

Every tensor file the kit writes is a safetensors file written to a temporary name and renamed
into place (a killed process never leaves half a file behind). Its metadata carries a hash of
the config that produced it, so a stale or corrupt cache is detected and rebuilt instead of
silently reused. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CacheDirError(OSError):
    """The cache directory cannot be created or written (names the folder and SA_KIT_CACHE)."""


def cache_root() -> Path:
    """``$SA_KIT_CACHE``, else ``$XDG_CACHE_HOME/sa_kit``, else ``~/.cache/sa_kit`` (not created)."""
    root = os.environ.get("SA_KIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "sa_kit")
    return Path(root).expanduser()


def check_cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Create the cache folder if needed and prove it is writable, or raise :class:`CacheDirError`."""
    path = Path(path) if path is not None else cache_root()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CacheDirError(f"cache directory {path} is not writable ({e.strerror or e}); set "
                            "SA_KIT_CACHE to a folder you can write") from None
    return path


def cache_dir() -> Path:
    """Where cached weights, Fisher files and datasets live: ``$SA_KIT_CACHE`` or the user cache."""
    path = cache_root()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheDirError(f"cache directory {path} cannot be created ({e.strerror or e}); set "
                            "SA_KIT_CACHE to a folder you can write") from None
    return path


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-able config (what made an artifact)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tensor_fingerprint(t: torch.Tensor) -> str:
    """A short sha256 of a tensor's dtype, shape and exact bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def weights_fingerprint(weights: "torch.nn.Module | Mapping[str, torch.Tensor]") -> str:
    """The one fingerprint of a model's weights for cache keys: every tensor's exact bytes.

    Takes a module (its ``state_dict``: parameters and persistent buffers) or a mapping of
    tensors (e.g. a Fisher). Any change to any weight changes it -- unlike a sum or a few
    tensors' norms, which a forgetting run that trains only some layers could leave unchanged.
    """
    state = weights.state_dict() if hasattr(weights, "state_dict") else weights
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(tensor_fingerprint(state[name]).encode())
    return h.hexdigest()[:16]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CacheDirError(f"cannot write in {path.parent} ({e.strerror or e}); set SA_KIT_CACHE "
                            "to a folder you can write") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:                 # disk full, quota, read-only: say where, keep nothing
        raise CacheDirError(f"could not write {path.name} in {path.parent} ({e.strerror or e}); "
                            "free some space there or set SA_KIT_CACHE to another folder"
                            ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 meta: Mapping[str, Any] | None = None) -> Path:
    """Save tensors as safetensors, atomically, with JSON-encoded ``meta`` in the header."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"sa_kit": json.dumps(dict(meta or {}), sort_keys=True, default=str)}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=header))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file written by :func:`save_tensors`; returns ``(tensors, meta)``.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is truncated, corrupt or not a safetensors file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = (f.metadata() or {}).get("sa_kit", "{}")
        tensors = load_file(str(path), device=str(device))
        meta = json.loads(raw)
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                         f"{e}") from None
    return tensors, meta


def load_cached(path: str | os.PathLike, config_key: str) -> dict[str, torch.Tensor] | None:
    """Return the tensors in ``path`` if it exists, reads cleanly and was made by ``config_key``.

    A corrupt file or one made by another config is reported (a warning) and ``None`` is
    returned, so the caller rebuilds it.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        tensors, meta = load_tensors(path)
    except ValueError as e:
        warnings.warn(f"cache file is unreadable and will be rebuilt: {e}", stacklevel=2)
        return None
    if meta.get("config_hash") != config_key:
        warnings.warn(f"cache file {path} was made by another config "
                      f"({meta.get('config_hash')} != {config_key}); rebuilding", stacklevel=2)
        return None
    return tensors


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=str)
    return atomic_write(path, write)


def load_or_train(name: str, model: "torch.nn.Module", config: Mapping[str, Any],
                  train: Callable[["torch.nn.Module", Path], Any], verbose: bool = True
                  ) -> "torch.nn.Module":
    """Load ``model``'s weights from the cache if made by ``config``; else ``train`` and cache.

    The file is ``cache_dir()/name-<hash>.safetensors``; its metadata records the config hash,
    so changing the config (or the model) retrains instead of loading stale weights.
    ``train(model, checkpoint_dir)`` gets ``name-<hash>.partial/`` for its checkpoints: an
    interrupted training resumes from there on the next call, and the folder is removed once
    the weights are cached.
    """
    import shutil

    key = config_hash({"name": name, "model": getattr(model, "config", None), **config})
    path = cache_dir() / f"{name}-{key}.safetensors"
    state = load_cached(path, key)
    if state is not None:
        model.load_state_dict(state)
        if verbose:
            print(f"{name}: loaded cached weights ({path.name})")
    else:
        partial = path.with_suffix(".partial")
        train(model, partial)
        save_tensors(path, model.state_dict(), {"kind": "weights", "config_hash": key,
                                                "name": name})
        shutil.rmtree(partial, ignore_errors=True)
        if verbose:
            print(f"{name}: trained and cached ({path.name})")
    return model.eval()
