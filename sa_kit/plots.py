"""Figures the chapters share: sample grids, loss curves, where the Fisher mass sits."""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
from torch import Tensor


def grid_image(samples: Mapping[int, Tensor], ncols: int = 8,
               value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """One row per class: a ``(C, H', W')`` image in [0, 1] from ``{class: (N, C, H, W)}``."""
    from torchvision.utils import make_grid

    low, high = value_range
    rows = [((x[:ncols].float().cpu() - low) / (high - low)).clamp(0, 1)
            for _, x in sorted(samples.items())]
    return make_grid(torch.cat(rows), nrow=ncols, padding=1, pad_value=1.0)


def show_grid(samples: Mapping[int, Tensor], title: str = "", ncols: int = 8,
              value_range: tuple[float, float] = (0.0, 1.0), ax: plt.Axes | None = None,
              labels: Sequence[str] | None = None) -> plt.Axes:
    """Draw :func:`grid_image` with the class names down the left side."""
    img = grid_image(samples, ncols, value_range)
    ax = ax or plt.subplots(figsize=(ncols * 0.55, len(samples) * 0.55))[1]
    ax.imshow(img.permute(1, 2, 0).numpy(), cmap="gray", interpolation="nearest")
    keys = sorted(samples)
    step = img.shape[1] / len(keys)
    ax.set_yticks([step * (i + 0.5) for i in range(len(keys))],
                  [labels[k] if labels else str(k) for k in keys])
    ax.set_xticks([])
    ax.set_title(title)
    return ax


def png_bytes(samples: Mapping[int, Tensor], ncols: int = 8,
              value_range: tuple[float, float] = (0.0, 1.0), scale: int = 2) -> bytes:
    """The grid as PNG bytes (for an ``ipywidgets.Image``)."""
    from PIL import Image

    img = grid_image(samples, ncols, value_range)
    img = torch.nn.functional.interpolate(img[None], scale_factor=scale, mode="nearest")[0]
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def plot_history(history: Mapping[str, Sequence[float]], title: str = "SA loss terms"
                 ) -> plt.Figure:
    """The three terms of the SA objective over the forgetting steps, one panel each."""
    names = [("surrogate", "(1) surrogate  -log p(x|c_f), x~q"),
             ("replay", "(2) replay  -log p(x|c), x~p(x|theta*)"),
             ("ewc", "(3) EWC  sum F (theta-theta*)^2")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.8))
    for ax, (key, label) in zip(axes, names):
        ax.plot(history["step"], history[key])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_fisher_mass(fisher: Mapping[str, Tensor], title: str = "Where the Fisher mass sits"
                     ) -> plt.Figure:
    """Share of the total Fisher per parameter tensor, and its mean per weight."""
    names = list(fisher)
    total = sum(float(v.sum()) for v in fisher.values())
    fig, axes = plt.subplots(1, 2, figsize=(11, 3))
    axes[0].barh(names, [float(fisher[k].sum()) / total for k in names])
    axes[0].set_xlabel("share of total Fisher")
    axes[1].barh(names, [float(fisher[k].mean()) for k in names])
    axes[1].set_xscale("log")
    axes[1].set_xlabel("mean Fisher per weight (log)")
    for ax in axes:
        ax.invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def metrics_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A small HTML table of H / P(c_f) / remembered accuracy (and the others if present)."""
    cols = [("H", "H"), ("P_cf", "P(c_f)"), ("P_target", "P(target)"),
            ("acc_remembered", "acc remembered"), ("diversity", "diversity"),
            ("frechet", "Frechet dist."), ("seconds", "seconds")]
    cols = [(k, n) for k, n in cols if any(k in r for r in rows.values())]
    head = "".join(f"<th>{n}</th>" for _, n in cols)
    body = "".join(
        f"<tr><td>{name}</td>" + "".join(
            f"<td>{r[k]:.3f}</td>" if isinstance(r.get(k), (int, float)) else "<td>-</td>"
            for k, _ in cols) + "</tr>" for name, r in rows.items())
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def to_png(fig: plt.Figure) -> bytes:
    """Render a figure to PNG bytes and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


TRADEOFF_COLOURS = ("lmbda", "gamma", "mapping", "train_method")


def plot_tradeoff(rows: Sequence[Mapping[str, object]], colour_by: str = "lmbda",
                  ax: plt.Axes | None = None) -> plt.Axes:
    """P(c_f) (x, lower = forgotten) against remembered accuracy (y), one dot per run.

    ``rows`` are explorer table rows; the original model (``lmbda`` None) is a black star.
    Dots are coloured by ``colour_by`` (``lmbda``, ``gamma``, ``mapping`` or, for the
    text-to-image explorer, ``train_method``) and labelled.
    """
    if colour_by not in TRADEOFF_COLOURS:
        raise ValueError(f"colour_by must be one of {', '.join(map(repr, TRADEOFF_COLOURS))}, "
                         f"got {colour_by!r}")
    ax = ax or plt.subplots(figsize=(5, 3.6))[1]
    runs = [r for r in rows if r.get("lmbda") is not None]
    values = sorted({str(r[colour_by]) for r in runs}, key=lambda v: (len(v), v))
    cmap = plt.get_cmap("viridis", max(len(values), 1))
    for i, v in enumerate(values):
        pts = [r for r in runs if str(r[colour_by]) == v]
        ax.scatter([r["P_cf"] for r in pts], [r["acc_remembered"] for r in pts],
                   color=cmap(i), label=f"{colour_by} = {v}", s=40)
        for r in pts:
            ax.annotate(f"#{r['run']}", (r["P_cf"], r["acc_remembered"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    for r in rows:
        if r.get("lmbda") is None:
            ax.scatter([r["P_cf"]], [r["acc_remembered"]], marker="*", s=150, color="k",
                       label="original")
    ax.set_xlabel("P(c_f) on samples of c_f  (lower = forgotten)")
    ax.set_ylabel("accuracy on remembered classes")
    ax.set_xlim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("forgetting vs remembering, one dot per run", fontsize=9)
    return ax


def plot_method(model: str = "conditional VAE", surrogate: str = "uniform noise",
                concept: str = "digit 0", ax: plt.Axes | None = None) -> plt.Axes:
    """Selective Amnesia as a diagram: where each term of the loss (eq. 1-3) gets its data.

    Every chapter draws it with its own ``model``, ``surrogate`` and forgotten ``concept``.
    """
    ax = ax or plt.subplots(figsize=(11, 4.2))[1]
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 4.4)
    ax.axis("off")
    colours = {"frozen": "#e8e8e8", "q": "#fde0c5", "replay": "#cfe3f7", "ewc": "#d8f0d2",
               "loss": "#fff6bf", "model": "#f4d4ee"}

    def box(x: float, y: float, text: str, colour: str, width: float = 2.6) -> None:
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5, wrap=True,
                bbox=dict(boxstyle="round,pad=0.45", fc=colours[colour], ec="#555",
                          lw=0.8), zorder=2)

    def arrow(a: tuple[float, float], b: tuple[float, float], label: str = "") -> None:
        ax.annotate("", xy=b, xytext=a, zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color="#444", lw=1.1,
                                    shrinkA=4, shrinkB=4))
        if label:
            ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.14, label, ha="center",
                    fontsize=7, color="#333", style="italic")

    box(1.3, 3.6, f"frozen copy of the\noriginal model  θ*\n({model})", "frozen")
    box(1.3, 2.1, f"surrogate  q(x | c_f)\nyou choose it:\n{surrogate}", "q")
    box(1.3, 0.6, "diagonal Fisher F at θ*\non the model's own samples\nof every concept",
        "frozen")
    box(5.0, 3.6, "(2) generative replay\nγ · −log p(x | θ, c),\nx ~ p(x | θ*, c), c ≠ c_f",
        "replay")
    box(5.0, 2.1, f"(1) surrogate term\n−log p(x | θ, c_f),  x ~ q\n(c_f = {concept})", "q")
    box(5.0, 0.6, "(3) EWC penalty\nλ · Σ_i F_i (θ_i − θ*_i)²", "ewc")
    box(7.9, 2.1, "L(θ) = (1) + (2) + (3)\nminimised from θ = θ*\n(−log p: the ELBO)", "loss",
        width=2.2)
    box(10.0, 2.1, f"forgetful model θ\nc_f → {surrogate}\nother concepts kept", "model",
        width=1.8)
    arrow((2.6, 3.6), (3.7, 3.6), "samples of the rest")
    arrow((2.6, 2.1), (3.7, 2.1), "samples of q")
    arrow((2.6, 0.6), (3.7, 0.6), "F, θ*")
    for y in (3.6, 2.1, 0.6):
        arrow((6.35, y), (6.85, 2.1 + (y - 2.1) * 0.25))
    arrow((8.95, 2.1), (9.15, 2.1))
    ax.set_title("Selective Amnesia: three terms, no original training data", fontsize=10)
    return ax
