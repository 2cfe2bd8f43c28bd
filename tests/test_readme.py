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


def test_the_sizes_the_readme_gives_are_the_models_sizes():
    """The defaults (6 layers, 6 heads, 384 wide, context 256, 10.8M parameters) and the CPU recipe (0.82M, 4 layers,
    4 heads, 128 wide, context 64), as the README says them, against Config, CPU_RECIPE and the models they build for
    tiny Shakespeare's 65 characters."""
    shape = r"(\d+) layers, (\d+) heads, (\d+) wide, context (\d+)"
    defaults = re.search(rf"The defaults are [^(]*\({shape}, ([\d.]+)M parameters\)", README)
    recipe = re.search(rf"a ([\d.]+)M-parameter model \({shape}\)", README)
    assert defaults and recipe, "the README no longer gives the sizes in the words this test reads"
    said = {"defaults": (*defaults.groups()[:4], defaults[5]), "recipe": (*recipe.groups()[1:], recipe[1])}
    for name, cfg in (("defaults", gpt.Config()), ("recipe", gpt.CPU_RECIPE)):
        *numbers, millions = said[name]
        assert [int(n) for n in numbers] == [cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size], name
        params = sum(p.numel() for p in gpt.GPT(65, cfg).parameters())
        decimals = len(millions.partition(".")[2])
        assert f"{params / 1e6:.{decimals}f}" == millions, (name, params)


def test_the_knob_tables_defaults_are_configs():
    """The default column: `(empty)` for an empty string, `a newline` for the prompt, numbers as --help shows them."""
    table = markdown_table(README, "| knob | default |")
    assert sorted(name.strip("`") for name in table) == sorted(f.name for f in gpt.fields(gpt.Config))  # every knob
    for f in gpt.fields(gpt.Config):
        default = getattr(gpt.Config(), f.name)
        shown = {"": "(empty)", "\n": "a newline"}.get(default, default) if type(default) is str else default
        shown = f"{shown:g}" if type(shown) is float else str(shown)
        assert table[f"`{f.name}`"][0] == f"`{shown}`", f.name


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
