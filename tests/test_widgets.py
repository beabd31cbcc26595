"""The explorer's callback is a plain function; the widget only wires it."""
from __future__ import annotations

import torch

from sa_kit.models import Classifier
from sa_kit.widgets import LAMBDAS, explore_forgetting, forgetting_explorer


def _setup(tiny_vae):
    clf = Classifier(width=4).eval()
    fisher = {k: torch.ones_like(p) for k, p in tiny_vae.named_parameters()}
    return clf, fisher


def test_explore_forgetting_returns_metrics_grid_and_leaves_the_original_alone(tiny_vae):
    clf, fisher = _setup(tiny_vae)
    before = {k: v.clone() for k, v in tiny_vae.state_dict().items()}
    steps_seen = []
    out = explore_forgetting(tiny_vae, clf, fisher, forget_class=2, mapping="5", lmbda=10.0,
                             steps=5, batch_size=16, eval_samples=8, on_step=steps_seen.append)
    assert steps_seen == [1, 2, 3, 4, 5]
    assert set(out["metrics"]) >= {"H", "P_cf", "P_target", "acc_remembered"}
    assert 0 <= out["metrics"]["P_cf"] <= 1 and out["png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(out["samples"]) == list(range(10))
    assert all(torch.equal(before[k], v) for k, v in tiny_vae.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in out["model"].state_dict().items())


def test_explorer_widget_runs_on_click_and_reports_bad_choices(tiny_vae):
    clf, fisher = _setup(tiny_vae)
    box = forgetting_explorer(tiny_vae, clf, fisher, steps=20, eval_samples=4)
    assert 0.0 in box.lambda_slider.options and LAMBDAS[-1] in box.lambda_slider.options
    box.run_button.click()
    assert box.image.value[:4] == b"\x89PNG" and "<table>" in box.table.value
    box.forget_class.value, box.mapping.value = 3, "3"     # a digit mapped onto itself
    box.run_button.click()
    assert "forget class itself" in box.children[0].children[-1].value
