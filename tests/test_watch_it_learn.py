"""Watch it learn: at every evaluation a line of the model's own writing follows the progress line, from
the same prompt and seed each time, from a generator of its own, kept in metrics.jsonl, and cut short by Ctrl-C."""

import json
import os
import signal

import pytest
import torch
from conftest import TINY, built

import gpt

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = [*TINY, "--max_iters=30", "--dropout=0.1", "--eval_sample=80"]  # evaluations at 0, 10, 20 and 30


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def lines_after_progress(stdout):
    """{step: the line printed right after that step's progress line}."""
    lines = stdout.splitlines()
    return {
        int(line.split()[1].split("/")[0]): lines[i + 1] for i, line in enumerate(lines) if line.startswith("step ")
    }


def test_every_evaluation_shows_a_line_of_text_and_keeps_it(corpus, tmp_path, capsys):
    assert gpt.main([*RUN, f"--data={corpus}", f"--out_dir={tmp_path}"]) == 0
    shown = lines_after_progress(capsys.readouterr().out)
    log = rows(tmp_path)
    assert list(shown) == [r["step"] for r in log] == [0, 10, 20, 30]
    vocab = set(gpt.load_checkpoint(tmp_path / "ckpt.pt")["vocab"])
    for row in log:
        line = shown[row["step"]]
        assert line.startswith('  "') and json.loads(line.strip()) == row["sample"]  # one line: "\n" shown as \n
        assert row["sample"].startswith("\n") and len(row["sample"]) == 1 + 80 and set(row["sample"]) <= vocab
    assert len({row["sample"] for row in log}) == 4  # the model changes, and with it what it writes


def test_the_line_comes_from_its_own_generator_seeded_alike_every_time(corpus):
    with built([*RUN, f"--data={corpus}"]) as run:
        torch.manual_seed(1)
        first, state = gpt.sample_line(run), torch.get_rng_state()
        assert torch.equal(torch.get_rng_state(), state)  # torch's own generator, which dropout uses, is not touched
        torch.manual_seed(2)
        assert gpt.sample_line(run) == first  # whatever the state of torch's generator: the same text, same model


def test_the_losses_are_bit_identical_with_and_without_the_lines(corpus, tmp_path):
    common = [*RUN, f"--data={corpus}", "--gradient_accumulation_steps=2"]
    assert gpt.main([*common, f"--out_dir={tmp_path / 'on'}"]) == 0
    assert gpt.main([*common, f"--out_dir={tmp_path / 'off'}", "--eval_sample=0"]) == 0
    on, off = rows(tmp_path / "on"), rows(tmp_path / "off")
    assert [r["sample"] for r in off] == [None] * 4 and all(r["sample"] for r in on)
    timing = ("elapsed_s", "ms_per_iter", "sample")
    assert [{k: v for k, v in r.items() if k not in timing} for r in on] == [
        {k: v for k, v in r.items() if k not in timing} for r in off
    ]
    a, b = (gpt.load_checkpoint(tmp_path / name / "ckpt.pt")["model"] for name in ("on", "off"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_off_shows_no_line(corpus, tmp_path, capsys):
    assert gpt.main([*RUN, f"--data={corpus}", f"--out_dir={tmp_path}", "--eval_sample=0"]) == 0
    after = lines_after_progress(capsys.readouterr().out)
    assert len(after) == 4 and not any(line.startswith('  "') for line in after.values())


def test_a_resumed_run_writes_the_lines_of_the_unbroken_one(corpus, tmp_path, monkeypatch):
    common = [*RUN, f"--data={corpus}"]
    assert gpt.main([*common, f"--out_dir={tmp_path / 'whole'}"]) == 0
    calls, train_step = [], gpt.train_step

    def interrupted_step(*args):  # Ctrl-C during the 15th step
        calls.append(1)
        if len(calls) == 15:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(*args)

    monkeypatch.setattr(gpt, "train_step", interrupted_step)
    assert gpt.main([*common, f"--out_dir={tmp_path / 'cut'}"]) == 130
    monkeypatch.undo()
    assert gpt.main([*common, f"--out_dir={tmp_path / 'cut'}", "--resume"]) == 0
    assert [r["sample"] for r in rows(tmp_path / "cut")] == [r["sample"] for r in rows(tmp_path / "whole")]
    # and all the rest: the losses, the weights and AdamW's state (dropout 0.1: torch's random state too)
    timing = ("elapsed_s", "ms_per_iter")
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows(tmp_path / "cut")] == [
        {k: v for k, v in r.items() if k not in timing} for r in rows(tmp_path / "whole")
    ]
    cut, whole = (gpt.load_checkpoint(tmp_path / name / "ckpt.pt") for name in ("cut", "whole"))
    assert cut["step"] == whole["step"] and cut["model"].keys() == whole["model"].keys()
    assert all(torch.equal(cut["model"][k], whole["model"][k]) for k in whole["model"])
    states = [(cut["optimizer"]["state"][i], whole["optimizer"]["state"][i]) for i in whole["optimizer"]["state"]]
    assert len(states) == len(whole["model"]) and all(mine.keys() == theirs.keys() for mine, theirs in states)
    assert all(torch.equal(mine[k], theirs[k]) for mine, theirs in states for k in theirs)


def test_ctrl_c_during_the_line_is_answered_within_a_character(corpus, tmp_path, monkeypatch, capsys):
    """The line is written a character at a time, before the evaluation's batches; a Ctrl-C while it is written ends
    it at once and abandons that evaluation, as a Ctrl-C during the batches does: last.pt is saved at this step, and
    --resume evaluates it again, line included, so that the run goes on as if never stopped."""
    drawn, sample_next = [], gpt.sample_next

    def ctrl_c_at_the_fifth_character(*args, **kwargs):
        drawn.append(1)
        if len(drawn) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return sample_next(*args, **kwargs)

    monkeypatch.setattr(gpt, "sample_next", ctrl_c_at_the_fifth_character)
    argv = [*RUN, f"--data={corpus}", f"--out_dir={tmp_path}", "--eval_sample=100000"]
    assert gpt.main(argv) == 130
    assert len(drawn) == 5  # not one character more
    assert rows(tmp_path) == [] and "step 0/" not in capsys.readouterr().out  # the evaluation was given up
    last = gpt.load_checkpoint(tmp_path / "last.pt")
    assert (last["step"], last["evaluated_step"]) == (0, -1)


def test_a_negative_length_is_refused(corpus, tmp_path, capsys):
    assert gpt.main([*RUN, f"--data={corpus}", f"--out_dir={tmp_path / 'out'}", "--eval_sample=-1"]) == 1
    assert capsys.readouterr().err == "error: --eval_sample must be at least 0, got -1\n"
    assert not (tmp_path / "out").exists()
