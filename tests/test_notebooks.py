"""Every notebook in notebooks/ runs from top to bottom in fast mode, its asserts included.

The notebooks are executed in memory (the committed files, with the outputs of a full run, are not
touched), from notebooks/ as Jupyter would run them, in a kernel of this interpreter. In fast mode
(GPT_NOTEBOOK_FAST=1) they train for a few iterations only and save their runs in a temporary folder.
The committed notebooks themselves must carry the outputs of a run, without machine paths."""

import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


def notebook_package(name):
    """nbclient, nbformat or ipykernel's kernelspec, imported by the tests that need them: where the notebook extras are
    not installed (a GPU box with PyTorch alone), those tests are skipped and the rest of the suite still collects."""
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install -e '.[test]')")


def files_a_notebook_could_touch():
    """Every file under notebooks/ with its size and modification time, and the names at the repository's root."""
    found = {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in (ROOT / "notebooks").rglob("*")}
    found.update((path, None) for path in ROOT.iterdir())
    return found


@pytest.fixture
def fast_kernel_env(monkeypatch, tmp_path, corpus):
    """The kernel inherits this process's environment: fast mode, temporary files in tmp_path, no .pyc files.

    Its kernel spec, "python3", is written for this interpreter into a folder that Jupyter searches first,
    so that no other Python's kernel spec of that name (in ~/.local/share/jupyter, say) is picked instead."""
    if corpus != ROOT / "input.txt":
        pytest.fail(f"the notebooks read input.txt at the repository's root: copy {corpus} there")
    notebook_package("ipykernel.kernelspec").write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("GPT_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")


def execute(nb, timeout=300):
    client = notebook_package("nbclient").NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    return client.execute()


def test_the_notebooks_are_in_lecture_order():
    names = [p.name for p in NOTEBOOKS]
    assert len(names) >= 2 and all(name[:2].isdigit() and name[2] == "_" for name in names)
    assert [int(name[:2]) for name in names] == list(range(1, len(names) + 1))


def test_the_kernel_runs_this_interpreter(fast_kernel_env):
    nbformat = notebook_package("nbformat")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    out = execute(nb, timeout=60).cells[0].outputs[0]["text"].strip()
    assert Path(out).resolve() == Path(sys.executable).resolve()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_fast_mode(path, fast_kernel_env):
    nbclient = notebook_package("nbclient")
    nbformat = notebook_package("nbformat")
    committed = path.read_bytes()
    before = files_a_notebook_could_touch()
    nb = nbformat.reads(committed.decode(), as_version=4)
    try:
        execute(nb)
    except nbclient.exceptions.CellExecutionError as e:  # the failing cell and its traceback, not nbclient's
        plain = ANSI_COLOUR.sub("", str(e))[-3000:]
        pytest.fail(f"{path.name} failed in fast mode:\n{plain}")
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    assert path.read_bytes() == committed
    after = files_a_notebook_could_touch()
    assert sorted(map(str, after.keys() - before.keys())) == [], "the notebook left files in the repository"
    changed = [str(p) for p in before.keys() & after.keys() if before[p] != after[p]]
    assert changed == [], "the notebook changed files in the repository"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_full_mode(path, fast_kernel_env, monkeypatch):
    """The notebook as a learner runs it, at full scale: every claim that only a full run can hold (its `if not FAST:`
    asserts: the GPT beats the bigram, the figures against the lecture's, the adder's accuracy, temperature) holds.
    Its runs are saved in notebooks/runs/, which git ignores, as when a learner runs it."""
    monkeypatch.delenv("GPT_NOTEBOOK_FAST")
    nb = notebook_package("nbformat").reads(path.read_text(), as_version=4)
    try:
        execute(nb, timeout=3600)
    except notebook_package("nbclient").exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed in full mode:\n{ANSI_COLOUR.sub('', str(e))[-3000:]}")
    if path.name.startswith("03_"):  # the README's build-up table against the val losses this run has just measured
        from test_readme import README, markdown_table

        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        shown = [o.get("data", {}).get("text/markdown", "") for o in outputs]
        measured = markdown_table(next(t for t in shown if t.startswith("| step | lecture |")), "| step | lecture |")
        for step, (_, ours) in markdown_table(README, "| step | lecture | notebook 03 |").items():
            assert abs(float(ours) - float(measured[step][2])) < 0.01, (step, ours, measured[step])  # CPUs round apart


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebooks_are_executed_and_name_no_machine(path):
    nbformat = notebook_package("nbformat")
    nb = nbformat.reads(path.read_text(), as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), f"{path.name} is not committed fully executed"
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    text = "\n".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for cell in code for o in cell.outputs
    )
    home = os.path.expanduser("~")
    for needle in ("/work/", "/root/", "/tmp/", "/home/", "/Users/", "C:\\", str(ROOT), *[home] * (len(home) > 1)):
        assert needle not in text, f"{path.name} shows the machine path {needle!r} in an output"
    assert path.stat().st_size < 1_000_000


HIDE_THE_PROJECT = """import sys
from pathlib import Path
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]  # the finder of pip install -e .
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "gpt.py").exists()]"""


def test_a_notebook_without_the_project_says_so_in_one_line(fast_kernel_env, tmp_path):
    """Opened alone (uploaded to a hosted service, say), a notebook that imports gpt.py names what to fetch
    and where to put it in one line, instead of a ModuleNotFoundError; one that imports nothing of it runs.
    Every notebook's first cell runs in one kernel, in a folder without the project, after the project is hidden."""
    nbclient = notebook_package("nbclient")
    nbformat = notebook_package("nbformat")
    alone = tmp_path / "alone"
    alone.mkdir()
    firsts = [
        next(cell for cell in nbformat.reads(path.read_text(), as_version=4).cells if cell.cell_type == "code")
        for path in NOTEBOOKS
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(HIDE_THE_PROJECT), *firsts])
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", allow_errors=True, resources={"metadata": {"path": str(alone)}}
    )
    client.execute()
    for path, cell in zip(NOTEBOOKS, nb.cells[1:], strict=True):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if "import gpt" not in cell.source:
            assert errors == [], path.name
            continue
        assert len(errors) == 1, (path.name, cell.outputs)
        lines = [ANSI_COLOUR.sub("", line) for line in errors[0]["traceback"]]
        assert len(lines) == 1 and "\n" not in lines[0], (path.name, lines)
        assert "gpt.py" in lines[0] and "folder above" in lines[0] and "ModuleNotFoundError" not in lines[0]
