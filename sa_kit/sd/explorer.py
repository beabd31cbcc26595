"""Chapter 3's explorer: lambda, train_method, forget prompt, surrogate prompt -> a short SA job.

:class:`TextToImageExplorer` runs one short forgetting job with the training CLI's own code
(:func:`sa_kit.chapters.text_to_image.forget_run`), draws the same prompts before and after, and
*records every run* in a table beside the original model's reference row: what the evaluator
sees in images of prompts that name the forgotten concept (P(forgotten), P(surrogate)) and in
images of every other concept (remembered accuracy), how many weights moved, and the time.
:meth:`~TextToImageExplorer.widget` only wires controls to :meth:`~TextToImageExplorer.run`,
a plain method with its own tests.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Sequence

from sa_kit.checks import check_choice, check_positive_int, check_weight
from sa_kit.sd.config import TRAIN_METHODS, SDForgetConfig
from sa_kit.widgets import LAMBDAS

COLUMNS = ("run", "forget", "surrogate", "lmbda", "train_method", "steps", "P_forget",
           "P_surrogate", "remembered_digit_acc", "remembered_colour_acc", "trained",
           "seconds")

__all__ = ["TextToImageExplorer", "concept_items"]


def concept_items(word: str, per: int, seed: int) -> tuple[list, list, str, int]:
    """Held-out prompts naming ``word`` (a digit word or a colour) and prompts of the rest.

    Returns:
        ``(forget_items, other_items, kind, index)`` -- items are ``(prompt, digit, colour)``;
        ``kind`` is ``"digit"`` or ``"colour"``.
    """
    from sa_kit.sd.digits import COLOURS, WORDS, heldout_prompts
    every = heldout_prompts(per=per, seed=seed)
    if word in WORDS:
        d = WORDS.index(word)
        return [it for it in every if it[1] == d], [it for it in every if it[1] != d], \
            "digit", d
    if word in COLOURS:
        c = list(COLOURS).index(word)
        return [it for it in every if it[2] == c], [it for it in every if it[2] != c], \
            "colour", c
    raise ValueError(f"forget_prompt must be a digit word ({', '.join(WORDS)}) or a colour "
                     f"({', '.join(COLOURS)}) of this model; got {word!r}")


class TextToImageExplorer:
    """Short SA runs on the coloured-digit text-to-image model, recorded for comparison.

    Args:
        model_dir: the trained pipeline folder (theta*).
        classifier: the digit/colour evaluator.
        run: the profile's forgetting settings (the CLI's config).
        steps: optimiser steps of a short job.
        per: held-out prompts per digit/colour combination in the evaluation.
        render_kw: how images are drawn (``steps``, ``guidance_scale``).
    """

    def __init__(self, model_dir: str | Path, classifier: Any, run: SDForgetConfig, *,
                 steps: int = 40, per: int = 1, seed: int = 0,
                 render_kw: dict[str, Any] | None = None) -> None:
        self.model_dir, self.classifier, self.run_cfg = str(model_dir), classifier, run
        self.steps = check_positive_int("steps", steps)
        self.per, self.seed = per, seed
        self.render_kw = dict(render_kw or {})
        self.rows: list[dict[str, Any]] = []
        self._original: dict[str, dict[str, Any]] = {}
        self.last: dict[str, Any] = {}

    def _measure(self, pipe: Any, forget: str, surrogate: str) -> dict[str, Any]:
        from sa_kit.chapters.text_to_image import render, score
        from sa_kit.sd.digits import COLOURS, WORDS, judge
        f_items, o_items, kind, index = concept_items(forget, self.per, self.seed)
        images = render(pipe, [p for p, _, _ in f_items + o_items], seed=self.seed,
                        **self.render_kw)
        n = len(f_items)
        p_digit, p_colour = judge(self.classifier, images[:n])      # prompts naming the concept
        head = p_digit if kind == "digit" else p_colour
        surrogate_index = (WORDS.index(surrogate) if kind == "digit" and surrogate in WORDS else
                           list(COLOURS).index(surrogate) if surrogate in COLOURS else None)
        rest = score(self.classifier, images[n:], o_items)          # every other prompt
        return {"P_forget": float(head[:, index].mean()),
                "P_surrogate": float(head[:, surrogate_index].mean())
                if surrogate_index is not None else None,
                "remembered_digit_acc": rest["digit_accuracy"],
                "remembered_colour_acc": rest["colour_accuracy"],
                "images": images[:n]}

    def original(self, forget: str = "seven", surrogate: str = "one") -> dict[str, Any]:
        """The reference row: the original model on the same prompts."""
        key = f"{forget}->{surrogate}"
        if key not in self._original:
            from sa_kit.sd.pipeline import load_pipeline
            self._original[key] = self._measure(load_pipeline(self.model_dir), forget, surrogate)
        return self._original[key]

    def run(self, lmbda: float | None = None, train_method: str | None = None,
            forget_prompt: str = "seven", surrogate_prompt: str = "one",
            steps: int | None = None, progress: bool = False) -> dict[str, Any]:
        """One short forgetting job and its measurements; recorded in :meth:`table`."""
        from sa_kit.chapters.text_to_image import forget_run
        from sa_kit.sd.pipeline import load_pipeline
        lmbda = check_weight("lmbda", self.run_cfg.lmbda if lmbda is None else lmbda)
        method = check_choice("train_method", train_method or self.run_cfg.train_method,
                              TRAIN_METHODS)
        steps = check_positive_int("steps", steps or self.steps)
        concept_items(forget_prompt, self.per, self.seed)           # checks the words
        if surrogate_prompt.strip().lower() == forget_prompt.strip().lower():
            raise ValueError(f"surrogate_prompt equals the forget prompt {forget_prompt!r}")
        start = time.perf_counter()
        out = forget_run(self.run_cfg, self.model_dir, forget_prompt=forget_prompt,
                         surrogate_prompt=surrogate_prompt, lmbda=lmbda, train_method=method,
                         steps=steps, epochs=None, checkpoint_every=10_000, progress=progress)
        measured = self._measure(load_pipeline(str(out["pipeline_dir"])), forget_prompt,
                                 surrogate_prompt)
        seconds = time.perf_counter() - start
        row = {"run": len(self.rows) + 1, "forget": forget_prompt, "surrogate": surrogate_prompt,
               "lmbda": lmbda, "train_method": method, "steps": steps,
               "trained": out["trained"], "seconds": round(seconds, 1),
               **{k: v for k, v in measured.items() if k != "images"}}
        self.rows.append(row)
        self.last = {**row, "images": measured["images"], "history": out["history"]}
        return self.last

    def table(self) -> list[dict[str, Any]]:
        """Every run so far, after the original model's reference row (run 0)."""
        f, s = (self.rows[-1]["forget"], self.rows[-1]["surrogate"]) if self.rows else \
            ("seven", "one")
        ref = self.original(f, s)
        return [{"run": 0, "forget": f, "surrogate": s, "lmbda": None, "train_method": "(original)",
                 "steps": 0, "trained": 0, "seconds": 0.0,
                 **{k: v for k, v in ref.items() if k != "images"}}] + list(self.rows)

    def to_csv(self, path: str | None = None) -> str:
        """The table as CSV (also written to ``path`` if given)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in self.table():
            w.writerow({c: "" if row.get(c) is None else row.get(c) for c in COLUMNS})
        if path is not None:
            from sa_kit.io import atomic_write
            atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))
        return buf.getvalue()

    def html_table(self) -> str:
        """The table as HTML."""
        def cell(v: Any) -> str:
            return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
        head = "".join(f"<th>{c}</th>" for c in COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in COLUMNS) +
                       "</tr>" for r in self.table())
        return f"<table><tr>{head}</tr>{body}</table>"

    def plot(self, colour_by: str = "lmbda", ax: Any = None) -> Any:
        """P(forgotten) against remembered digit accuracy, one dot per run.

        ``colour_by``: ``lmbda``, ``mapping`` (forget -> surrogate) or ``train_method``.
        """
        from sa_kit.plots import plot_tradeoff
        check_choice("colour_by", colour_by, ("lmbda", "mapping", "train_method"))
        rows = [{**r, "P_cf": r["P_forget"], "acc_remembered": r["remembered_digit_acc"],
                 "mapping": f"{r['forget']}->{r['surrogate']}"} for r in self.table()]
        return plot_tradeoff(rows, colour_by=colour_by, ax=ax)

    def widget(self, lmbdas: Sequence[float] = LAMBDAS) -> Any:
        """ipywidgets: lambda (with 0), train_method, forget and surrogate prompts, Run."""
        import ipywidgets as w

        from sa_kit.plots import to_png
        options = sorted(set(float(x) for x in lmbdas) | {float(self.run_cfg.lmbda)})
        lam = w.SelectionSlider(options=options, value=float(self.run_cfg.lmbda),
                                description="lambda")
        method = w.Dropdown(options=TRAIN_METHODS, value=self.run_cfg.train_method,
                            description="train_method")
        forget = w.Text(value="seven", description="forget")
        surrogate = w.Text(value="one", description="surrogate")
        run = w.Button(description="Run short job", button_style="primary", icon="play")
        status, table, image, plot = w.HTML(), w.HTML(), w.Image(format="png"), \
            w.Image(format="png")
        csv_button = w.Button(description="export CSV", icon="download")
        colour = w.Dropdown(options=["lmbda", "mapping", "train_method"], value="lmbda",
                            description="colour by")

        def redraw(_: Any = None) -> None:
            if self.rows:
                plot.value = to_png(self.plot(colour_by=colour.value).figure)

        def on_csv(_: Any) -> None:
            self.to_csv("t2i_explorer_runs.csv")
            status.value = "table written to t2i_explorer_runs.csv"

        def on_click(_: Any) -> None:
            run.disabled, status.value = True, "<i>running...</i>"
            try:
                out = self.run(lam.value, method.value, forget.value.strip(),
                               surrogate.value.strip())
                from sa_kit.plots import png_bytes
                image.value = png_bytes({0: out["images"]}, ncols=12)
                table.value = self.html_table()
                redraw()
                status.value = (f"done in {out['seconds']:.0f} s: images of held-out prompts "
                                f"that name '{out['forget']}'")
            except (ValueError, TypeError) as e:
                status.value = f"<b style='color:#b00'>{e}</b>"
            finally:
                run.disabled = False

        run.on_click(on_click)
        csv_button.on_click(on_csv)
        colour.observe(redraw, names="value")
        box = w.VBox([w.HBox([w.VBox([lam, method, forget, surrogate, run,
                                      w.HBox([csv_button, colour]), status]), image]),
                      table, plot])
        box.run_button, box.lambda_slider, box.method, box.table = run, lam, method, table
        box.forget, box.surrogate, box.status, box.image = forget, surrogate, status, image
        box.plot, box.csv_button, box.colour_by = plot, csv_button, colour
        return box

