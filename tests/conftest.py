"""Shared fixtures: where the corpus is, tiny settings, and a way to run the scripts as a user would."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpt import DATA_URL

ROOT = Path(__file__).resolve().parent.parent

# A model small enough to train for a few steps in about a second on a CPU.
TINY = [
    "--device=cpu",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=16",
    "--batch_size=8",
    "--max_iters=20",
    "--eval_interval=10",
    "--eval_iters=2",
    "--dropout=0",
    "--max_new_tokens=20",
    "--eval_sample=16",  # a short line of text at each evaluation: exercised everywhere, cheap
    "--dtype=float32",  # what auto picks on a CPU without bfloat16 instructions; tests compare numbers exactly
]


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu exercise the CUDA paths: they run wherever CUDA is, and are skipped elsewhere, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    why = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(why)


def find_corpus(root=ROOT):
    """tiny Shakespeare, as input.txt in root: the tests never use the network, so it must be there already."""
    path = root / "input.txt"
    if not path.is_file():
        get = 'python -c "import gpt; gpt.load_text()"'
        pytest.fail(f"tiny Shakespeare is not in {path}: download it once with {get} (or save {DATA_URL} there)")
    return path


@pytest.fixture(scope="session")
def corpus():
    return find_corpus()


def run_script(script, *args, cwd=None, timeout=120, env=None):
    """Run `python script args...` in a fresh process; never touches the network (the corpus is given)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


# A child process with one thread: on a small machine shared by several processes, torch's thread pool
# spins against the others and a tiny model trains ten times slower. Runs compared with each other all use it.
SERIAL_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@contextlib.contextmanager
def on_one_thread():
    """The same for code run inside the test process; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with on_one_thread():
        yield


@pytest.fixture
def tf32_flags():
    """TF32's two flags, which gpt.precision sets for the whole process, put back after the test."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def trained_once(tmp_path_factory, name, argv):
    """For a module's fixture: out_dir of a run of gpt.main(argv + --out_dir), trained on one thread."""
    import gpt

    out_dir = tmp_path_factory.mktemp(name) / "out"
    with on_one_thread():
        assert gpt.main([*argv, f"--out_dir={out_dir}"]) == 0
    return out_dir


@contextlib.contextmanager
def built(argv):
    """A run as python gpt.py builds it (gpt.build), without an out_dir: for tests that look inside one."""
    import gpt

    with gpt.Run(gpt.parse_overrides(argv), files=False) as run:
        gpt.build(run.cfg, run)
        yield run


def snapshot(folder):
    """Every file and folder under `folder`, files with their bytes and modification time: equal snapshots
    taken before and after a command prove that it wrote, deleted and overwrote nothing there."""
    folder = Path(folder)
    if not folder.exists():
        return None
    found = {}
    for p in sorted(folder.rglob("*")):
        found[str(p.relative_to(folder))] = (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "folder"
    return found


def interrupt_during_step(monkeypatch, call):
    """This process gets SIGINT during its call-th optimizer step, as from Ctrl-C: the run saves last.pt after it."""
    import gpt

    calls, train_step = [], gpt.train_step

    def interrupted_step(*args):
        calls.append(not isinstance(args[-1], gpt.Trial))  # a step timed before step 0 is not one of the run's
        if sum(calls) == call and calls[-1]:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(*args)

    monkeypatch.setattr(gpt, "train_step", interrupted_step)
