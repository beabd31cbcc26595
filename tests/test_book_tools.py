"""The book's tools (``sa_kit.book``) and what every chapter carries for a course."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from sa_kit import book

ROOT = Path(__file__).resolve().parents[1]


def _toy():
    return new_notebook(cells=[
        new_markdown_cell("# Chapter 9 — Toy"), new_code_cell("import os"),
        new_markdown_cell("## 1. First\ntext"), new_code_cell("x = 1"), new_code_cell("x"),
        new_markdown_cell("## 2. Only words"),
        new_markdown_cell("## 3. Last"), new_code_cell("print(x)")])


def test_chapters_are_found_by_glob_and_launch_links_match_the_repository():
    names = [p.name for p in book.chapters()]
    assert names[:3] == ["01_vae_mnist.ipynb", "02_class_conditional_ddpm.ipynb",
                         "03_text_to_image.ipynb"] and names == sorted(names)
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert repo == f"https://github.com/{book.REPO}" and (ROOT / "binder").is_dir()
    links = book.launch_links("01_vae_mnist.ipynb")
    assert links["colab"].endswith(f"/github/{book.REPO}/blob/main/notebooks/01_vae_mnist.ipynb")
    assert links["binder"].endswith(f"/gh/{book.REPO}/main?labpath=notebooks/01_vae_mnist.ipynb")


def test_a_test_run_becomes_an_executed_notebook_with_section_times():
    nb = _toy()
    outputs = {2: [new_output("execute_result", {"text/plain": "1"}, execution_count=3)],
               3: [new_output("stream", name="stdout", text="1\n")]}
    seconds = {0: 0.2, 1: 1.0, 2: 2.5, 3: 40.0}
    done = book.executed_from_cells(nb, outputs, seconds, "ci")
    nbformat.validate(done)
    code = [c for c in done.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, 2, 3, 4]
    assert code[3].outputs[0].text == "1\n" and code[0].outputs == []
    assert done.metadata["sa_kit"]["profile"] == "ci" and not nb.cells[1].get("outputs")
    # sections: the top cell (0.2 s) is left out, a section without code too
    assert book.section_times(done) == [("1. First", 3.5), ("3. Last", 40.0)]
    table = book.times_table([done, done], ["ci", "cpu"])
    assert "| 1. First | 4 s | 4 s |" in table and "| **total** | **44 s** | **44 s** |" in table


def test_every_chapter_carries_badges_figure_questions_and_terms():
    for path in book.chapters():
        nb = nbformat.read(path, as_version=4)
        text = "\n".join(c.source for c in nb.cells)
        links = book.launch_links(path.name)
        assert links["colab"] in nb.cells[0].source and links["binder"] in nb.cells[0].source, \
            f"{path.name}: launch badges in the title cell"
        assert "plot_method(" in text, f"{path.name}: the method figure"
        questions = next((c.source for c in nb.cells if c.cell_type == "markdown"
                          and c.source.startswith("## Check your understanding")), "")
        assert 3 <= len(re.findall(r"^\d\. ", questions, re.M)) <= 5, \
            f"{path.name}: 3-5 'check your understanding' questions"
        assert "## Terms and references" in text, f"{path.name}: terms and references"
        solutions = ROOT / "instructors" / f"solutions_{path.name}"
        assert solutions.exists(), f"{path.name}: answers in {solutions.name}"


def test_the_shared_pages_cite_every_reference_the_issue_names():
    refs = (ROOT / "book" / "references.md").read_text()
    for cited in ("2305.10120", "1612.00796", "1705.08690", "2006.11239", "2207.12598",
                  "2112.10752", "2303.07345", "2308.14761", "2308.01508"):
        assert cited in refs
    for page in ("index.md", "glossary.md", "outlook.md"):
        assert (ROOT / "book" / page).read_text().strip()
    assert book.CHAPTERS_MARKER in (ROOT / "book" / "index.md").read_text()


@pytest.mark.parametrize("bad", [["build", "--nope"], ["nothing"]])
def test_command_line_refuses_bad_arguments(bad):
    with pytest.raises(SystemExit):
        book.main(bad)
