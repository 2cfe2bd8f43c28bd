"""The laptop path, end to end: after `python gpt.py --recipe=cpu`, which trains into out-cpu/, the commands a
learner types next (--sample, --resume, look.py) either work, or name the recipe's folder and the flag that reaches
it, in one line. Run from a fresh folder, as a user at the repository's root would (out/ and out-cpu/ are relative)."""

import pytest
from conftest import TINY, on_one_thread
from test_look import look

import bigram
import gpt

TO_THE_RECIPE = "the CPU recipe's is in out-cpu/; add --recipe=cpu to use it"
TO_THE_DEFAULTS = "the default run's is in out/; leave out --recipe=cpu to use it"


@pytest.fixture
def laptop(tmp_path, monkeypatch, corpus):
    """A folder where `python gpt.py --recipe=cpu` (at a tiny size) has run, and nothing else."""
    monkeypatch.chdir(tmp_path)
    with on_one_thread():
        assert gpt.main(["--recipe=cpu", *TINY, f"--data={corpus}"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-cpu"]
    return tmp_path


def error_of(capsys, main, argv):
    """What main(argv) says on stderr, having failed with one line and nothing on stdout."""
    capsys.readouterr()
    assert main(argv) == 1, argv
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (argv, out, err)
    return err[len("error: ") : -1]


def test_the_next_commands_name_the_recipes_folder_and_then_work(laptop, capsys, corpus):
    assert error_of(capsys, gpt.main, ["--sample"]) == f"no checkpoint at out/ckpt.pt: {TO_THE_RECIPE}"
    assert error_of(capsys, look.main, []) == f"no checkpoint at out/ckpt.pt: {TO_THE_RECIPE}"
    resume = f"--resume, but there is no checkpoint in out/; {TO_THE_RECIPE}"
    assert error_of(capsys, gpt.main, ["--resume", f"--data={corpus}"]) == resume
    assert not (laptop / "out").exists()  # nothing half-written where the message pointed away from

    # what the messages say to type works
    assert gpt.main(["--recipe=cpu", "--sample", "--prompt=ROMEO:", "--max_new_tokens=20"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert look.main(["--recipe=cpu", "--max_new_tokens=5", "--html=page.html"]) == 0
    assert (laptop / "page.html").is_file()
    with on_one_thread():
        assert gpt.main(["--recipe=cpu", "--resume", "--max_iters=25", f"--data={corpus}"]) == 0
    assert gpt.load_checkpoint(laptop / "out-cpu" / "ckpt.pt")["step"] == 25  # it went on where the recipe stopped


def test_each_starting_point_names_the_others_folder(tmp_path, monkeypatch, capsys):
    """Where out_dir was left to gpt.py's starting point, a missing checkpoint names the other one's folder if it
    holds one (--resume also takes last.pt); where it holds none, --out_dir was given, or the script is bigram.py
    (with defaults of its own), the usual advice."""
    monkeypatch.chdir(tmp_path)
    train = "train first (python gpt.py), or point --out_dir at its folder"
    train_recipe = "train first (python gpt.py --recipe=cpu), or point --out_dir at its folder"
    assert error_of(capsys, gpt.main, ["--sample"]) == f"no checkpoint at out/ckpt.pt: {train}"
    no_recipe = f"no checkpoint at out-cpu/ckpt.pt: {train_recipe}"
    assert error_of(capsys, gpt.main, ["--recipe=cpu", "--sample"]) == no_recipe

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "last.pt").touch()  # what Ctrl-C leaves: enough for --resume, not for --sample
    resume = f"--resume, but there is no checkpoint in out-cpu/; {TO_THE_DEFAULTS}"
    assert error_of(capsys, gpt.main, ["--recipe=cpu", "--resume"]) == resume
    assert error_of(capsys, gpt.main, ["--recipe=cpu", "--sample"]) == no_recipe
    (tmp_path / "out" / "ckpt.pt").touch()
    assert error_of(capsys, look.main, ["--recipe=cpu"]) == f"no checkpoint at out-cpu/ckpt.pt: {TO_THE_DEFAULTS}"
    named = ["--recipe=cpu", "--sample", "--out_dir=mine"]  # a folder the user named: no guessing which run was meant
    assert error_of(capsys, gpt.main, named) == f"no checkpoint at mine/ckpt.pt: {train_recipe}"

    (tmp_path / "out-cpu").mkdir()
    (tmp_path / "out-cpu" / "ckpt.pt").touch()
    not_bigrams = "no checkpoint at out-bigram/ckpt.pt: train first, or point --out_dir at its folder"
    assert error_of(capsys, bigram.main, ["--sample"]) == not_bigrams  # the GPT's folders are not bigram.py's
