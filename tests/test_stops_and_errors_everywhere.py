"""Stops and errors where the CUDA paths meet them, tried on the CPU: a Ctrl-C while torch.compile compiles
inside an evaluation, a torch.compile that fails at the call or with an error that is not the compiler's, the messages
of main() under torchrun, a launcher that sets only some of torchrun's variables, and a text too large for the device.
"""

import os
import signal

import pytest
import torch
from conftest import TINY

import gpt

pytestmark = pytest.mark.usefixtures("one_thread")

ACK = "stopping: last.pt is saved after this step (an evaluation is cut short); Ctrl-C again stops at once"
SHORT = [*TINY, "--max_iters=2", "--eval_interval=2"]


def test_ctrl_c_while_compiling_inside_an_evaluation_saves_last_pt(corpus, tmp_path, monkeypatch, capfd):
    """A resumed compiled run compiles its evaluation's graph inside its first evaluation (a new run does it in the
    header's timing). A Ctrl-C while Dynamo compiles it is given up after it, between batches: an exception raised
    inside Dynamo would come out as its own BackendCompilerFailed, a traceback without last.pt."""
    argv = [*SHORT, f"--data={corpus}", f"--out_dir={tmp_path}"]
    assert gpt.main(argv) == 0
    graphs, compile = [], torch.compile

    def ctrl_c_while_compiling_the_second_graph(gm, example_inputs):  # the first is training's, at setup
        graphs.append(1)
        if len(graphs) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model: compile(model, backend=ctrl_c_while_compiling_the_second_graph))
    capfd.readouterr()
    assert gpt.main([*argv, "--max_iters=4", "--resume", "--compile=true"]) == 130
    out, err = capfd.readouterr()
    assert len(graphs) == 2 and "| compile on |" in out
    assert err.strip() == ACK and "Traceback" not in out + err
    assert f"interrupted at step 4: saved {tmp_path / 'last.pt'}; continue with --resume" in out.splitlines()
    last = gpt.load_checkpoint(tmp_path / "last.pt")
    assert (last["step"], last["evaluated_step"]) == (4, 2)  # --resume evaluates step 4


def test_torch_compile_that_raises_at_the_call_falls_back(corpus, tmp_path, monkeypatch, capsys):
    """torch.compile checks at the call that Dynamo supports this Python, and raises there where it does not."""

    def unsupported(model):
        raise RuntimeError("Python 3.15+ not yet supported for torch.compile")

    monkeypatch.setattr(torch, "compile", unsupported)
    assert gpt.main([*SHORT, f"--data={corpus}", f"--out_dir={tmp_path}", "--compile=true"]) == 0
    lines = capsys.readouterr().out.splitlines()
    warning = "warning: torch.compile failed (RuntimeError: Python 3.15+ not yet supported for torch.compile)"
    assert f"{warning}; training without it" in lines
    assert "| compile off |" in lines[lines.index(f"{warning}; training without it") + 1]
    assert gpt.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2


def test_an_error_in_the_compile_trial_that_is_not_the_compilers_reaches_the_user_as_itself(
    corpus, tmp_path, monkeypatch, capsys
):
    """A device's error (here as CUDA words it) raised by the compiled model's run, not by Dynamo: training without
    compiling would meet it too, so it is not reported as torch.compile's failure."""

    class FailsOnTheDevice(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "compile", lambda model: FailsOnTheDevice())
    with pytest.raises(RuntimeError, match="^CUDA error: an illegal memory access was encountered$"):
        gpt.main([*SHORT, f"--data={corpus}", f"--out_dir={tmp_path}", "--compile=true"])
    assert "torch.compile failed" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "error, status, said",
    [
        (torch.OutOfMemoryError("CUDA out of memory"), 1, "error: out of memory on the device: "),
        (KeyboardInterrupt(signal.SIGINT), 130, "\ninterrupted: stopped at once; "),
    ],
    ids=["out-of-memory", "ctrl-c"],
)
def test_main_says_it_once_under_torchrun(error, status, said, monkeypatch, capsys):
    """Every process of torchrun gets Ctrl-C (and may run out of memory alike): rank 0 alone says so."""

    def fails(*args):
        raise error

    monkeypatch.setattr(gpt, "sample", fails)
    monkeypatch.setenv("RANK", "1")
    assert gpt.main(["--sample"]) == status
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert gpt.main(["--sample"]) == status
    assert capsys.readouterr().err.startswith(said)


def test_a_launcher_that_sets_rank_but_not_the_local_variables_gets_one_line(monkeypatch, capsys):
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a GPU per process
    needs the local ones, which name its GPU and count the processes on this machine."""
    monkeypatch.setattr(gpt, "resolve_device", lambda name: torch.device("cuda"))
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    assert gpt.main(["--max_iters=1"]) == 1
    missing = "RANK is set, as torchrun sets it, but not LOCAL_RANK, LOCAL_WORLD_SIZE"
    assert capsys.readouterr().err == f"error: {missing}: start the processes with torchrun, which sets them all\n"


def test_a_text_too_large_for_the_device_gets_advice_that_fits(corpus, tmp_path, monkeypatch, capsys):
    """The whole text goes onto the device before the model trains (build): running out of memory there is the
    text's fault, not the batch's."""

    def too_large(data):  # where data.to(device) raises on a GPU
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(gpt, "split_data", too_large)
    assert gpt.main([*SHORT, f"--data={corpus}", f"--out_dir={tmp_path / 'out'}"]) == 1
    text = f"the text ({corpus}) is put on the device whole, and with the model it does not fit"
    advice = "train on a shorter text, or on a device with more memory"
    assert capsys.readouterr().err == f"error: out of memory on the device before training began: {text}; {advice}\n"
    assert not (tmp_path / "out").exists()
