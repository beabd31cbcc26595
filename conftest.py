"""Repository-wide pytest hooks: the book is built from the very run that nbval checks.

While nbval executes a chapter (``pytest notebooks --nbval-lax``), each code cell's outputs and
wall time are recorded; after the chapter's last cell the executed notebook is written to
``build/executed-<profile>/`` (:func:`sa_kit.book.executed_from_cells`) and listed in the
``executed_chapters`` fixture. ``tests/test_book.py`` (marker ``book``) runs after every other
item and builds the book from those notebooks, so ``make test`` executes each chapter once.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
_RECORD = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[_RECORD] = {}


def pytest_collection_modifyitems(config, items):
    """Items marked ``book`` go last: they read what the notebooks' run produced."""
    items[:] = [i for i in items if not i.get_closest_marker("book")] + \
        [i for i in items if i.get_closest_marker("book")]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when != "call" or not hasattr(item, "test_outputs") or not hasattr(item, "cell_num"):
        return                                            # not an nbval cell
    notebook = item.parent
    state = item.config.stash[_RECORD].setdefault(
        str(notebook.path), {"outputs": {}, "seconds": {}, "failed": [], "written": None})
    state["outputs"][item.cell_num] = list(item.test_outputs or [])
    state["seconds"][item.cell_num] = call.duration
    if outcome.get_result().failed:
        state["failed"].append(item.cell_num)
    n_code = sum(c.cell_type == "code" for c in notebook.nb.cells)
    if item.cell_num == n_code - 1:                       # the chapter's last code cell
        import nbformat

        from sa_kit.book import executed_from_cells
        profile = os.environ.get("SA_KIT_PROFILE", "default")
        nb = executed_from_cells(notebook.nb, state["outputs"], state["seconds"], profile)
        nb.metadata["sa_kit"]["failed_cells"] = state["failed"]
        out = ROOT / "build" / f"executed-{profile}" / notebook.path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
        state["written"] = out


@pytest.fixture
def executed_chapters(request) -> dict[str, Path]:
    """``{notebook file name: executed copy}`` for every notebook nbval ran in this session."""
    return {Path(k).name: v["written"] for k, v in request.config.stash[_RECORD].items()
            if v["written"] is not None}
