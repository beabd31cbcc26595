"""The settings of one Stable Diffusion forgetting run: defaults, types, checks, file parsing.

:class:`SDForgetConfig` is what ``python -m sa_kit.sd.forget --config FILE`` reads and what the
chapter-3 profiles (:mod:`sa_kit.profiles`) hold. Its defaults are the paper's published setup
for "brad pitt" -> "a middle aged man" (``sd/configs/stable-diffusion/forget_brad_pitt.yaml``):
lambda 50, gamma 1, AdamW, 200 epochs over 1000 surrogate images, the full UNet, an effective
batch of 16 (4 GPUs x 4) and the base learning rate 1e-5 scaled by it (``main_forget.py``'s
``scale_lr``: 1.6e-4), bare prompts.

Every value is coerced to its declared type, from YAML, JSON or ``key=value`` on the command line:
``lr: 1e-5`` (a string to YAML 1.1) is the float 1e-5, ``gradient_checkpointing=False`` is
False; a value that cannot be read is a ``ValueError`` naming the key, the value and the type.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from sa_kit.checks import check_choice, check_positive_int, check_weight

TRAIN_METHODS = ("full", "xattn", "noxattn")
PRECISIONS = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adam")
FISHER_ESTIMATORS = ("product", "square")
TRUE, FALSE = ("true", "yes", "y", "on", "1"), ("false", "no", "n", "off", "0")

__all__ = ["SDForgetConfig", "load_config", "coerce", "TRAIN_METHODS"]


@dataclasses.dataclass
class SDForgetConfig:
    """Settings of one SD forgetting run (the config file's keys). Defaults: the paper's.

    ``forget_prompt`` -> ``surrogate_prompt`` is the mapping (eq. 1): the surrogate set is
    ``num_surrogate`` images the frozen model draws for the surrogate prompt, trained under the
    forget prompt (a comma-separated list: one chosen per image, as the official code does).
    ``prompt_templates: true`` wraps both in the same varied templates instead. ``lmbda`` and
    ``gamma`` weigh eq. 3 and 2 in the official scale. ``epochs`` (over the surrogate set) sets the
    number of optimiser steps unless ``steps`` is given. ``fisher_timesteps: null`` sums every
    timestep (official); an integer K estimates that sum from K stratified timesteps.
    """

    output_dir: str = ""
    model: str = "CompVis/stable-diffusion-v1-4"
    forget_prompt: str = "brad pitt"
    surrogate_prompt: str | None = None
    surrogate_image_dir: str | None = None  # your own surrogate images instead of generated
    prompt_templates: bool = False
    train_method: str = "full"
    lmbda: float = 50.0
    gamma: float = 1.0
    epochs: float | None = 200.0
    steps: int | None = None
    batch_size: int = 4
    effective_batch: int = 16
    lr: float = 1e-5
    scale_lr: bool = True
    optimizer: str = "adamw"
    grad_clip: float | None = None
    num_surrogate: int = 1000
    num_replay: int = 5000
    fisher_path: str | None = None
    data_dir: str | None = None  # generated sets + cached Fisher (default: output_dir/data)
    fisher_batch_size: int = 8
    fisher_timesteps: int | None = None
    fisher_estimator: str = "product"
    gen_steps: int = 50
    gen_batch_size: int = 8
    guidance_scale: float = 7.5
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        check_choice("train_method", self.train_method, TRAIN_METHODS)
        check_choice("mixed_precision", self.mixed_precision, PRECISIONS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("fisher_estimator", self.fisher_estimator, FISHER_ESTIMATORS)
        if not str(self.model).strip():
            raise ValueError("model must be 'tiny', a pipeline folder or a model id; got ''")
        from sa_kit.sd.prompts import check_mapping, spec_for, surrogate_for
        if self.surrogate_prompt is None and self.surrogate_image_dir is None:
            self.surrogate_prompt = surrogate_for(self.forget_prompt, spec_for(self.model))
        check_mapping(self.forget_prompt, self.surrogate_prompt or "your images")
        for name in ("lmbda", "gamma", "lr", "guidance_scale"):
            check_weight(name, getattr(self, name))
        if self.lr == 0:
            raise ValueError("lr must be a finite number > 0, got 0")
        if self.grad_clip is not None:
            check_weight("grad_clip", self.grad_clip)
        if self.epochs is not None and not (0 < self.epochs < math.inf):
            raise ValueError(f"epochs must be a finite number > 0 or null, got {self.epochs}")
        if self.steps is None and self.epochs is None:
            raise ValueError("give steps or epochs (both are null)")
        for name in ("batch_size", "effective_batch", "num_surrogate", "num_replay",
                     "gen_steps", "gen_batch_size", "fisher_batch_size", "checkpoint_every",
                     "keep_checkpoints"):
            check_positive_int(name, getattr(self, name))
        for name in ("steps", "fisher_timesteps"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.effective_batch % self.batch_size:
            raise ValueError(f"effective_batch ({self.effective_batch}) must be a multiple of "
                             f"batch_size ({self.batch_size})")
        if self.fisher_path is not None and not Path(self.fisher_path).is_file():
            raise ValueError(f"fisher_path {self.fisher_path} is not a file")
        if self.surrogate_image_dir is not None and not Path(self.surrogate_image_dir).is_dir():
            raise ValueError(f"surrogate_image_dir {self.surrogate_image_dir} is not a folder")

    def num_steps(self) -> int:
        """Optimiser steps: ``steps``, else ``ceil(epochs * num_surrogate / effective_batch)``."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * self.num_surrogate / self.effective_batch))

    def accumulation(self, processes: int = 1) -> int:
        """Micro-batches per optimiser step so that ``batch x processes x it = effective_batch``."""
        per_step = self.batch_size * processes
        if self.effective_batch % per_step:
            raise ValueError(f"effective_batch ({self.effective_batch}) must be a multiple of "
                             f"batch_size x processes ({self.batch_size} x {processes})")
        return self.effective_batch // per_step

    def learning_rate(self) -> float:
        """The optimiser's lr: ``lr x effective_batch`` with ``scale_lr`` (official), else ``lr``."""
        return self.lr * self.effective_batch if self.scale_lr else self.lr

    def run_key(self) -> str:
        """Hash of what makes a checkpoint resumable (everything but length and bookkeeping)."""
        from sa_kit.io import config_hash
        skip = {"steps", "epochs", "checkpoint_every", "keep_checkpoints", "output_dir",
                "data_dir"}
        return config_hash({k: v for k, v in dataclasses.asdict(self).items() if k not in skip})


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` converted to the declared type ``tp`` (str, int, float, bool, or Optional[...]).

    Raises:
        ValueError: naming ``name``, the value and the expected type.
    """
    base, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str)
                         and value.strip().lower() in ("null", "none", "~", "")):
        if optional:
            return None
        raise ValueError(f"{name} must be a {base.__name__}, got null")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in TRUE:
                return True
            if text in FALSE:
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            result = float(str(value).strip()) if isinstance(value, str) else float(value)
            if math.isnan(result):
                raise ValueError
            return result
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        allowed = {bool: "true/false (yes/no, 1/0)", int: "an integer",
                   float: "a number", str: "a string"}[base]
        raise ValueError(f"{name} must be {allowed}{' or null' if optional else ''}; "
                         f"got {value!r}") from None
    return value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The key/value mapping in a JSON or YAML file, or a one-line ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist (or is not a file)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path} cannot be read: {e}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"config file {path} is not valid "
                         f"{'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                         f"{first}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold key: value pairs, got a "
                         f"{type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> SDForgetConfig:
    """Read a JSON or YAML config file (optional) and ``key=value`` overrides into a config.

    Raises:
        ValueError: a missing or unreadable file, an unknown key (with the allowed ones), or a
            value of the wrong type.
    """
    raw = read_config_file(path) if path is not None else {}
    raw.update(overrides)
    known = [f.name for f in dataclasses.fields(SDForgetConfig)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(known)}")
    if not raw.get("output_dir"):
        raise ValueError("output_dir is required (where the run writes its result)")
    return SDForgetConfig(**raw)
