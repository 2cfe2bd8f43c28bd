"""Interrupts and damaged runs: Ctrl-C is answered at once and cuts an evaluation or the final sample short; a
damaged run file never blocks a resume; two runs cannot share an out_dir; running out of memory gets advice.

The interrupts are real signals sent to real processes, the damaged files are real files on disk, and the lock is
tested against a real second process."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import ROOT, SERIAL_ENV, TINY, run_script, snapshot

import gpt

pytestmark = pytest.mark.usefixtures("one_thread")

ACK = "stopping: last.pt is saved after this step (an evaluation is cut short); Ctrl-C again stops at once"
AT_ONCE = "interrupted: stopped at once; nothing new was saved, the checkpoints on disk are whole"
INTERRUPTED = re.compile(r"^interrupted at step (\d+): saved (.*); continue with --resume$", re.M)
# a model whose training step takes a good fraction of a second on a CPU, so that a signal finds it mid-step
SLOW = ["--device=cpu", "--n_layer=4", "--n_head=4", "--n_embd=256", "--block_size=128", "--batch_size=32"]
SLOW += ["--dropout=0", "--eval_iters=1"]


def start(args, cwd=ROOT):
    """gpt.py in a fresh process; its stdout and stderr are read line by line on threads, into lists."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **SERIAL_ENV}
    cmd = [sys.executable, str(ROOT / "gpt.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.out, proc.err = [], []
    for stream, lines in ((proc.stdout, proc.out), (proc.stderr, proc.err)):
        threading.Thread(target=lambda s=stream, lines=lines: lines.extend(s), daemon=True).start()
    return proc


def wait_for(proc, lines, prefix, timeout=120):
    """Wait until one of `lines` (proc.out or proc.err) starts with prefix; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) for line in lines):
        assert proc.poll() is None, f"ended before {prefix!r}:\n{''.join(proc.out)}\n{''.join(proc.err)}"
        assert time.monotonic() < deadline, f"no line {prefix!r} in {timeout} s"
        time.sleep(0.02)


def finish(proc, timeout=60):
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
    time.sleep(0.2)  # the reader threads take the last lines
    return "".join(proc.out), "".join(proc.err), proc.returncode


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(out_dir):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "ms_per_iter")} for r in rows(out_dir)]


# ---- interrupts ---------------------------------------------------------------------------------------------


def test_ctrl_c_during_the_default_models_first_evaluation_ends_within_seconds(corpus, tmp_path):
    """The new user's case: the default model on a CPU, whose first evaluation alone takes minutes (here at an eighth of
    its batch, so that the timing at setup, a few passes of the model before the note, takes seconds, not a minute)."""
    proc = start([f"--data={corpus}", "--device=cpu", "--batch_size=8", f"--out_dir={tmp_path / 'out'}"])
    wait_for(proc, proc.out, "note: this run will take about")
    wait_for(proc, proc.out, "batch ")  # the header's last line; with the note, just before the loop starts
    time.sleep(1.0)  # into the step-0 evaluation: 400 forward passes of the full-size model
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    out, err, status = finish(proc)
    assert time.monotonic() - sent < 20  # a batch, then the save of 43 MB; not the rest of the evaluation
    assert status == 130 and "Traceback" not in out + err
    assert err.strip() == ACK  # said at once, in one line
    assert INTERRUPTED.search(out)[1] == "0"
    last = gpt.load_checkpoint(tmp_path / "out" / "last.pt")
    assert (last["step"], last["evaluated_step"]) == (0, -1)  # resumable: step 0 is evaluated again on --resume
    assert rows(tmp_path / "out") == []


def test_an_evaluation_cut_short_resumes_to_the_same_run(corpus, tmp_path):
    """A Ctrl-C in the middle of the step-0 evaluation: last.pt at step 0, the batch generator as it was before
    the evaluation; resumed, the run ends bit-identical to one that was never interrupted."""
    common = [*TINY, f"--data={corpus}", "--dropout=0.1", "--max_iters=10", "--eval_interval=5", "--eval_iters=400"]
    whole = start([*common, f"--out_dir={tmp_path / 'whole'}"])
    cut = start([*common, f"--out_dir={tmp_path / 'cut'}"])
    wait_for(cut, cut.out, "batch ")  # the header: the step-0 evaluation (800 batches) comes next
    time.sleep(0.1)
    cut.send_signal(signal.SIGINT)
    out, err, status = finish(cut)
    assert status == 130 and err.strip() == ACK and "Traceback" not in out + err
    assert INTERRUPTED.search(out)[1] == "0" and "step 0/" not in out  # no progress line: the estimate was given up
    resumed = run_script("gpt.py", *common, f"--out_dir={tmp_path / 'cut'}", "--resume", env=SERIAL_ENV, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert re.findall(r"^step (\d+)/", resumed.stdout, re.M) == ["0", "5", "10"]  # step 0 evaluated after all
    assert finish(whole, timeout=180)[2] == 0
    assert without_timing(tmp_path / "cut") == without_timing(tmp_path / "whole")
    a, b = (gpt.load_checkpoint(tmp_path / name / "ckpt.pt")["model"] for name in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once_and_keeps_what_was_saved(corpus, tmp_path):
    out_dir = tmp_path / "out"
    proc = start([*SLOW, f"--data={corpus}", "--max_iters=1000", "--eval_interval=1000", f"--out_dir={out_dir}"])
    wait_for(proc, proc.out, "step 0/")  # ckpt.pt of step 0 is written, then step 0 trains
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    wait_for(proc, proc.err, ACK)
    proc.send_signal(signal.SIGINT)  # while the step still runs
    out, err, status = finish(proc)
    assert status == 130 and "Traceback" not in out + err
    assert [line for line in err.splitlines() if line] == [ACK, AT_ONCE]
    assert not INTERRUPTED.search(out) and not (out_dir / "last.pt").exists()  # nothing new was saved
    assert gpt.load_checkpoint(out_dir / "ckpt.pt")["step"] == 0  # and what was saved before is whole
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]  # no temporary file, no lock


def test_ctrl_c_during_the_final_sample_stops_it_at_once(corpus, tmp_path):
    out_dir = tmp_path / "out"
    proc = start([*SLOW, f"--data={corpus}", "--max_iters=1", f"--out_dir={out_dir}"])
    wait_for(proc, proc.out, "sample from the best model")
    proc.send_signal(signal.SIGINT)
    out, err, status = finish(proc)
    assert status == 130 and "Traceback" not in out + err
    assert err.strip() == AT_ONCE and "final: " not in out
    assert gpt.load_checkpoint(out_dir / "ckpt.pt")["step"] in (0, 1)  # the trained model is kept
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]


# ---- damaged run files ----------------------------------------------------------------------------------------

TRAIN = [*TINY, "--max_iters=10", "--eval_interval=5"]


@pytest.fixture(scope="module")
def interrupted_dir(corpus, tmp_path_factory):
    """out_dir of a tiny run stopped by SIGTERM after its step-5 evaluation: ckpt.pt, last.pt, metrics.jsonl."""
    out_dir = tmp_path_factory.mktemp("interrupted") / "out"
    proc = start([*TINY, f"--data={corpus}", "--max_iters=1000000", "--eval_interval=5", f"--out_dir={out_dir}"])
    wait_for(proc, proc.out, "step 5/")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc)[2] == 128 + signal.SIGTERM
    return out_dir


@pytest.fixture
def out(interrupted_dir, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(interrupted_dir, copy)
    return copy


def resume(capsys, corpus, out_dir, *args):
    status = gpt.main([*TINY, f"--data={corpus}", f"--out_dir={out_dir}", "--resume", *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return status, captured.out, captured.err


def test_damaged_lines_of_metrics_jsonl_are_dropped_with_a_warning(out, corpus, capsys):
    resumed_step = max(gpt.load_checkpoint(out / name)["step"] for name in ("last.pt", "ckpt.pt"))
    good = (out / "metrics.jsonl").read_text().splitlines()
    assert len(good) >= 2 and json.loads(good[-1])["step"] <= resumed_step
    damaged = [
        good[0],
        "\x00\x00garbage",
        *good[1:],
        '{"step": 99, "train_lo',
    ]  # a cut-off last line, as a crash leaves
    (out / "metrics.jsonl").write_text("\n".join(damaged))
    status, stdout, _ = resume(capsys, corpus, out, "--max_iters=60")
    assert status == 0
    warnings = [line for line in stdout.splitlines() if line.startswith("warning:")]
    expected = f"warning: dropped 2 damaged line(s) of {out / 'metrics.jsonl'}, as a crash while writing leaves them"
    assert warnings == [expected]
    kept = (out / "metrics.jsonl").read_text().splitlines()
    assert kept[: len(good)] == good  # the whole lines, as they were
    steps = [r["step"] for r in rows(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # and the run went on after them


@pytest.mark.parametrize("damaged", ["last.pt", "ckpt.pt"])
def test_resume_goes_on_from_the_whole_checkpoint(damaged, out, corpus, capsys):
    whole = "ckpt.pt" if damaged == "last.pt" else "last.pt"
    ckpt = gpt.load_checkpoint(out / whole)
    # TINY evaluates every 10 steps: the first evaluation is the first multiple of 10 not yet evaluated
    first = next(s for s in range(ckpt["step"], 61) if s % 10 == 0 and s > ckpt.get("evaluated_step", ckpt["step"]))
    (out / damaged).write_bytes((out / damaged).read_bytes()[:1000])  # cut short, as a full disk would
    status, stdout, _ = resume(capsys, corpus, out, "--max_iters=60")
    assert status == 0
    warning = f"warning: {out / damaged} is damaged and cannot be read; resuming from {out / whole} instead"
    assert [line for line in stdout.splitlines() if line.startswith("warning:")] == [warning]
    steps = [int(s) for s in re.findall(r"^step (\d+)/", stdout, re.M)]
    assert steps == list(range(first, 61, 10))  # on from the whole checkpoint, its own step not evaluated again
    assert gpt.load_checkpoint(out / "ckpt.pt")["step"] > 0  # a whole ckpt.pt again
    assert "final: " in stdout


def test_with_no_whole_checkpoint_the_resume_is_refused_as_before(out, corpus, capsys):
    for name in ("last.pt", "ckpt.pt"):
        (out / name).write_text("not a checkpoint")
    before = snapshot(out)
    status, stdout, err = resume(capsys, corpus, out)
    assert status == 1 and stdout == ""
    assert err.startswith(f"error: {out / 'last.pt'} is not a checkpoint that can be read (") and err.count("\n") == 1
    assert snapshot(out) == before


# ---- one run per out_dir -------------------------------------------------------------------------------------


def test_a_second_run_into_a_busy_out_dir_is_refused_and_a_killed_one_blocks_nothing(corpus, tmp_path, capsys):
    out_dir = tmp_path / "out"
    first = start(
        [*TINY, f"--data={corpus}", "--max_iters=100000000", "--eval_interval=100000000", f"--out_dir={out_dir}"]
    )
    try:
        wait_for(first, first.out, "step 0/")
        while not (out_dir / "ckpt.pt").exists() or len(list(out_dir.iterdir())) != 3:  # ckpt.pt written, renamed
            time.sleep(0.02)
        before = snapshot(out_dir)
        second = run_script("gpt.py", *TINY, f"--data={corpus}", f"--out_dir={out_dir}", env=SERIAL_ENV)
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr == (
            f"error: --out_dir={out_dir} is in use by another training run (process {first.pid}); wait for it to end "
            f"or stop it, or train into another --out_dir\n"
        )
        assert snapshot(out_dir) == before  # nothing of the first run touched
        # sampling reads the checkpoint: allowed while the run trains (here from this process, a third one)
        assert gpt.main(["--sample", f"--out_dir={out_dir}", "--max_new_tokens=10"]) == 0
        assert len(capsys.readouterr().out) == 1 + 10 + 1
        assert first.poll() is None  # still training
    finally:
        first.kill()  # kill -9: no chance to clean up
        first.wait()
    assert (out_dir / "train.lock").exists()  # left behind, but the lock went with the process
    assert gpt.main([*TINY, f"--data={corpus}", f"--out_dir={out_dir}"]) == 0
    names = sorted(p.name for p in out_dir.iterdir())  # the killed run's files are set aside, not lost
    assert names[0] == "ckpt.pt" and names[1].startswith("earlier-") and names[2:] == ["metrics.jsonl"]


# ---- out of memory --------------------------------------------------------------------------------------------


def oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity)")


ADVICE = (
    "error: out of memory on the device: lower --batch_size (8) and raise --gradient_accumulation_steps by the same "
    "factor to keep the effective batch, or lower --block_size (16) or --n_embd (32); the checkpoints are kept\n"
)


@pytest.mark.parametrize("where", ["training", "evaluation", "sampling"])
def test_out_of_memory_gets_advice_and_keeps_the_checkpoints(where, corpus, tmp_path, monkeypatch, capsys):
    calls = []
    name = {"training": "train_step", "evaluation": "estimate_loss", "sampling": "print_sample"}[where]
    real = getattr(gpt, name)

    def after_the_first_call(*args, **kwargs):  # the first evaluation is whole, so ckpt.pt of step 0 exists
        if isinstance(args[-1], gpt.Trial):  # a step timed before step 0 (the note's) is not one of the run's
            return real(*args, **kwargs)
        calls.append(1)
        return oom() if len(calls) > 1 or where == "sampling" else real(*args, **kwargs)

    monkeypatch.setattr(gpt, name, after_the_first_call)
    out_dir = tmp_path / "out"
    assert gpt.main([*TINY, f"--data={corpus}", f"--out_dir={out_dir}"]) == 1
    captured = capsys.readouterr()
    assert captured.err == ADVICE and "Traceback" not in captured.out
    assert gpt.load_checkpoint(out_dir / "ckpt.pt")["step"] == (20 if where == "sampling" else 0)
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]
