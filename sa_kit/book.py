"""The book: every chapter executed once and rendered to a static HTML site, and section times.

``make book`` runs ``python -m sa_kit.book build``: each ``notebooks/0*.ipynb`` is executed once
(``SA_KIT_PROFILE``, default ``cpu``; cached models are reused), its cells' wall times recorded,
and the executed notebooks plus the pages in ``book/`` (home, glossary, references, outlook,
instructors) become a static site with mkdocs + mkdocs-jupyter, built offline. Under ``make
test`` the notebooks are not executed again: the root ``conftest.py`` records what nbval ran
(:func:`executed_from_cells`) and ``tests/test_book.py`` builds the book from that.

``python -m sa_kit.book times notebooks/01_vae_mnist.ipynb`` executes one chapter and prints its
measured time per section (``##`` heading) as a Markdown table; ``times --executed DIR`` reads
notebooks executed before (by ``build`` or by the test run).

Formulas render offline: MathJax 2.7 comes from the ``jupyter-server-mathjax`` package (PyPI) and
is copied into the site (``assets/mathjax/``); no page fetches anything from the web.

Needs the ``dev`` extra (mkdocs-jupyter, nbclient, jupyter-server-mathjax).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "book"
REPO = "sa-kit/sa-kit"
SECONDS = "sa_kit_seconds"           # cell metadata key: the cell's measured wall time
CHAPTERS_MARKER = "<!-- chapters: sa_kit.book.build lists every executed chapter here -->"
MATHJAX = "assets/mathjax"           # where the site carries its own MathJax (relative URL)
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe,sa-kit"
# the package ships MathJax's STIX-Web fonts only (not its default TeX fonts): use those
MATHJAX_FONTS = """MathJax.Hub.Config({
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null},
  SVG: {font: "STIX-Web"}
});
MathJax.Ajax.loadComplete("[MathJax]/config/sa-kit.js");
"""
INSTRUCTOR_PAGES = {"instructors.md": "instructors/README.md",
                    "lab_plan.md": "instructors/lab_plan.md",
                    "assignment.md": "instructors/assignment/README.md"}

__all__ = ["chapters", "execute", "executed_from_cells", "section_times", "times_table",
           "build", "launch_links", "main"]


def chapters(root: Path = ROOT) -> list[Path]:
    """The chapter notebooks, in order: ``notebooks/0*.ipynb``."""
    return sorted((Path(root) / "notebooks").glob("0*.ipynb"))


def launch_links(name: str) -> dict[str, str]:
    """Colab and Binder links that open ``notebooks/<name>`` of the repository."""
    return {"colab": f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}",
            "binder": f"https://mybinder.org/v2/gh/{REPO}/main?labpath=notebooks/{name}"}


def execute(path: str | Path, out_dir: str | Path, profile: str | None = None,
            timeout: int | None = None) -> Path:
    """Run a notebook top to bottom in a fresh kernel; write it, with each cell's seconds.

    The kernel starts in the notebook's folder with ``SA_KIT_PROFILE=profile`` (if given).
    Returns the executed notebook's path in ``out_dir``.
    """
    import nbformat
    from nbclient import NotebookClient

    path, out_dir = Path(path), Path(out_dir)
    nb = nbformat.read(path, as_version=4)
    old = os.environ.get("SA_KIT_PROFILE")
    if profile:
        os.environ["SA_KIT_PROFILE"] = profile        # the kernel inherits this environment
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        with client.setup_kernel():
            for index, cell in enumerate(nb.cells):
                start = time.perf_counter()
                client.execute_cell(cell, index)
                if cell.cell_type == "code":
                    cell.metadata[SECONDS] = round(time.perf_counter() - start, 2)
    finally:
        if profile:
            os.environ.pop("SA_KIT_PROFILE") if old is None else \
                os.environ.__setitem__("SA_KIT_PROFILE", old)
    nb.metadata["sa_kit"] = {"profile": profile or os.environ.get("SA_KIT_PROFILE", "default"),
                             "executed_by": "nbclient"}
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / path.name)
    return out_dir / path.name


def executed_from_cells(nb: Any, outputs: dict[int, list], seconds: dict[int, float],
                        profile: str) -> Any:
    """A copy of ``nb`` with the outputs a test run recorded for its code cells (by number).

    ``outputs[i]`` / ``seconds[i]`` belong to the i-th *code* cell (nbval's ``Cell i``).
    """
    import nbformat

    nb = copy.deepcopy(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        cell.outputs = [nbformat.from_dict(dict(o)) for o in outputs.get(i, [])]
        for out in cell.outputs:
            if out.output_type == "execute_result":
                out.setdefault("execution_count", i + 1)
                out.setdefault("metadata", {})
        cell.execution_count = i + 1
        if i in seconds:
            cell.metadata[SECONDS] = round(seconds[i], 2)
    nb.metadata["sa_kit"] = {"profile": profile, "executed_by": "nbval"}
    return nb


def section_times(nb: Any) -> list[tuple[str, float]]:
    """Measured seconds per section: code cells summed under the last ``##`` heading."""
    sections: list[list] = [["(top)", 0.0, 0]]
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            heads = [ln[3:].strip() for ln in cell.source.splitlines() if ln.startswith("## ")]
            if heads:
                sections.append([heads[0], 0.0, 0])
        elif cell.cell_type == "code":
            sections[-1][1] += float(cell.metadata.get(SECONDS, 0.0))
            sections[-1][2] += 1
    return [(name, s) for name, s, n_code in sections             # sections with code, and
            if n_code and (name != "(top)" or s >= 1)]               # a top cell that counts


def _fmt(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def times_table(notebooks: Sequence[Any], labels: Sequence[str]) -> str:
    """A Markdown table of section times, one column per executed copy of the same chapter."""
    columns = [dict(section_times(nb)) for nb in notebooks]
    names = [name for name, _ in section_times(notebooks[0])]
    lines = ["| section | " + " | ".join(labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(_fmt(c.get(name, 0.0)) for c in columns) + " |")
    lines.append("| **total** | " + " | ".join(f"**{_fmt(sum(c.values()))}**" for c in columns)
                 + " |")
    return "\n".join(lines)


def _title(nb: Any, fallback: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return fallback


def _build_times(nb: Any) -> str:
    """The page's own measurement: time per section of the run this page shows."""
    meta = nb.metadata.get("sa_kit", {})
    how = "by nbval (`make test`)" if meta.get("executed_by") == "nbval" else "by `make book`"
    return (f"**Time per section of the run shown on this page** (profile "
            f"`{meta.get('profile', '?')}`, executed {how}; the wall time of each cell, summed "
            f"per section):\n\n" + times_table([nb], [meta.get("profile", "?")]))


def _mkdocs_config(docs: Path, site: Path, nav: list) -> dict[str, Any]:
    return {
        "site_name": "Selective Amnesia, hands on",
        "site_description": "Make a generative model forget: the sa-kit book",
        "repo_url": f"https://github.com/{REPO}",
        "docs_dir": str(docs), "site_dir": str(site),
        "use_directory_urls": False,                 # the site also works from file://
        "theme": {"name": "material", "font": False,  # no web fonts: nothing fetched offline
                  "features": ["navigation.sections", "navigation.footer"]},
        "markdown_extensions": ["tables", "admonition", "attr_list", "def_list",
                                {"toc": {"permalink": True}}],
        "plugins": [{"mkdocs-jupyter": {
            "include_source": True, "execute": False, "ignore_h1_titles": True,
            "allow_errors": False, "include": ["*.ipynb"], "cache": False,
            # every page sits at the site's root (use_directory_urls off): a relative URL works
            # from a web server and from file:// alike
            "custom_mathjax_url": f"{MATHJAX}/MathJax.js?config={MATHJAX_CONFIG}"}}],
        "nav": nav,
    }


def _copy_mathjax(docs: Path) -> None:
    """Put MathJax's own files into the site, so formulas render with no network."""
    import jupyter_server_mathjax
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    shutil.copytree(static, docs / MATHJAX, ignore=shutil.ignore_patterns("localization"))
    (docs / MATHJAX / "config" / "sa-kit.js").write_text(MATHJAX_FONTS)


def build(executed: Iterable[str | Path], site: str | Path, pages: Path = PAGES) -> Path:
    """Build the static site from executed chapter notebooks and the pages in ``book/``.

    Returns the site folder (``index.html``, one ``.html`` page per chapter and per page).
    """
    import nbformat
    import yaml
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config

    site = Path(site).resolve()
    work = site.parent / (site.name + "-src")
    shutil.rmtree(work, ignore_errors=True)
    docs = work / "docs"
    shutil.copytree(pages, docs, ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))
    _copy_mathjax(docs)
    chapter_nav = []
    for path in sorted(Path(p) for p in executed):
        nb = nbformat.read(path, as_version=4)
        nb.cells.insert(1, nbformat.v4.new_markdown_cell(_build_times(nb)))
        nbformat.write(nb, docs / path.name)
        chapter_nav.append({_title(nb, path.stem): path.name})
    index = docs / "index.md"
    index.write_text(index.read_text().replace(CHAPTERS_MARKER, "\n".join(
        f"* [{title}]({file})" for item in chapter_nav for title, file in item.items())))
    for page, source in INSTRUCTOR_PAGES.items():         # one source: the instructors/ files
        shutil.copy(ROOT / source, docs / page)
    nav = [{"Home": "index.md"}, {"Chapters": chapter_nav}, {"Outlook": "outlook.md"},
           {"Glossary": "glossary.md"}, {"References": "references.md"},
           {"For instructors": ["instructors.md", "lab_plan.md", "assignment.md"]}]
    config_file = work / "mkdocs.yml"
    config_file.write_text(yaml.safe_dump(_mkdocs_config(docs, site, nav), sort_keys=False))
    mkdocs_build(load_config(str(config_file)))
    return site


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sa_kit.book", description=__doc__.split(
        "\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="execute every chapter once and build the site")
    b.add_argument("--executed", type=Path, default=None,
                   help="use notebooks already executed in this folder (no execution)")
    b.add_argument("--out", type=Path, default=ROOT / "build" / "book")
    t = sub.add_parser("times", help="measured time per section of chapters")
    t.add_argument("notebooks", nargs="*", type=Path)
    t.add_argument("--executed", type=Path, nargs="*", default=None,
                   help="folders of executed copies (one column each) instead of executing")
    t.add_argument("--out", type=Path, default=None,
                   help="where the executed copies go (default build/times-<profile>)")
    args = parser.parse_args(argv)
    profile = os.environ.setdefault("SA_KIT_PROFILE", "cpu")

    if args.command == "build":
        start = time.perf_counter()
        executed_dir = args.executed
        if executed_dir is None:
            executed_dir = args.out.parent / f"executed-{profile}"
            for path in chapters():
                t0 = time.perf_counter()
                print(f"executing {path.name} (profile {profile}) ...", flush=True)
                execute(path, executed_dir, profile)
                print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
        names = {p.name for p in chapters()}
        site = build([p for p in Path(executed_dir).glob("0*.ipynb") if p.name in names],
                     args.out)
        pages = sorted(p.relative_to(site).as_posix() for p in site.glob("*.html"))
        print(f"book built in {time.perf_counter() - start:.0f} s: {site / 'index.html'}")
        print("pages: " + ", ".join(pages))
        return 0

    import nbformat
    paths = args.notebooks or chapters()
    for path in paths:
        if args.executed:
            nbs = [nbformat.read(Path(d) / Path(path).name, as_version=4) for d in args.executed]
            labels = [Path(d).name for d in args.executed]
        else:
            out = args.out or ROOT / "build" / f"times-{profile}"
            nbs = [nbformat.read(execute(path, out, profile), as_version=4)]
            labels = [profile]
        print(f"\n{Path(path).name}\n\n" + times_table(nbs, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
