"""The book builds from the notebooks this run executed, and a real browser sees every figure.

Under ``make test`` nbval executes each chapter once; the root ``conftest.py`` records the
outputs and this test (marker ``book``, moved after every other item) builds the site from them
with :func:`sa_kit.book.build` -- mkdocs + mkdocs-jupyter, offline. A chapter nbval did not run
in this session (e.g. ``pytest tests/test_book.py`` alone) is executed here first, in the ci
profile (``SA_KIT_BROWSER_CACHE`` names a lasting cache for that, as in ``test_browser.py``).

Debian's Chromium (Playwright, no browser download) then opens every page from ``file://`` and
checks, per chapter, that the formulas are typeset by the site's own MathJax, that each figure
the notebook made is on the page and decodes, that each table it printed is there, that the
launch links point at the chapter, and that the shared pages (glossary, references, outlook,
instructors) are linked and filled. Set
``SA_KIT_BOOK_OUT=<dir>`` to keep the built site.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest

from sa_kit import book

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]

try:
    from playwright import sync_api
except ImportError:                                   # pragma: no cover - depends on the env
    sync_api = None

pytestmark = [pytest.mark.book, pytest.mark.slow, pytest.mark.browser]


def _expected(nb) -> dict[str, int]:
    """What the executed notebook holds: figures (PNG outputs), tables (HTML / Markdown), and
    Markdown cells with formulas ($...$)."""
    images = html_tables = md_tables = math = 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            md_tables += sum(1 for ln in cell.source.splitlines()
                             if ln.replace(" ", "").startswith("|---"))
            math += cell.source.count("$") >= 2
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            images += "image/png" in data
            if "text/html" in data and "image/png" not in data:
                html_tables += str(data["text/html"]).count("<table")
    return {"images": images, "html_tables": html_tables, "md_tables": md_tables, "math": math}


def _executed(executed_chapters, tmp_path, monkeypatch) -> list[Path]:
    out = []
    for path in book.chapters():
        done = executed_chapters.get(path.name)
        if done is None:                              # nbval did not run it in this session
            if os.environ.get("SA_KIT_BROWSER_CACHE"):
                monkeypatch.setenv("SA_KIT_CACHE", os.environ["SA_KIT_BROWSER_CACHE"])
            done = book.execute(path, tmp_path / "executed", profile="ci")
        failed = nbformat.read(done, as_version=4).metadata.get("sa_kit", {}).get(
            "failed_cells", [])
        assert not failed, f"{path.name}: cells {failed} failed under nbval; no book from that"
        out.append(Path(done))
    return out


def test_book_builds_from_the_run_and_shows_every_figure_and_table(executed_chapters, tmp_path,
                                                                   monkeypatch):
    executed = _executed(executed_chapters, tmp_path, monkeypatch)
    assert executed, "no chapters found (notebooks/0*.ipynb)"
    start = time.perf_counter()
    site = book.build(executed, Path(os.environ.get("SA_KIT_BOOK_OUT") or tmp_path / "site"))
    seconds = time.perf_counter() - start
    pages = sorted(p.name for p in site.glob("*.html"))
    print(f"\nbook built in {seconds:.1f} s: {', '.join(pages)}")
    shared = ["index.html", "glossary.html", "references.html", "outlook.html",
              "instructors.html"]
    assert set(shared) <= set(pages), pages
    assert {p.with_suffix(".html").name for p in executed} <= set(pages), pages

    if sync_api is None or not os.access(CHROMIUM, os.X_OK):
        pytest.skip("the site was built; Chromium or playwright is missing for the page checks")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
                                     headless=True)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        try:
            for path in executed:
                want = _expected(nbformat.read(path, as_version=4))
                page.goto((site / path.with_suffix(".html").name).as_uri())
                page.wait_for_load_state("load")
                # formulas: typeset by the site's own MathJax (file://, no network), no errors
                page.wait_for_function("window.MathJax && MathJax.Hub && MathJax.Hub.queue"
                                       " && MathJax.Hub.queue.pending === 0"
                                       " && !MathJax.Hub.queue.running", timeout=60_000)
                typeset = page.locator(".MathJax, .MathJax_Display").count()
                assert typeset >= want["math"], (path.name, typeset, want)
                assert page.locator(".MathJax_Error, .merror").count() == 0, path.name
                figures = page.locator(".jp-OutputArea-output img")
                # every figure is on the page and decodes (lazy images: scroll each into view)
                decoded = 0
                for i in range(figures.count()):
                    figures.nth(i).scroll_into_view_if_needed()
                    decoded += figures.nth(i).evaluate("im => im.complete && im.naturalWidth > 0")
                assert figures.count() >= want["images"] >= 1, (path.name, want)
                assert decoded == figures.count(), f"{path.name}: a figure does not decode"
                assert page.locator(".jp-OutputArea-output table").count() >= \
                    want["html_tables"], (path.name, want)
                assert page.locator(".jp-MarkdownOutput table").count() >= want["md_tables"]
                assert want["html_tables"] + want["md_tables"] >= 1, f"{path.name}: no table"
                links = page.locator("a[href*='colab.research.google.com']")
                hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
                assert book.launch_links(path.name)["colab"] in hrefs, path.name
                assert page.locator(f"a[href='{book.launch_links(path.name)['binder']}']").count()
                assert "Check your understanding" in page.content(), path.name
                assert "Time per section of the run shown on this page" in page.content()
            page.goto((site / "index.html").as_uri())
            for name in shared[1:]:
                assert page.locator(f"a[href='{name}']").count(), f"{name} is not linked"
            page.goto((site / "references.html").as_uri())
            text = page.inner_text("body")
            for cited in ("Heng", "Kirkpatrick", "Shin", "Ho", "Salimans", "Rombach",
                          "Gandikota", "Pham"):
                assert cited in text, cited
            page.goto((site / "glossary.html").as_uri())
            assert page.locator("dt, th, strong").count() >= 15
        finally:
            browser.close()
