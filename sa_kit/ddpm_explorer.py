"""Chapter 2's lambda / mapping explorer: a plain function, and a thin ipywidgets wrapper.

:func:`explore` runs a *short* forgetting of one class from the original weights theta* with
a chosen surrogate mapping and EWC weight lambda (eq. 1-3 of DESIGN.md) and returns the
paper's metrics on fresh samples. The replay buffer, the surrogate sources and every finished
result are cached in an :class:`ExplorerState`, so moving back to a setting already tried is
instant and a new one costs only the short forgetting run -- that keeps it usable on a CPU.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from sa_kit.forget import check_class, forget
from sa_kit.mappings import make_mapping
from sa_kit.metrics import forgetting_metrics
from sa_kit.objective import check_weight
from sa_kit.replay import GenerativeReplay, frozen_copy


@dataclass
class ExplorerState:
    """What :func:`explore` needs and caches.

    Args:
        model: the original DDPM at theta* (left untouched; each run trains a copy).
        fisher: its diagonal Fisher (eq. 3).
        classifier: the evaluation classifier.
        forget_class: c_f.
        steps, batch_size, lr: the short forgetting run.
        replay_buffer: frozen-model samples drawn once for replay and class mappings.
        num_samples: samples per class for the metrics.
        gamma: the replay weight.
    """

    model: nn.Module
    fisher: Mapping[str, Tensor]
    classifier: nn.Module
    forget_class: int
    steps: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    replay_buffer: int = 128
    num_samples: int = 20
    gamma: float = 1.0
    results: dict[tuple[str, float], dict[str, Any]] = field(default_factory=dict)
    _sources: dict[str, Any] = field(default_factory=dict)

    def source(self, mapping: str) -> Any:
        """The replay (``"replay"``) or a surrogate (mapping name), built once and reused."""
        if mapping not in self._sources:
            frozen = frozen_copy(self.model)
            if mapping == "replay":
                self._sources[mapping] = GenerativeReplay(
                    frozen, self.model.num_classes, self.forget_class, self.replay_buffer)
            else:
                self._sources[mapping] = make_mapping(mapping, self.forget_class, frozen,
                                                      self.model.num_classes,
                                                      self.replay_buffer)
        return self._sources[mapping]


def explore(state: ExplorerState, mapping: str | int = "noise", lmbda: float = 10.0,
            progress: bool = False) -> dict[str, Any]:
    """Forget ``state.forget_class`` -> ``mapping`` with EWC weight ``lmbda``; metrics + samples.

    Args:
        state: the explorer's models and caches.
        mapping: ``"noise"`` or a target class k (int or digit string), as in
            :func:`sa_kit.mappings.make_mapping`.
        lmbda: EWC weight (>= 0); 0 drops the penalty.

    Returns:
        ``forgetting_metrics`` (``P_cf``, ``H``, ``acc_remembered``, ``P_target`` for a class
        mapping) plus ``samples_cf`` (images of c_f after forgetting), ``history``, and
        ``cached`` (True if this setting was computed before).
    """
    lmbda = check_weight("lmbda", lmbda)
    key = (str(mapping), lmbda)
    if key in state.results:
        return {**state.results[key], "cached": True}
    target = int(mapping) if str(mapping).lstrip("-").isdigit() else None
    if target is not None:
        check_class("mapping", target, state.model.num_classes)
    model = copy.deepcopy(state.model)
    history = forget(model, state.source(str(mapping)), state.source("replay"), state.fisher,
                     lmbda=lmbda, gamma=state.gamma, steps=state.steps,
                     batch_size=state.batch_size, lr=state.lr, progress=progress)
    torch.manual_seed(0)                                   # the same x_T for every setting
    classes = range(state.model.num_classes)
    samples = {k: model.sample(torch.full((state.num_samples,), k)) for k in classes}
    result = forgetting_metrics(state.classifier, samples, state.forget_class, target)
    result.update(samples_cf=samples[state.forget_class], history=history)
    state.results[key] = result
    return {**result, "cached": False}


def explorer_widget(state: ExplorerState, mappings: tuple[str, ...] = ("noise", "1", "2"),
                    lmbdas: tuple[float, ...] = (0.0, 1.0, 10.0, 100.0, 1000.0)) -> Any:
    """An ipywidgets box: pick a mapping and lambda, press "forget", see metrics and samples."""
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    mapping = w.Dropdown(options=list(mappings), value=mappings[0], description="c_f ->")
    lmbda = w.SelectionSlider(options=list(lmbdas), value=lmbdas[2], description="lambda")
    button, out = w.Button(description="forget"), w.Output()

    def on_click(_: Any) -> None:
        res = explore(state, mapping.value, lmbda.value)
        with out:
            out.clear_output(wait=True)
            print(f"P(c_f) {res['P_cf']:.3f}  H {res['H']:.2f}  remembered acc "
                  f"{res['acc_remembered']:.3f}" + (" (cached)" if res["cached"] else ""))
            plt.figure(figsize=(6, 1.5))
            plt.imshow(make_grid(res["samples_cf"][:10], nrow=10).permute(1, 2, 0))
            plt.axis("off")
            plt.show()

    button.on_click(on_click)
    return w.VBox([w.HBox([mapping, lmbda, button]), out])
