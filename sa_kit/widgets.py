"""The class-conditional explorer of chapters 1 and 2: a plain object, and a thin widget.

:class:`ForgettingExplorer` runs one short Selective Amnesia job from the original weights for
a chosen forget class, mapping, lambda and gamma (eq. 1-3), evaluates it with the paper's
metrics, and *records every run* in a table beside the original model's reference row, so a
trade-off can be seen: :meth:`~ForgettingExplorer.table` (rows), :meth:`~ForgettingExplorer.plot`
(P(c_f) against remembered accuracy, coloured by lambda, gamma or mapping) and
:meth:`~ForgettingExplorer.to_csv`. Replay and surrogate buffers are drawn once and reused, and a
setting already tried is answered from memory, so it stays responsive on a CPU (a DDPM's
sampler is slow). :meth:`~ForgettingExplorer.widget` only wires controls to
:meth:`~ForgettingExplorer.run`, which is a plain method with its own tests.
"""
from __future__ import annotations

import copy
import csv
import io
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from sa_kit import seed_everything
from sa_kit.checks import check_class, check_positive_int, check_weight
from sa_kit.forget import forget
from sa_kit.mappings import make_mapping, mapping_key
from sa_kit.metrics import forgetting_metrics, sample_per_class
from sa_kit.plots import metrics_table, png_bytes
from sa_kit.replay import GenerativeReplay, frozen_copy

LAMBDAS = (0.0, 0.1, 1.0, 10.0, 100.0, 1_000.0, 10_000.0)   # a log scale that includes 0
COLUMNS = ("run", "forget_class", "mapping", "lmbda", "gamma", "steps", "P_cf", "H",
           "P_target", "acc_remembered", "diversity", "seconds")

__all__ = ["ForgettingExplorer", "LAMBDAS"]


class ForgettingExplorer:
    """Short SA runs on a class-conditional model, recorded for comparison.

    Args:
        model: the original model at theta* (left untouched; each run trains a copy).
        classifier: the evaluation classifier (the paper's).
        fisher: the model's diagonal Fisher (eq. 3).
        steps, batch_size, lr, grad_clip: the short forgetting run.
        eval_samples: samples per class for the metrics.
        replay_buffer: frozen-model samples drawn once for replay and class mappings (None:
            fresh samples every step -- fine for a cVAE, slow for a DDPM).
        seed: every run starts from this seed (the same setting gives the same result).
    """

    def __init__(self, model: nn.Module, classifier: nn.Module, fisher: Mapping[str, Tensor],
                 *, steps: int = 200, batch_size: int = 128, lr: float = 1e-3,
                 grad_clip: float | None = None, eval_samples: int = 100,
                 replay_buffer: int | None = None, seed: int = 0) -> None:
        self.model, self.classifier, self.fisher = model, classifier, fisher
        self.steps = check_positive_int("steps", steps)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.lr, self.grad_clip, self.seed = lr, grad_clip, seed
        self.eval_samples = check_positive_int("eval_samples", eval_samples)
        self.replay_buffer = replay_buffer
        self.rows: list[dict[str, Any]] = []
        self.results: dict[tuple, dict[str, Any]] = {}
        self._sources: dict[tuple, Any] = {}
        self._frozen = frozen_copy(model)
        self._original: dict[int, dict[str, Any]] = {}

    def _source(self, forget_class: int, mapping: Any) -> Any:
        """Replay (``mapping=None``) or a surrogate, built once per forget class and mapping."""
        key = (forget_class, mapping_key(mapping) if mapping is not None else None)
        if key not in self._sources:
            k = int(self.model.num_classes)
            self._sources[key] = GenerativeReplay(self._frozen, k, forget_class,
                                                  self.replay_buffer) if mapping is None else \
                make_mapping(mapping, forget_class, self._frozen, k, self.replay_buffer)
        return self._sources[key]

    def _evaluate(self, model: nn.Module, forget_class: int, target: int | None
                  ) -> tuple[dict[str, Any], dict[int, Tensor]]:
        seed_everything(self.seed + 1)                      # the same x_T for every setting
        samples = sample_per_class(model, range(model.num_classes), self.eval_samples)
        return forgetting_metrics(self.classifier, samples, forget_class, target), samples

    def original(self, forget_class: int = 0) -> dict[str, Any]:
        """The reference row: the original model's metrics for ``forget_class``."""
        if forget_class not in self._original:
            metrics, _ = self._evaluate(self.model, forget_class, None)
            self._original[forget_class] = metrics
        return self._original[forget_class]

    def run(self, forget_class: int = 0, mapping: Any = "noise", lmbda: float = 100.0,
            gamma: float = 1.0, steps: int | None = None,
            on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Forget ``forget_class`` -> ``mapping`` on a copy of the model; evaluate and record.

        Returns:
            ``{"model", "history", "samples", "metrics", "png", "seconds", "cached"}`` (the
            forgetful copy, its loss history, samples per class, the paper's metrics with
            ``P_target`` for a class mapping, a PNG grid with one row per class).
        """
        k = int(self.model.num_classes)
        forget_class = check_class("forget_class", forget_class, k)
        lmbda, gamma = check_weight("lmbda", lmbda), check_weight("gamma", gamma)
        steps = check_positive_int("steps", steps if steps is not None else self.steps)
        if isinstance(mapping, str) and mapping.strip().isdigit():
            mapping = int(mapping)
        target = mapping if isinstance(mapping, int) and not isinstance(mapping, bool) else None
        key = (forget_class, mapping_key(mapping), lmbda, gamma, steps)
        if key in self.results:
            return {**self.results[key], "cached": True}
        surrogate = self._source(forget_class, mapping)         # validates the mapping
        replay = self._source(forget_class, None) if gamma > 0 else None
        seed_everything(self.seed)
        student = copy.deepcopy(self.model).requires_grad_(True)
        callbacks = [lambda step, hist, m: on_step(step)] if on_step else []
        start = time.perf_counter()
        history = forget(student, surrogate, replay, self.fisher if lmbda > 0 else None,
                         lmbda=lmbda, gamma=gamma, steps=steps, batch_size=self.batch_size,
                         lr=self.lr, grad_clip=self.grad_clip, callbacks=callbacks,
                         progress=False)
        seconds = time.perf_counter() - start
        metrics, samples = self._evaluate(student, forget_class, target)
        result = {"model": student, "history": history, "samples": samples,
                  "metrics": metrics, "png": png_bytes(samples, ncols=8), "seconds": seconds}
        self.results[key] = result
        self.rows.append({"run": len(self.rows) + 1, "forget_class": forget_class,
                          "mapping": str(mapping), "lmbda": lmbda, "gamma": gamma,
                          "steps": steps, "seconds": round(seconds, 1),
                          **{c: metrics.get(c) for c in COLUMNS if c in metrics}})
        return {**result, "cached": False}

    def table(self, forget_class: int | None = None) -> list[dict[str, Any]]:
        """Every run so far, after the original model's reference row (run 0)."""
        fc = forget_class if forget_class is not None else \
            (self.rows[-1]["forget_class"] if self.rows else 0)
        ref = self.original(fc)
        reference = {"run": 0, "forget_class": fc, "mapping": "(original)", "lmbda": None,
                     "gamma": None, "steps": 0, "seconds": 0.0,
                     **{c: ref.get(c) for c in COLUMNS if c in ref}}
        return [reference] + list(self.rows)

    def to_csv(self, path: str | None = None) -> str:
        """The table as CSV text (also written to ``path`` if given)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.table():
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in COLUMNS})
        if path is not None:
            from sa_kit.io import atomic_write
            atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))
        return buf.getvalue()

    def plot(self, colour_by: str = "lmbda", ax: Any = None) -> Any:
        """The trade-off: P(c_f) (lower = forgotten) against remembered accuracy, one dot a run."""
        from sa_kit.plots import plot_tradeoff
        return plot_tradeoff(self.table(), colour_by=colour_by, ax=ax)

    def html_table(self) -> str:
        """The table as HTML (the widget shows it)."""
        rows = {f"#{r['run']} {r['mapping']} " + ("" if r["lmbda"] is None else
                f"lambda={r['lmbda']:g}, gamma={r['gamma']:g}, {r['steps']} steps"): r
                for r in self.table()}
        return metrics_table(rows)

    def widget(self, lmbdas: Sequence[float] = LAMBDAS, mappings: Sequence[str] | None = None,
               lmbda: float = 100.0) -> Any:
        """ipywidgets: forget class, mapping, lambda (log scale with 0), gamma, steps, Run."""
        import ipywidgets as w

        k = int(self.model.num_classes)
        mappings = list(mappings) if mappings is not None else \
            ["noise"] + [str(i) for i in range(k)]
        forget_c = w.Dropdown(options=list(range(k)), value=0, description="forget c_f")
        mapping = w.Dropdown(options=mappings, value=mappings[0], description="maps to")
        options = sorted(set(float(x) for x in lmbdas) | {float(lmbda)})
        lam = w.SelectionSlider(options=options, value=float(lmbda), description="lambda")
        gam = w.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.25, description="gamma")
        n_steps = w.IntSlider(value=self.steps, min=max(1, self.steps // 10),
                              max=5 * self.steps, step=max(1, self.steps // 10),
                              description="steps")
        run = w.Button(description="Run", button_style="primary", icon="play")
        bar = w.IntProgress(value=0, min=0, max=self.steps, description="progress")
        image = w.Image(format="png", layout=w.Layout(width="260px"))
        table, status, plot = w.HTML(), w.HTML(), w.Image(format="png")
        csv_button = w.Button(description="export CSV", icon="download")
        colour = w.Dropdown(options=["lmbda", "gamma", "mapping"], value="lmbda",
                            description="colour by")

        def redraw(_: Any = None) -> None:
            from sa_kit.plots import to_png
            if self.rows:
                plot.value = to_png(self.plot(colour_by=colour.value).figure)

        def on_click(_: Any) -> None:
            bar.max, bar.value = n_steps.value, 0
            run.disabled = True
            status.value = "<i>running...</i>"
            try:
                out = self.run(forget_c.value, mapping.value, lam.value, gam.value,
                               n_steps.value, on_step=lambda s: setattr(bar, "value", s))
                image.value = out["png"]
                table.value = self.html_table()
                redraw()
                status.value = (f"done in {out['seconds']:.1f} s" +
                                (" (from memory)" if out["cached"] else "") +
                                f": one row per class; the forgotten one is row {forget_c.value}")
            except (ValueError, TypeError) as e:         # e.g. a digit mapped onto itself
                status.value = f"<b style='color:#b00'>{e}</b>"
            finally:
                run.disabled = False

        def on_csv(_: Any) -> None:
            path = "explorer_runs.csv"
            self.to_csv(path)
            status.value = f"table written to {path}"

        run.on_click(on_click)
        csv_button.on_click(on_csv)
        colour.observe(redraw, names="value")
        controls = w.VBox([forget_c, mapping, lam, gam, n_steps, w.HBox([run, bar]),
                           w.HBox([csv_button, colour]), status])
        box = w.VBox([w.HBox([controls, w.VBox([image])]), table, plot])
        box.run_button, box.lambda_slider, box.image, box.table = run, lam, image, table
        box.mapping, box.forget_class, box.steps, box.status = mapping, forget_c, n_steps, status
        box.gamma_slider, box.plot, box.csv_button = gam, plot, csv_button
        box.colour_by = colour
        return box
