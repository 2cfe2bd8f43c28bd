"""The README's commands are the ones the code and CI use, so that they cannot drift apart."""

import re

import pytest
from conftest import ROOT

import gpt

README = (ROOT / "README.md").read_text()


def test_cpu_recipe_in_readme_is_the_one_gpt_py_suggests():
    recipe = gpt.command_line(gpt.CPU_RECIPE)
    assert recipe == "python gpt.py --recipe=cpu"  # a short command for a laptop
    overrides = gpt.parse_overrides(recipe.split()[2:])
    assert gpt.replace(gpt.starting_point(overrides), **overrides) == gpt.CPU_RECIPE  # it round-trips
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert any(recipe in block for block in blocks)


def test_ci_runs_the_readme_test_command():
    setup_and_run = "pip install -e . && python gpt.py"
    setup_and_test = 'pip install -e ".[test]" && python -m pytest'
    assert setup_and_run in README and setup_and_test in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in ci and "torch==2.13.0" in ci and '".[test]"' in ci


def test_every_knob_is_in_the_readme_table():
    for f in gpt.fields(gpt.Config):
        assert f"| `{f.name}` |" in README, f.name


def markdown_table(text, header):
    """{first cell: [the other cells]} of the Markdown table in text whose header row starts with `header`."""
    lines = text[text.index(header) :].splitlines()[2:]  # after the header and the |---| row
    rows = [line for line in lines[: next((i for i, line in enumerate(lines) if not line.startswith("|")), None)]]
    cells = [[cell.strip(" *") for cell in row.strip().strip("|").split("|")] for row in rows]
    return {row[0]: row[1:] for row in cells}


def test_the_build_up_table_is_notebook_03s():
    """The README's val losses of the build-up are the ones notebook 03's committed outputs show."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")

    nb = nbformat.reads((ROOT / "notebooks" / "03_building_the_transformer.ipynb").read_text(), as_version=4)
    shown = [o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    notebook = markdown_table(next(t for t in shown if t.startswith("| step | lecture |")), "| step | lecture |")
    readme = markdown_table(README, "| step | lecture | notebook 03 |")
    assert readme.keys() == notebook.keys() and len(readme) >= 7
    for step, (_, ours) in readme.items():
        assert ours == notebook[step][2], step  # the notebook's columns: lecture, lecture's code here, val, ...
