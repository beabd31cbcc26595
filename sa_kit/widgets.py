"""ipywidgets explorers. Each widget only wires controls to a plain function that is tested.

:func:`explore_forgetting` runs one Selective Amnesia job from the original weights and returns
everything a reader wants to see; :func:`forgetting_explorer` puts sliders, a Run button, a
progress bar, an image and a metrics table around it.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from sa_kit import seed_everything
from sa_kit.forget import forget_class as run_forget_class
from sa_kit.metrics import forgetting_metrics, sample_per_class
from sa_kit.plots import metrics_table, png_bytes

LAMBDAS = (0.0, 1.0, 10.0, 100.0, 1_000.0, 10_000.0)   # a log scale that includes 0


def explore_forgetting(model: nn.Module, classifier: nn.Module, fisher: Mapping[str, Tensor],
                       *, forget_class: int = 0, mapping: Any = "noise", lmbda: float = 100.0,
                       gamma: float = 1.0, steps: int = 200, batch_size: int = 128,
                       lr: float = 1e-3, eval_samples: int = 100, seed: int = 0,
                       on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Forget ``forget_class`` -> ``mapping`` on a copy of ``model``; evaluate the result.

    Returns:
        ``{"model", "history", "samples", "metrics", "png"}``: the forgetful copy, its loss
        history, samples per class, the classifier metrics (with ``P_target`` when the mapping
        is another class) and a PNG grid (one row per class).
    """
    seed_everything(seed)
    student = copy.deepcopy(model)
    callbacks = [lambda step, hist, m: on_step(step)] if on_step else []
    history = run_forget_class(student, forget_class, fisher=fisher, mapping=mapping,
                               lmbda=lmbda, gamma=gamma, steps=steps, batch_size=batch_size,
                               lr=lr, callbacks=callbacks, progress=False)
    seed_everything(seed)
    samples = sample_per_class(student, range(student.num_classes), eval_samples)
    target = int(mapping) if str(mapping).lstrip("-").isdigit() else None
    metrics = forgetting_metrics(classifier, samples, forget_class, target)
    return {"model": student, "history": history, "samples": samples, "metrics": metrics,
            "png": png_bytes(samples, ncols=8)}


def forgetting_explorer(model: nn.Module, classifier: nn.Module, fisher: Mapping[str, Tensor],
                        steps: int = 200, eval_samples: int = 100, lr: float = 1e-3) -> Any:
    """A widget: forget class, mapping, lambda (log scale with 0), gamma, steps, Run."""
    import ipywidgets as w

    k = model.num_classes
    forget = w.Dropdown(options=list(range(k)), value=0, description="forget c_f")
    mapping = w.Dropdown(options=["noise"] + [str(i) for i in range(k)], value="noise",
                         description="maps to")
    lmbda = w.SelectionSlider(options=list(LAMBDAS), value=100.0, description="lambda")
    gamma = w.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.25, description="gamma")
    n_steps = w.IntSlider(value=steps, min=20, max=max(20, 5 * steps), step=20,
                          description="steps")
    run = w.Button(description="Run", button_style="primary", icon="play")
    bar = w.IntProgress(value=0, min=0, max=steps, description="progress")
    image = w.Image(format="png", layout=w.Layout(width="260px"))
    table = w.HTML()
    status = w.HTML()

    def on_click(_: Any) -> None:
        bar.max, bar.value = n_steps.value, 0
        run.disabled = True
        status.value = "<i>running...</i>"
        try:
            out = explore_forgetting(
                model, classifier, fisher, forget_class=forget.value, mapping=mapping.value,
                lmbda=lmbda.value, gamma=gamma.value, steps=n_steps.value, lr=lr,
                eval_samples=eval_samples, on_step=lambda s: setattr(bar, "value", s))
            image.value = out["png"]
            table.value = metrics_table({f"forget {forget.value} -> {mapping.value}, "
                                         f"lambda={lmbda.value:g}, gamma={gamma.value:g}":
                                         out["metrics"]})
            status.value = "done: one row per digit; the forgotten one is row " \
                           f"{forget.value}"
        except (ValueError, TypeError) as e:         # e.g. a digit mapped onto itself
            status.value = f"<b style='color:#b00'>{e}</b>"
        finally:
            run.disabled = False

    run.on_click(on_click)
    controls = w.VBox([forget, mapping, lmbda, gamma, n_steps, w.HBox([run, bar]), status])
    box = w.HBox([controls, w.VBox([image, table])])
    box.run_button, box.lambda_slider, box.image, box.table = run, lmbda, image, table
    box.mapping, box.forget_class, box.steps = mapping, forget, n_steps
    return box
