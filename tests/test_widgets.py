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


def test_widget_exports_csv_and_recolours_the_tradeoff(tiny_vae, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ex = _explorer(tiny_vae, steps=5, eval_samples=4)
    box = ex.widget()
    box.run_button.click()
    first = box.plot.value
    box.colour_by.value = "mapping"                  # the same runs, coloured by the mapping
    assert box.plot.value[:4] == b"\x89PNG" and box.plot.value != first
    box.csv_button.click()
    rows = list(csv.DictReader(open(tmp_path / "explorer_runs.csv")))
    assert [r["run"] for r in rows] == ["0", "1"] and rows[0]["mapping"] == "(original)"


def test_text_to_image_explorer_plots_by_lambda_mapping_or_train_method(tmp_path):
    import pytest

    from sa_kit.sd.config import SDForgetConfig
    from sa_kit.sd.explorer import TextToImageExplorer
    ex = TextToImageExplorer(tmp_path, classifier=None, run=SDForgetConfig())
    ex._original["seven->one"] = {"P_forget": 0.9, "P_surrogate": 0.05,
                                  "remembered_digit_acc": 0.9, "remembered_colour_acc": 0.95}
    for i, (lmbda, method) in enumerate([(0.0, "full"), (50.0, "xattn"), (50.0, "full")]):
        ex.rows.append({"run": i + 1, "forget": "seven", "surrogate": "one", "lmbda": lmbda,
                        "train_method": method, "steps": 10, "trained": 1, "seconds": 1.0,
                        "P_forget": 0.2 + 0.1 * i, "P_surrogate": 0.5,
                        "remembered_digit_acc": 0.8, "remembered_colour_acc": 0.9})
    legends = {}
    for colour_by in ("lmbda", "mapping", "train_method"):
        ax = ex.plot(colour_by=colour_by)
        legends[colour_by] = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legends["lmbda"] == ["lmbda = 0.0", "lmbda = 50.0", "original"]
    assert legends["train_method"] == ["train_method = full", "train_method = xattn", "original"]
    assert legends["mapping"] == ["mapping = seven->one", "original"]
    with pytest.raises(ValueError, match="colour_by"):
        ex.plot(colour_by="gamma")
    assert ex.to_csv().splitlines()[1].startswith("0,seven,one,,(original)")
