"""Shared fixtures: where the corpus is, tiny settings, and a way to run the scripts as a user would."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

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


@pytest.fixture(scope="session")
def corpus():
    """The real tiny Shakespeare: input.txt at the root (as .ci/run puts it), else the shared copy."""
    for path in (ROOT / "input.txt", SHARED_CORPUS):
        if path.is_file():
            return path
    pytest.fail("tiny Shakespeare not found: copy ../shared/data/tinyshakespeare.txt to input.txt")


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


def trained_once(tmp_path_factory, name, argv):
    """For a module's fixture: out_dir of a run of gpt.main(argv + --out_dir), trained on one thread."""
    import gpt

    out_dir = tmp_path_factory.mktemp(name) / "out"
    with on_one_thread():
        assert gpt.main([*argv, f"--out_dir={out_dir}"]) == 0
    return out_dir


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
