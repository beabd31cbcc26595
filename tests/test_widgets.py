"""The explorer's callback is a plain method; the widget only wires it; every run is recorded."""
from __future__ import annotations

import csv
import io

import torch

from sa_kit.models import MNISTClassifier
from sa_kit.widgets import LAMBDAS, ForgettingExplorer


def _explorer(tiny_vae, **kw) -> ForgettingExplorer:
    torch.manual_seed(0)
    clf = MNISTClassifier().eval()
    fisher = {k: torch.ones_like(p) for k, p in tiny_vae.named_parameters()}
    args = dict(steps=5, batch_size=16, eval_samples=8)
    args.update(kw)
    return ForgettingExplorer(tiny_vae, clf, fisher, **args)


def test_run_returns_metrics_grid_and_leaves_the_original_alone(tiny_vae):
    ex = _explorer(tiny_vae)
    before = {k: v.clone() for k, v in tiny_vae.state_dict().items()}
    steps_seen = []
    out = ex.run(forget_class=2, mapping="5", lmbda=10.0, on_step=steps_seen.append)
    assert steps_seen == [1, 2, 3, 4, 5] and not out["cached"]
    assert set(out["metrics"]) >= {"H", "P_cf", "P_target", "acc_remembered", "diversity"}
    assert 0 <= out["metrics"]["P_cf"] <= 1 and out["png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(out["samples"]) == list(range(10))
    assert all(torch.equal(before[k], v) for k, v in tiny_vae.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in out["model"].state_dict().items())
    again = ex.run(forget_class=2, mapping=5, lmbda=10.0)           # "5" and 5: one setting
    assert again["cached"] and again["metrics"] == out["metrics"]


def test_every_run_is_recorded_beside_the_original_and_exported(tiny_vae, tmp_path):
    ex = _explorer(tiny_vae)
    ex.run(lmbda=0.0)
    ex.run(lmbda=100.0, gamma=0.5)
    rows = ex.table()
    assert [r["run"] for r in rows] == [0, 1, 2] and rows[0]["mapping"] == "(original)"
    assert rows[1]["lmbda"] == 0.0 and rows[2]["gamma"] == 0.5
    assert all(r["P_cf"] is not None and r["acc_remembered"] is not None for r in rows)
    text = ex.to_csv(str(tmp_path / "runs.csv"))
    parsed = list(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))
    assert text == (tmp_path / "runs.csv").read_text() and len(parsed) == 3
    assert float(parsed[2]["lmbda"]) == 100.0
    ax = ex.plot(colour_by="lmbda")
    assert len(ax.collections) == 3                     # two lambdas and the original's star
    ex.plot(colour_by="mapping")


def test_explorer_widget_runs_on_click_and_reports_bad_choices(tiny_vae):
    box = _explorer(tiny_vae, steps=20, eval_samples=4).widget()
    assert 0.0 in box.lambda_slider.options and LAMBDAS[-1] in box.lambda_slider.options
    box.run_button.click()
    assert box.image.value[:4] == b"\x89PNG" and "<table>" in box.table.value
    assert box.plot.value[:4] == b"\x89PNG"
    box.forget_class.value, box.mapping.value = 3, "3"     # a digit mapped onto itself
    box.run_button.click()
    assert "forget class itself" in box.status.value
