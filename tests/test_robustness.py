"""Robustness: bad input is refused in one line and changes nothing; training survives a signal and
resumes exactly; checkpoints are written atomically and loaded without running foreign code."""

import errno
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import ROOT, SERIAL_ENV, TINY, run_script, snapshot, trained_once

import gpt

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = [*TINY, "--max_iters=4", "--eval_interval=2"]  # TINY, shorter still


@pytest.fixture(scope="module")
def trained_dir(corpus, tmp_path_factory):
    """out_dir of a finished tiny run: ckpt.pt and metrics.jsonl. Tests work on copies of it."""
    return trained_once(tmp_path_factory, "robust", [*TRAIN, f"--data={corpus}"])


@pytest.fixture
def out(trained_dir, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(trained_dir, copy)
    return copy


def refused(capsys, argv, *watch):
    """Run main(argv): exit status 1, one line `error: ...` on stderr, and every folder in `watch` exactly as
    it was (no file written, overwritten, touched or removed; a folder that did not exist still does not)."""
    before = [snapshot(folder) for folder in watch]
    status = gpt.main(argv)
    out, err = capsys.readouterr()
    assert status == 1, out + err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err
    assert [snapshot(folder) for folder in watch] == before
    return err.removeprefix("error: ").strip()


# ---- bad data ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "--data={path}: no such file"),
        (b"", "{path} is empty; train on a file with some text in it"),
        (b"A", "{path} has 1 characters: too few for block_size 16"),
        (b"abcdefghijklmnopq", "{path} has 17 characters: too few for block_size 16"),  # block_size + 1
        ("a folder", "--data={path} is a folder; name a text file"),
        (b"caf\xe9 au lait" * 20, "{path} is not UTF-8 text (byte 0xe9 at offset 3); convert it to UTF-8 first"),
    ],
    ids=["missing", "empty", "one-character", "block_size+1", "folder", "latin-1"],
)
def test_bad_data_file(content, expected, out, tmp_path, capsys):
    path = tmp_path / "data.txt"
    if content == "a folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    message = refused(capsys, [*TRAIN, f"--data={path}", f"--out_dir={out}"], out, tmp_path)
    assert message.startswith(expected.format(path=path))


def test_text_length_boundary(tmp_path, capsys):
    """The last 10% (validation) needs block_size + 1 characters: a text of 10 * (block_size + 1) characters
    trains, one of 10 * block_size is refused with that reason."""
    block_size = 16
    for length, status in ((10 * block_size, 1), (10 * (block_size + 1), 0)):
        path = tmp_path / f"{length}.txt"
        path.write_text(("To be, or not to be: that is the question.\n" * 5)[:length])
        argv = [*TRAIN, "--max_iters=2", "--eval_iters=1", f"--data={path}", f"--out_dir={tmp_path / str(length)}"]
        assert gpt.main(argv) == status
        err = capsys.readouterr().err
        if status:
            assert f"needs at least {block_size + 1}" in err


def test_a_text_without_newlines(tmp_path, capsys):
    """The default prompt is a newline; a text without one still trains, and its final sample starts with
    the text's first character. Sampling it later asks for a prompt from its own characters."""
    path, out_dir = tmp_path / "one-line.txt", tmp_path / "out"
    path.write_text("the rain in spain stays mainly in the plain " * 5)
    assert gpt.main([*TRAIN, "--max_iters=2", "--eval_iters=1", f"--data={path}", f"--out_dir={out_dir}"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"sample from the best model \(step \d+, val [\d.]+\):\nt", out)
    message = refused(capsys, ["--sample", f"--out_dir={out_dir}"], out_dir)
    assert message.startswith("the prompt has characters not in the vocabulary: '\\n'")
    assert gpt.main(["--sample", f"--out_dir={out_dir}", "--prompt=rain", "--max_new_tokens=5"]) == 0
    assert capsys.readouterr().out.startswith("rain")


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens there once the socket is closed


def test_missing_corpus_and_no_network(out, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "repo"
    folder.mkdir()
    monkeypatch.setattr(gpt, "DEFAULT_DATA", folder / "input.txt")
    url = f"http://127.0.0.1:{closed_port()}/input.txt"
    download = gpt.download
    monkeypatch.setattr(gpt, "download", lambda path: download(path, url=url, timeout=5))
    message = refused(capsys, [*TRAIN, f"--out_dir={out}"], out, folder)
    assert message.startswith(f"could not download tiny Shakespeare from {url} (ConnectionError); check your conn")
    assert message.endswith(f"download {url} by hand and save it as {folder / 'input.txt'}")
    assert list(folder.iterdir()) == []  # no input.txt, no temporary file


# ---- bad hyperparameters ------------------------------------------------------------------------------------

AT_LEAST_1 = [
    "block_size",
    "batch_size",
    "max_iters",
    "eval_interval",
    "eval_iters",
    "n_layer",
    "n_head",
    "max_new_tokens",
    "num_samples",
]
BAD_SETTINGS = [
    *[([f"--{name}=0"], f"--{name} must be at least 1, got 0") for name in AT_LEAST_1],
    (["--batch_size=-3"], "--batch_size must be at least 1, got -3"),
    (["--n_embd=30", "--n_head=4"], "--n_embd (30) must be divisible by --n_head (4)"),
    (["--learning_rate=0"], "--learning_rate must be above 0, got 0.0"),
    (["--learning_rate=-0.001"], "--learning_rate must be above 0, got -0.001"),
    (["--learning_rate=nan"], "--learning_rate must be above 0, got nan"),
    (["--dropout=1"], "--dropout must be in [0, 1), got 1.0"),
    (["--dropout=-0.1"], "--dropout must be in [0, 1), got -0.1"),
    (["--temperature=-0.5"], "--temperature must be at least 0 (0 means greedy), got -0.5"),
    (["--top_k=0"], "--top_k must be at least 1 (or none for no limit), got 0"),
    (["--prompt="], "--prompt must have at least one character"),
    (["--device=tpu"], "--device=tpu is not a device name; use auto, cpu, cuda, cuda:N or mps"),
    ([f"--out_dir={ROOT / 'README.md'}"], f"--out_dir={ROOT / 'README.md'} is a file; name a folder"),
]
BAD_SETTINGS.append((["--device=mps"], "--device=mps, but Apple's MPS is not available here"))  # made so on a Mac too


@pytest.mark.parametrize("mode", ["train", "sample"])
@pytest.mark.parametrize(
    ("setting", "expected"), BAD_SETTINGS, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bad_setting(setting, expected, mode, out, corpus, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # a device this machine lacks, anywhere
    argv = [*TRAIN, f"--data={corpus}", f"--out_dir={out}", *setting, *(["--sample"] if mode == "sample" else [])]
    assert refused(capsys, argv, out).startswith(expected)


def missing_gpu():
    """A CUDA device this machine lacks: any, on a machine without CUDA."""
    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_a_gpu_this_machine_lacks(mode, out, corpus, capsys):
    argv = [*TRAIN, f"--data={corpus}", f"--out_dir={out}", f"--device={missing_gpu()}"]
    message = refused(capsys, [*argv, *(["--sample"] if mode == "sample" else [])], out)
    assert message.startswith(f"--device={missing_gpu()}, but this machine has")
    assert "CUDA GPU" in message


# ---- sampling -------------------------------------------------------------------------------------------------


def sample_text(capsys, out, *args):
    assert gpt.main(["--sample", f"--out_dir={out}", "--max_new_tokens=30", *args]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_prompt_with_unknown_characters_is_named(out, corpus, tmp_path, capsys):
    expected = "the prompt has characters not in the vocabulary: 'é' 'Ω'; use only characters of the training text"
    assert refused(capsys, ["--sample", f"--out_dir={out}", "--prompt=Ωmé and Ω"], out) == expected
    # training refuses it before it starts, not after hours when it would write the final sample
    fresh = tmp_path / "fresh"
    assert refused(capsys, [*TRAIN, f"--data={corpus}", f"--out_dir={fresh}", "--prompt=é"], fresh) == expected.replace(
        " 'Ω'", ""
    )


def test_prompt_longer_than_block_size_is_cropped(out, capsys):
    prompt = "ROMEO:\nWhat light through yonder window breaks?\n"  # 48 characters, block_size 16
    text = sample_text(capsys, out, f"--prompt={prompt}")
    assert text.startswith(prompt) and len(text) == len(prompt) + 30 + 1  # + the closing newline


def test_top_k_above_the_vocabulary_means_no_limit(out, capsys):
    unlimited = sample_text(capsys, out, "--top_k=none")
    assert sample_text(capsys, out, "--top_k=1000") == unlimited  # clamped to the 65 characters
    assert sample_text(capsys, out, "--top_k=65") == unlimited
    assert sample_text(capsys, out, "--top_k=1") != unlimited


def test_temperature_0_is_greedy_whatever_the_seed(out, capsys):
    greedy = sample_text(capsys, out, "--temperature=0")
    assert sample_text(capsys, out, "--temperature=0", "--seed=99") == greedy
    assert sample_text(capsys, out, "--top_k=1", "--seed=5") == greedy  # the likeliest character, every time
    assert sample_text(capsys, out, "--seed=99") != sample_text(capsys, out)  # sampling does depend on it


# ---- bad checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["--sample", "--resume"])
def test_missing_checkpoint(mode, tmp_path, corpus, capsys):
    out_dir = tmp_path / "never-trained"
    message = refused(capsys, [*TRAIN, f"--data={corpus}", f"--out_dir={out_dir}", mode], out_dir)
    if mode == "--sample":
        assert message.startswith(f"no checkpoint at {out_dir / 'ckpt.pt'}: train first")
    else:
        assert message == f"--resume, but there is no checkpoint in {out_dir}/; train without --resume first"
    assert not out_dir.exists()


def damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif how == "foreign dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif how == "a tensor":
        torch.save(torch.zeros(3), path)


@pytest.mark.parametrize("mode", ["--sample", "--resume"])
@pytest.mark.parametrize("how", ["truncated", "text", "foreign dict", "a tensor"])
def test_damaged_checkpoint(how, mode, out, corpus, capsys):
    damage(out / "ckpt.pt", how)
    message = refused(capsys, [*TRAIN, f"--data={corpus}", f"--out_dir={out}", mode], out)
    if how in ("truncated", "text"):
        assert message.startswith(f"{out / 'ckpt.pt'} is not a checkpoint that can be read (")
        assert message.endswith("it is truncated, damaged or foreign; delete it or train again")
    else:
        assert message == f"{out / 'ckpt.pt'} is not a checkpoint of this program (no config, model, step, vocab)"


@pytest.mark.parametrize("mode", ["--sample", "--resume"])
def test_checkpoint_of_another_shape(mode, out, corpus, capsys):
    message = refused(capsys, [*TRAIN, f"--data={corpus}", f"--out_dir={out}", mode, "--n_layer=3"], out)
    # --sample reads ckpt.pt; --resume the newer of last.pt and ckpt.pt, so it names the folder
    named = out / "ckpt.pt" if mode == "--sample" else f"the checkpoint in {out}/"
    assert message.startswith(f"{named} was saved by a model of another shape (")
    assert "blocks.2." in message  # which weights do not fit
    assert message.endswith("use the settings it was trained with, or another --out_dir")


def test_a_text_with_characters_the_checkpoint_never_saw(out, tmp_path, capsys):
    """The model knows the characters of the text it was trained on, and no others: a text with more is refused,
    naming them. (Fewer is fine: a fine-tuning run's text is a part of the large text's vocabulary.)"""
    other = tmp_path / "other.txt"
    other.write_text("the quick brown fox jumps over the lazy dog, 1 2 3 4 5\n" * 10)
    message = refused(capsys, [*TRAIN, f"--data={other}", f"--out_dir={out}", "--resume"], out, tmp_path)
    advice = "use a text without them, or train a new model (no --resume, no --init_from)"
    assert message == f"{other} has 4 character(s) the model never saw: '1' '2' '4' '5'; {advice}"


# ---- checkpoints that cannot be abused or lost -----------------------------------------------------------------


class CreatesAFile:
    """Unpickling this calls open(path, "w"): a stand-in for any code a crafted file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("fmt", ["torch.save", "plain pickle"])
def test_crafted_pickle_runs_nothing(fmt, out, corpus, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = {"model": CreatesAFile(marker), "config": {}, "vocab": "ab", "step": 0}
    path = out / "ckpt.pt"
    if fmt == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # the protocol torch.save uses
    for mode in ("--sample", "--resume"):
        message = refused(capsys, [*TRAIN, f"--data={corpus}", f"--out_dir={out}", mode], out)
        assert message.startswith(f"{path} is not a checkpoint that can be read (UnpicklingError)")
        assert not marker.exists()
    # the payload is live: unpickled without the restriction, it does create the file
    if fmt == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    gpt.save_checkpoint(path, {"step": 1, "w": torch.arange(5.0)})
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(gpt.UserError) as info:
        gpt.save_checkpoint(path, {"step": 2, "w": torch.zeros(5)})
    assert str(info.value) == f"could not write {path} (No space left on device); the previous checkpoint is untouched"
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def test_disk_full_while_training(tmp_path, corpus, monkeypatch, capsys):
    """The first checkpoint is written; the next one fails halfway: error, and the first one is intact."""
    out_dir = tmp_path / "out"
    save = torch.save

    def save_once(obj, f, *args, **kwargs):
        if not (out_dir / "ckpt.pt").exists():
            return save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_once)
    argv = [*TRAIN, f"--data={corpus}", f"--out_dir={out_dir}", "--learning_rate=1e-2", "--warmup_iters=0"]
    argv += ["--max_iters=3", "--eval_interval=1"]  # the val loss falls at once, so a second save comes
    assert gpt.main(argv) == 1
    expected = f"could not write {out_dir / 'ckpt.pt'} (No space left on device); the previous checkpoint is untouched"
    assert capsys.readouterr().err == f"error: {expected}\n"
    monkeypatch.undo()
    assert gpt.load_checkpoint(out_dir / "ckpt.pt")["step"] == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt.pt", "metrics.jsonl"]


def test_an_out_dir_that_cannot_be_made(tmp_path, corpus, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    out_dir = tmp_path / "a_file" / "out"
    message = refused(capsys, [*TRAIN, f"--data={corpus}", f"--out_dir={out_dir}"], tmp_path)
    assert message == f"cannot write to --out_dir={out_dir} (Not a directory); name a folder you can write to"


def test_an_out_dir_that_exists_but_cannot_be_written_to(tmp_path, corpus, monkeypatch, capsys):
    """A read-only folder: its lock cannot be made, which the run finds before it builds anything."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def read_only(path, mode="r", *args, **kwargs):
        if mode != "r":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(gpt, "open", read_only, raising=False)  # as chmod 555 would, even for root
    message = refused(capsys, [*TRAIN, f"--data={corpus}", f"--out_dir={out_dir}"], tmp_path)
    assert message == f"cannot write to --out_dir={out_dir} (Permission denied); name a folder you can write to"


def test_disk_full_while_writing_metrics(tmp_path, corpus, monkeypatch, capsys):
    """The first evaluation's line is written; the second one fails: one error line, the checkpoint kept."""
    out_dir = tmp_path / "out"
    appends = []

    def full_after_one_line(path, mode="r", *args, **kwargs):
        if mode == "a":
            appends.append(path)
            if len(appends) > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(gpt, "open", full_after_one_line, raising=False)  # gpt's `open` is found before the builtin
    assert gpt.main([*TRAIN, f"--data={corpus}", f"--out_dir={out_dir}"]) == 1
    out, err = capsys.readouterr()
    expected = (
        f"could not write {out_dir / 'metrics.jsonl'} (No space left on device); the checkpoints beside it are kept"
    )
    assert err == f"error: {expected}\n"
    assert [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()] == [0]
    assert gpt.load_checkpoint(out_dir / "ckpt.pt")["step"] == 0


def test_non_finite_loss_stops_training(tmp_path, corpus, capsys):
    out_dir = tmp_path / "out"
    argv = [*TINY, f"--data={corpus}", f"--out_dir={out_dir}", "--learning_rate=1e6", "--warmup_iters=0"]
    assert gpt.main(argv) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"error: the loss was not finite at step \d+: training stopped\. Likely causes: a learning rate too high "
        rf"\(lower --learning_rate, keep --grad_clip on\) or too little precision \(try --dtype=float32\); the last "
        rf"good checkpoint in {re.escape(str(out_dir))}/ is kept\n",
        err,
    )
    ckpt = gpt.load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["step"] == 0 and all(t.isfinite().all() for t in ckpt["model"].values())
    assert not (out_dir / "last.pt").exists()


class NaNAtStep7(gpt.GPT):
    """A GPT whose training loss turns into NaN at the 8th training step (step 7), as a blow-up would."""

    def forward(self, idx, targets=None, cache=None):
        logits, loss = super().forward(idx, targets, cache)
        if self.training and targets is not None:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 8:
                loss = loss * float("nan")
        return logits, loss


def test_non_finite_loss_names_the_first_bad_step(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setattr(gpt, "seconds_per_batch", lambda *args, **kwargs: 0.0)  # no timed calls: steps alone count
    monkeypatch.setattr(gpt, "seconds_per_step", lambda *args: 0.0)
    out_dir = tmp_path / "out"
    argv = [*TINY, f"--data={corpus}", f"--out_dir={out_dir}", "--eval_interval=5", "--max_iters=30"]
    assert gpt.main(argv, make_model=NaNAtStep7) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the loss was not finite at step 7: training stopped.")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 5]  # stopped before evaluating the broken model at step 10
    ckpt = gpt.load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["step"] in (0, 5) and all(t.isfinite().all() for t in ckpt["model"].values())


class NaNAtStep7ThenCtrlC(NaNAtStep7):
    """NaNAtStep7, and a Ctrl-C during step 8, before any evaluation has seen the NaN."""

    def forward(self, idx, targets=None, cache=None):
        out = super().forward(idx, targets, cache)
        if self.training and targets is not None and self.calls == 9:
            os.kill(os.getpid(), signal.SIGINT)
        return out


def test_a_signal_after_a_non_finite_loss_saves_no_broken_model(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setattr(gpt, "seconds_per_batch", lambda *args, **kwargs: 0.0)  # no timed calls: steps alone count
    monkeypatch.setattr(gpt, "seconds_per_step", lambda *args: 0.0)
    out_dir = tmp_path / "out"
    argv = [*TINY, f"--data={corpus}", f"--out_dir={out_dir}", "--eval_interval=5", "--max_iters=30"]
    assert gpt.main(argv, make_model=NaNAtStep7ThenCtrlC) == 1
    assert capsys.readouterr().err.startswith("error: the loss was not finite at step 7: training stopped.")
    assert not (out_dir / "last.pt").exists()  # --resume would have gone on from the blown-up weights
    assert gpt.load_checkpoint(out_dir / "ckpt.pt")["step"] in (0, 5)


class BackendCompilerFailed(torch._dynamo.exc.TorchDynamoException):
    """As Dynamo raises it: the compiler's own error inside, as inner_exception."""

    def __init__(self, inner):
        super().__init__(f"backend='inductor' raised:\n{type(inner).__name__}: {inner}")
        self.inner_exception = inner


def broken_compile(fails_in_eval_mode):
    """A stand-in for torch.compile on a machine where compiling fails (no C compiler, say): the compiled
    model raises on its first call in training mode and, if told, in evaluation mode too."""

    def compile(model):
        class Broken(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, *args, **kwargs):
                if self.training or fails_in_eval_mode:
                    raise BackendCompilerFailed(RuntimeError("C compiler not found\n(a long traceback follows)"))
                return self.inner(*args, **kwargs)

        return Broken()

    return compile


@pytest.mark.parametrize("fails_in_eval_mode", [True, False], ids=["first-call", "first-training-step"])
def test_a_failing_compile_trains_without_it(fails_in_eval_mode, tmp_path, corpus, monkeypatch, capsys):
    argv = [*TINY, f"--data={corpus}", "--max_iters=6", "--eval_interval=3"]
    assert gpt.main([*argv, "--compile=false", f"--out_dir={tmp_path / 'eager'}"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(torch, "compile", broken_compile(fails_in_eval_mode))
    assert gpt.main([*argv, "--compile=true", f"--out_dir={tmp_path / 'compiled'}"]) == 0
    out = capsys.readouterr().out
    warning = "warning: torch.compile failed (RuntimeError: C compiler not found); training without it"
    assert out.count(warning) == 1
    assert "compile off" in out  # found out once, at setup, before the header

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in rows]

    assert losses("compiled") == losses("eager")
    compiled, eager = (gpt.load_checkpoint(tmp_path / run / "ckpt.pt")["model"] for run in ("compiled", "eager"))
    assert all(torch.equal(compiled[k], eager[k]) for k in eager)


def test_compile_traces_two_whole_graphs(tmp_path, corpus, monkeypatch, capsys):
    """With torch.compile, the model is traced twice in a whole run: once for training (at setup, where a forward
    and a backward pass find out whether compiling works) and once without gradients (the timing pass and every
    evaluation share it). A third would be a compile wasted (minutes on a
    GPU's budget of seconds); a graph break would split the model and lose fusion. The backend here runs
    each traced graph as it is, so the run must also match the eager one exactly."""
    graphs = []

    def keep_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile(model, backend=keep_graph))
    torch._dynamo.reset()  # no traces left from elsewhere in this process
    argv = [*TINY, f"--data={corpus}", "--max_iters=6", "--eval_interval=3", "--dropout=0.1"]
    try:
        assert gpt.main([*argv, "--compile=true", f"--out_dir={tmp_path / 'compiled'}"]) == 0
    finally:
        torch._dynamo.reset()
    assert "compile on" in capsys.readouterr().out
    assert len(graphs) == 2
    monkeypatch.undo()
    assert gpt.main([*argv, "--compile=false", f"--out_dir={tmp_path / 'eager'}"]) == 0
    assert rows_without_timing(tmp_path / "compiled") == rows_without_timing(tmp_path / "eager")


# ---- interruption and exact resume ------------------------------------------------------------------------------


def start(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **SERIAL_ENV}
    cmd = [sys.executable, str(ROOT / "gpt.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def interrupt(proc, signum, after="step ", delay=0.0, timeout=90):
    """Wait for a progress line that starts with `after`, let `delay` seconds pass, send the process `signum`,
    and collect (stdout, stderr, status)."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(after):
                time.sleep(delay)
                proc.send_signal(signum)
                break
        out, err = proc.communicate()
    finally:
        watchdog.cancel()
    return "".join(seen) + out, err, proc.returncode


INTERRUPTED = re.compile(r"^interrupted at step (\d+): saved (.*); continue with --resume$", re.M)
N = 150  # the steps of the runs compared below


@pytest.fixture(scope="module")
def resumed_runs(corpus, tmp_path_factory):
    """Run A trains N steps in one go. Run B, with the same settings, is stopped by SIGINT a little after its
    step-25 evaluation, resumed, stopped by SIGTERM at its next evaluation (step 50), and resumed to the end.

    Dropout is on, so the RNG states must be restored; the learning rate warms up for 20 steps, then follows
    the cosine to step N, so the schedule depends on max_iters, which the resumed legs take from the
    checkpoint (they are not given it). Each signal comes 100 steps or more before the end (a second or two
    on a slow machine), so the run cannot finish before it arrives."""
    tmp = tmp_path_factory.mktemp("resume")
    common = [arg for arg in TINY if not arg.startswith("--max_iters")]
    common += [f"--data={corpus}", "--dropout=0.1", "--eval_interval=25", "--eval_iters=2", "--warmup_iters=20"]
    a_dir, b_dir = tmp / "a", tmp / "b"
    a = start([*common, f"--out_dir={a_dir}", f"--max_iters={N}"])  # A runs beside B
    legs = []
    for signum, args, after, delay in (
        (signal.SIGINT, [f"--max_iters={N}"], "step 25/", 0.05),
        (signal.SIGTERM, ["--resume"], "step ", 0.0),
    ):
        out, err, status = interrupt(start([*common, f"--out_dir={b_dir}", *args]), signum, after, delay)
        legs.append({"signum": signum, "out": out, "err": err, "status": status, "last": torch.load(b_dir / "last.pt")})
    b = run_script("gpt.py", *common, f"--out_dir={b_dir}", "--resume", env=SERIAL_ENV)
    a_out, a_err = a.communicate(timeout=120)
    return {"legs": legs, "a": (a_out, a_err, a.returncode, a_dir), "b": (b.stdout, b.stderr, b.returncode, b_dir)}


@pytest.mark.parametrize("leg", [0, 1], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_last_pt_and_exits(resumed_runs, leg):
    run = resumed_runs["legs"][leg]
    assert run["status"] == 128 + run["signum"]
    assert "Traceback" not in run["out"] + run["err"]
    m = INTERRUPTED.search(run["out"])
    assert m, run["out"]
    b_dir = resumed_runs["b"][3]
    assert m[2] == str(b_dir / "last.pt")
    assert run["last"]["step"] == int(m[1])
    stopped = int(m[1])
    steps = progress_steps(run["out"])
    assert steps and steps[-1] <= stopped < N  # stopped after its last progress line, before the end
    if leg == 0:
        assert steps == [0, 25]
    else:  # the second leg went on from where the first stopped, without redoing it, and knew max_iters
        before = resumed_runs["legs"][0]["last"]["step"]
        assert steps == [(before // 25 + 1) * 25] and stopped > before
        assert f"step {steps[0]}/{N} |" in run["out"]


def progress_steps(stdout):
    return [int(line.split()[1].split("/")[0]) for line in stdout.splitlines() if line.startswith("step ")]


def rows_without_timing(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "ms_per_iter")} for r in rows]


def test_resumed_run_equals_the_uninterrupted_one(resumed_runs):
    a_out, a_err, a_status, a_dir = resumed_runs["a"]
    b_out, b_err, b_status, b_dir = resumed_runs["b"]
    assert a_status == 0 and b_status == 0, a_err + b_err
    assert "Traceback" not in a_err + b_err
    stopped = resumed_runs["legs"][1]["last"]["step"]
    assert progress_steps(b_out) == [s for s in range(0, N + 1, 25) if s > stopped]  # on from the saved step
    assert not (b_dir / "last.pt").exists()  # spent: a later --resume must not go back to it
    # the same losses, evaluation by evaluation
    rows = rows_without_timing(a_dir)
    assert [r["step"] for r in rows] == list(range(0, N + 1, 25))
    assert rows == rows_without_timing(b_dir)
    # the same weights and optimizer state, bit for bit
    ckpt_a, ckpt_b = gpt.load_checkpoint(a_dir / "ckpt.pt"), gpt.load_checkpoint(b_dir / "ckpt.pt")
    assert (ckpt_a["step"], ckpt_a["best_val"]) == (ckpt_b["step"], ckpt_b["best_val"])
    assert ckpt_a["model"].keys() == ckpt_b["model"].keys()
    for name, tensor in ckpt_a["model"].items():
        assert torch.equal(tensor, ckpt_b["model"][name]), name
    state_a, state_b = ckpt_a["optimizer"]["state"], ckpt_b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        for key, value in state_a[i].items():
            assert torch.equal(value, state_b[i][key]), (i, key)
    # the same final losses and the same sample
    tail_a, tail_b = (out.split("\nsample from the best model", 1)[1] for out in (a_out, b_out))
    assert re.sub(r"\| wall .*", "", tail_a) == re.sub(r"\| wall .*", "", tail_b)
