"""The command line, end to end: overrides, training, sampling, resuming, and bigram.py."""

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import ROOT, SERIAL_ENV, TINY, run_script

import bigram
import gpt

pytestmark = pytest.mark.usefixtures("one_thread")

FIXED_NAMES = (
    "batch_size block_size max_iters eval_interval eval_iters learning_rate n_embd n_head n_layer dropout device "
    "compile seed data out_dir resume sample prompt max_new_tokens temperature top_k num_samples"
).split()
PROGRESS = re.compile(
    r"^step (\d+)/(\d+) \| train (\d+\.\d{4}) \| val (\d+\.\d{4}) \| lr (\S+)"
    r"( \| [\d.]+ ms/it \| \d+k? tok/s \| eta \S+)?$"
)


def progress(stdout):
    """The progress lines of a run, parsed: [(step, max_iters, train, val, lr)]."""
    found = [PROGRESS.match(line) for line in stdout.splitlines() if line.startswith("step ")]
    assert all(found), stdout
    return [(int(m[1]), int(m[2]), float(m[3]), float(m[4]), float(m[5])) for m in found]


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "ms_per_iter")} for r in rows]


def assert_same_state(a, b):
    """Two checkpoints hold the same step, weights and AdamW state (its moments and step counts), bit for bit."""
    assert (a["step"], a["best_val"]) == (b["step"], b["best_val"])
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "the weights differ"
    moments = [(a["optimizer"]["state"][i], b["optimizer"]["state"][i]) for i in a["optimizer"]["state"]]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys() and len(moments) == len(a["model"])
    for mine, theirs in moments:
        assert mine.keys() == theirs.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), "the optimizer's state differs"


def assert_clean_exit(result, status=0):
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# ---- overrides, parsed ---------------------------------------------------------------------------------


def test_every_fixed_name_is_a_knob():
    names = {f.name for f in dataclasses.fields(gpt.Config)}
    assert set(FIXED_NAMES) <= names


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--max_iters=7"], {"max_iters": 7}),
        (["--max_iters", "7"], {"max_iters": 7}),  # --name value
        (["--learning_rate=3e-4", "--dropout", "0.5"], {"learning_rate": 3e-4, "dropout": 0.5}),
        (["--resume"], {"resume": True}),  # a bare boolean
        (["--resume", "--max_iters=3"], {"resume": True, "max_iters": 3}),
        (["--resume=false", "--compile=on"], {"resume": False, "compile": True}),
        (["--sample", "--prompt=ROMEO:"], {"sample": True, "prompt": "ROMEO:"}),
        (["--top_k=none"], {"top_k": None}),
        (["--top_k", "5", "--device=cpu"], {"top_k": 5, "device": "cpu"}),
        (["--max_iters=1", "--max_iters=2"], {"max_iters": 2}),  # the last one wins
        ([], {}),
    ],
)
def test_parse_overrides(argv, expected):
    got = gpt.parse_overrides(argv)
    assert got == expected
    assert all(type(got[k]) is type(v) for k, v in expected.items())  # 7 is an int, 0.5 a float, True a bool


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--nope=1"], "unrecognized arguments: --nope=1"),
        (["--max_it=5"], "unrecognized arguments: --max_it=5"),  # no abbreviations
        (["--max_iters=ten"], "argument --max_iters: invalid int value: 'ten'"),
        (["--dropout=a lot"], "argument --dropout: invalid float value: 'a lot'"),
        (["--resume=maybe"], "argument --resume: invalid bool value: 'maybe'"),
        (["--top_k=1.5"], "argument --top_k: invalid int value: '1.5'"),
        (["--max_iters"], "argument --max_iters: expected one argument"),
        (["stray"], "unrecognized arguments: stray"),
    ],
)
def test_bad_overrides_are_refused_with_the_valid_names(argv, expected, capsys):
    assert gpt.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: {expected}") and err.count("\n") == 1
    listed = err.split("Valid names: ")[1].split()
    assert set(FIXED_NAMES) <= set(listed)


def test_bad_override_from_the_shell(tmp_path):
    result = run_script("gpt.py", "--nope=1", cwd=tmp_path, env=SERIAL_ENV)
    assert_clean_exit(result, 1)
    assert result.stdout == ""
    assert result.stderr.startswith("error: unrecognized arguments: --nope=1. Valid names: ")
    assert result.stderr.count("\n") == 1
    assert set(FIXED_NAMES) <= set(result.stderr.split("Valid names: ")[1].split())
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


def test_bigram_takes_the_same_overrides(capsys):
    assert bigram.main(["--max_iters", "ten"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: argument --max_iters: invalid int value: 'ten'. Valid names: ")


# ---- train, sample, resume: python gpt.py as a user runs it --------------------------------------------


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("e2e") / "out"
    result = run_script("gpt.py", *TINY, f"--data={corpus}", "--out_dir", out_dir, env=SERIAL_ENV)
    assert_clean_exit(result)
    return result, out_dir


def test_training_writes_checkpoint_and_metrics(trained, corpus):
    result, out_dir = trained
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]
    rows = metrics(out_dir)
    assert [r["step"] for r in rows] == [0, 10, 20]
    for r in rows:
        assert {"step", "train_loss", "val_loss", "lr", "elapsed_s"} <= r.keys()
        assert 0 < r["train_loss"] < 5 and 0 < r["val_loss"] < 5 and r["elapsed_s"] >= 0
    ckpt = gpt.load_checkpoint(out_dir / "ckpt.pt")
    assert {"model", "optimizer", "config", "vocab", "step", "best_val", "rng"} <= ckpt.keys()
    assert ckpt["vocab"] == "".join(sorted(set(corpus.read_text())))
    cfg = gpt.Config(**ckpt["config"])
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.max_iters, cfg.dropout) == (2, 32, 16, 20, 0.0)  # overrides
    for r in rows:  # all 20 steps are in the warm-up of 100 steps: learning_rate * (step + 1) / warmup_iters
        assert r["lr"] == pytest.approx(1e-3 * (r["step"] + 1) / 100, rel=1e-5)
    best = min(rows, key=lambda r: r["val_loss"])
    assert (ckpt["step"], round(ckpt["best_val"], 4)) == (best["step"], best["val_loss"])
    assert ckpt["model"]["token_embedding_table.weight"].shape == (65, 32)


def test_progress_lines_agree_with_metrics(trained):
    result, out_dir = trained
    lines = progress(result.stdout)
    assert [(s, m, t, v) for s, m, t, v, _ in lines] == [
        (r["step"], 20, r["train_loss"], r["val_loss"]) for r in metrics(out_dir)
    ]
    final = re.search(
        r"^final: train (\S+) \| val (\S+) \| best val (\S+) \| wall .* checkpoint (.*)$", result.stdout, re.M
    )
    assert final and (float(final[1]), float(final[2])) == lines[-1][2:4]
    assert final[4] == str(out_dir / "ckpt.pt")


def test_training_ends_with_a_sample(trained, corpus):
    result, out_dir = trained
    ckpt = gpt.load_checkpoint(out_dir / "ckpt.pt")
    header = f"\nsample from the best model (step {ckpt['step']}, val {ckpt['best_val']:.4f}):\n"
    assert header in result.stdout
    after = result.stdout.split(header, 1)[1]
    text, rest = after[:21], after[21:]  # the prompt (a newline), then --max_new_tokens=20 characters
    assert text[0] == "\n" and set(text) <= set(ckpt["vocab"])
    assert rest.startswith("\n\nfinal: ")


def test_a_short_run_prints_no_note(trained):
    result, _ = trained
    assert "note:" not in result.stdout


def test_a_long_run_says_so_before_it_starts(corpus, tmp_path):
    """A billion steps of even the tiny model take days: a timed training step shows it, before step 0."""
    argv = [*TINY, "--max_iters=1000000000", f"--data={corpus}", f"--out_dir={tmp_path / 'out'}"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "gpt.py"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **SERIAL_ENV, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = [proc.stdout.readline() for _ in range(4)]
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert lines[0].startswith("training ") and " parameters | " in lines[1] and lines[2].startswith("batch ")
    note = lines[3]
    assert note.startswith("note: this run will take about ") and note.rstrip().endswith(
        gpt.command_line(gpt.CPU_RECIPE)
    )
    days = re.search(r"about (\d+)d", note)
    assert days and int(days[1]) >= 1


def test_sample_starts_with_the_prompt(trained, capsys):
    _, out_dir = trained
    args = ["--sample", "--prompt=ROMEO:", f"--out_dir={out_dir}", "--num_samples=2", "--max_new_tokens=25"]
    result = run_script("gpt.py", *args, env=SERIAL_ENV)
    assert_clean_exit(result)
    out = result.stdout
    n = len("ROMEO:") + 25
    assert out[:6] == "ROMEO:" and out[n : n + 5] == "\n---\n"
    assert out[n + 5 : n + 11] == "ROMEO:" and out[2 * n + 5 :] == "\n"
    vocab = gpt.load_checkpoint(out_dir / "ckpt.pt")["vocab"]
    assert set(out[:n] + out[n + 5 : 2 * n + 5]) <= set(vocab)
    assert out[:n] != out[n + 5 : 2 * n + 5]  # two samples, not one printed twice
    # the same seed gives the same text, in this process as in that one; another seed another text
    assert gpt.main(args) == 0
    assert capsys.readouterr().out == out
    assert gpt.main([*args, "--seed=1"]) == 0
    assert capsys.readouterr().out != out


def test_resume_continues_from_the_saved_step(trained, corpus, tmp_path):
    """The run of 20 steps resumed with --max_iters=30 ends as a run of 30 steps from the start does: the same
    weights and optimizer state, the same rows. (All 30 steps are in the warm-up of 100: the same learning rates.)"""
    _, trained_dir = trained
    out_dir = tmp_path / "out"
    shutil.copytree(trained_dir, out_dir)
    saved = gpt.load_checkpoint(out_dir / "ckpt.pt")["step"]
    before = metrics(out_dir)
    result = run_script(
        "gpt.py", *TINY, f"--data={corpus}", f"--out_dir={out_dir}", "--resume", "--max_iters=30", env=SERIAL_ENV
    )
    assert_clean_exit(result)
    steps = [line[0] for line in progress(result.stdout)]
    assert steps == [s for s in range(saved + 1, 31) if s % 10 == 0 or s == 30]  # nothing before it is redone
    rows = metrics(out_dir)
    assert rows[: len(rows) - len(steps)] == [r for r in before if r["step"] <= saved]  # kept as they were
    assert [r["step"] for r in rows] == [r["step"] for r in before if r["step"] <= saved] + steps
    assert "final: " in result.stdout
    resumed = gpt.load_checkpoint(out_dir / "ckpt.pt")
    assert resumed["config"]["max_iters"] == 30  # the new max_iters, kept for the next resume
    assert all(r["lr"] == pytest.approx(1e-3 * (r["step"] + 1) / 100, rel=1e-5) for r in rows)
    unbroken = tmp_path / "unbroken"
    assert gpt.main([*TINY, f"--data={corpus}", f"--out_dir={unbroken}", "--max_iters=30"]) == 0
    assert without_timing(rows) == without_timing(metrics(unbroken))
    assert_same_state(resumed, gpt.load_checkpoint(unbroken / "ckpt.pt"))


def test_resuming_a_finished_run_trains_no_further(trained, corpus, tmp_path, capsys):
    _, trained_dir = trained
    out_dir = tmp_path / "out"
    shutil.copytree(trained_dir, out_dir)
    before = metrics(out_dir)
    saved = gpt.load_checkpoint(out_dir / "ckpt.pt")
    assert saved["step"] == 20, "the tiny run's best val should be its last step"
    assert gpt.main([*TINY, f"--data={corpus}", f"--out_dir={out_dir}", "--resume"]) == 0
    out = capsys.readouterr().out
    assert progress(out) == []
    assert metrics(out_dir) == before
    assert_same_state(gpt.load_checkpoint(out_dir / "ckpt.pt"), saved)  # not a step further
    assert "sample from the best model (step 20," in out and "\nfinal: train " in out


# ---- bigram.py ---------------------------------------------------------------------------------------------


def test_count_based_loss_by_hand():
    # train 0 1 0 1: pairs (0,1) twice, (1,0) once; add-one counts [[1, 3], [2, 1]]
    # so p(1|0) = 3/4 and p(1|1) = 1/3; val 0 1 1 asks for exactly those two
    loss = bigram.count_based_loss(np.array([0, 1, 0, 1]), np.array([0, 1, 1]), vocab_size=2)
    assert loss == pytest.approx(-(math.log(3 / 4) + math.log(1 / 3)) / 2, abs=1e-12)
    # a pair never seen in training still costs a finite amount, thanks to the smoothing
    assert bigram.count_based_loss(np.array([0, 0, 0]), np.array([1, 1]), vocab_size=3) == pytest.approx(math.log(3))


def test_whole_split_loss_of_the_counted_table_is_the_count_based_loss():
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 5, 300), rng.integers(0, 5, 50)
    model = bigram.BigramLanguageModel(5, bigram.DEFAULTS)
    assert bigram.whole_split_loss(model, torch.tensor(val)) == pytest.approx(math.log(5), abs=1e-6)  # zeros: uniform
    counts = np.ones((5, 5))
    np.add.at(counts, (train[:-1], train[1:]), 1)
    with torch.no_grad():
        model.token_embedding_table.weight.copy_(torch.tensor(np.log(counts / counts.sum(1, keepdims=True))))
    expected = bigram.count_based_loss(train, val, 5)
    assert bigram.whole_split_loss(model, torch.tensor(val)) == pytest.approx(expected, abs=1e-5)


def test_bigram_lands_on_the_count_based_reference(corpus, tmp_path):
    result = run_script("bigram.py", f"--data={corpus}", f"--out_dir={tmp_path / 'out'}", env=SERIAL_ENV)
    assert_clean_exit(result)
    assert progress(result.stdout)[-1][:2] == (3000, 3000)  # the lecture's 3000 iterations
    m = re.search(
        r"whole val split: (\S+) \| counted from the train split \(add-one\): (\S+) \| gap (\S+)$", result.stdout
    )
    ours, reference, gap = (float(g) for g in m.groups())
    # the reference, counted here independently: p(b|a) = (count(a,b) + 1) / (count(a) + vocab)
    text = corpus.read_text()
    vocab, n = len(set(text)), int(0.9 * len(text))
    train, val = text[:n], text[n:]
    pairs, firsts = Counter(zip(train, train[1:], strict=False)), Counter(train[:-1])
    counted = -sum(math.log((pairs[a, b] + 1) / (firsts[a] + vocab)) for a, b in zip(val, val[1:], strict=False))
    assert reference == pytest.approx(counted / (len(val) - 1), abs=1e-4)
    assert reference == pytest.approx(2.4819, abs=1e-4)  # the count-based bigram of tiny Shakespeare
    assert abs(ours - reference) <= 0.01
    assert gap == pytest.approx(ours - reference, abs=1e-4)
