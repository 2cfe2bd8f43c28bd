"""The README's commands are the ones the code and CI use, so that they cannot drift apart."""

import re

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
