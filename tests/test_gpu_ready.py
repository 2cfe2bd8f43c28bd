"""Ready for the first GPU: figures that are true on any card and any number of processes, resume across
devices and runs, and every precision path (bfloat16, float16 with its gradient scaler, torch.compile) run on the CPU
before a GPU ever runs it."""

import json
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, built, interrupt_during_step, trained_once

import gpt

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def without_timing(out_dir):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "ms_per_iter")} for r in rows(out_dir)]


def same_weights(a, b):
    ckpt_a, ckpt_b = (gpt.load_checkpoint(Path(d) / "ckpt.pt") for d in (a, b))
    assert ckpt_a["model"].keys() == ckpt_b["model"].keys()
    return all(torch.equal(ckpt_a["model"][k], ckpt_b["model"][k]) for k in ckpt_a["model"])


# ---- figures you can trust ------------------------------------------------------------------------------------

CARDS = {  # the name the driver gives -> the peak (bfloat16, TF32, float32) in TFLOP/s, or None: unknown, no MFU shown
    "NVIDIA H100 80GB HBM3": (989, 494, 67),
    "NVIDIA H100 PCIe": (756, 378, 51),
    "NVIDIA H100 NVL": (835, 418, 60),
    "NVIDIA H200": (989, 494, 67),
    "NVIDIA A100-SXM4-80GB": (312, 156, 19.5),
    "NVIDIA A100-PCIE-40GB": (312, 156, 19.5),
    "NVIDIA L40S": (362, 183, 91.6),
    "NVIDIA L40": (181, 90.5, 90.5),
    "NVIDIA L4": (121, 60, 30.3),
    "NVIDIA A10": (125, 62.5, 31.2),
    "NVIDIA A10G": None,  # not an A10
    "NVIDIA GeForce RTX 4090": (165, 83, 82.6),
    "NVIDIA GeForce RTX 4090 Laptop GPU": None,  # a far slower chip under the same number
    "Tesla V100-SXM2-16GB": (125, 15.7, 15.7),
    "Tesla V100-PCIE-32GB": (112, 14, 14),
    "Tesla T4": (65, 8.1, 8.1),
    "NVIDIA H800": None,
}


@pytest.mark.parametrize("name", CARDS)
def test_the_card_table_matches_whole_card_names(name, monkeypatch, tf32_flags):
    """Each card's peak in bfloat16, in float32 run as TF32 (auto), and in plain float32 (--dtype=float32 turns TF32
    off: on an H100 the peak is then 67 TFLOP/s, not 494, and an MFU against 494 would show 7x too low)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    cuda, got = torch.device("cuda"), []
    for dtype, tf32 in [(torch.bfloat16, True), (torch.float32, True), (torch.float32, False)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        got.append(gpt.peak_flops(cuda, dtype))
    assert got == ([None] * 3 if CARDS[name] is None else [1e12 * peak for peak in CARDS[name]])
    assert gpt.peak_flops(CPU, torch.float32) is None


# Training FLOPs per token of TINY's model (2 layers, 2 heads, 32 wide, context 16, 65 characters), counted by hand:
# 6 per weight of a matrix product (each block: qkv 32 x 96 = 3,072, proj 32 x 32 + 32 = 1,056, fc 32 x 128 + 128 =
# 4,224, proj 128 x 32 + 32 = 4,128, so 12,480; the head 32 x 65 + 65 = 2,145: 27,105 in all), plus attention's
# QK^T and AV, 12 x n_layer x n_embd x block_size = 12,288
TINY_FLOPS_PER_TOKEN = 6 * 27_105 + 12_288  # 174,918


@pytest.mark.parametrize("world_size", [1, 4])
def test_mfu_is_each_gpus_share_of_its_own_cards_peak(world_size):
    """Each process trains its share of the global batch on its own card: tokens of all / processes / one peak."""
    cfg = gpt.replace(gpt.Config(), n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8)
    model = gpt.GPT(65, cfg)
    tokens, per_gpu = gpt.throughput(model, cfg, world_size)
    assert tokens == 8 * 16 * world_size  # the batch of all processes
    assert per_gpu == gpt.flops_per_token(model, cfg) * tokens / world_size
    assert per_gpu == TINY_FLOPS_PER_TOKEN * 8 * 16  # each GPU: its own 8 sequences of 16


def test_the_progress_line_shows_mfu_against_the_cards_peak(corpus, capsys):
    step_flops = TINY_FLOPS_PER_TOKEN * 8 * 16  # a step of TINY: 8 sequences of 16
    with built([*TINY, f"--data={corpus}"]) as run:
        run.peak, run.ms_per_iter = step_flops / 0.5, 500.0  # a card that does one step's work in 0.5 s: 100%
        run.t_eval = time.time()
        run.report(500, {"train": 2.0, "val": 2.1}, 1e-3)
        assert "| mfu 100% |" in capsys.readouterr().out
        run.peak = 4 * step_flops / 0.5  # a card 4 times as fast
        run.report(500, {"train": 2.0, "val": 2.1}, 1e-3)
        assert "| mfu 25% |" in capsys.readouterr().out


def test_tokens_per_second_read_in_thousands_and_below_a_thousand_whole(corpus, capsys):
    """A step of TINY is 128 tokens: at 64 ms a step that is 2,000 tokens/s, "2k"; on a slow machine, at 512 ms,
    250 tokens/s, shown as such rather than rounded to "0k"."""
    with built([*TINY, f"--data={corpus}"]) as run:
        run.t_eval = time.time()
        for ms, shown in [(64.0, "| 2k tok/s |"), (512.0, "| 250 tok/s |")]:
            run.ms_per_iter = ms
            run.report(500, {"train": 2.0, "val": 2.1}, 1e-3)
            assert shown in capsys.readouterr().out


def test_checkpoint_saves_are_left_out_of_ms_per_it(corpus, tmp_path, monkeypatch):
    """ms/it, tok/s, mfu and eta time the training steps. Writing the model and AdamW's state after an evaluation
    (here made to take 0.4 s) belongs to the evaluation's pause, as the evaluation itself does."""
    save = gpt.Run.save

    def slow_save(self, name, step):
        time.sleep(0.4)
        save(self, name, step)

    monkeypatch.setattr(gpt.Run, "save", slow_save)
    assert gpt.main([*TINY, f"--data={corpus}", f"--out_dir={tmp_path}", "--max_iters=8", "--eval_interval=4"]) == 0
    ms = [r["ms_per_iter"] for r in rows(tmp_path)]
    assert ms[0] is None and all(m < 100 for m in ms[1:]), ms  # with a save in it: over 100 ms per step of 4


def test_the_model_has_no_buffer_for_ddp_to_copy_before_each_forward_pass():
    """DDP broadcasts a module's buffers from rank 0 before every forward pass (a collective, every micro-batch):
    the causal mask is made where it is used, so there is none."""
    cfg = gpt.replace(gpt.Config(), n_layer=2, n_head=2, n_embd=32, block_size=16)
    assert list(gpt.GPT(65, cfg).buffers()) == []


# ---- resume, and the fine points around it ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_dir(corpus, tmp_path_factory):
    return trained_once(
        tmp_path_factory, "gpu_ready", [*TINY, f"--data={corpus}", "--max_iters=10", "--eval_interval=5"]
    )


@pytest.mark.parametrize(
    ("saved_on", "state_bytes", "named"),
    [("cuda", 16, "cuda"), ("mps", 16, "mps"), (None, 16, "another device")],  # None: a checkpoint that names none
)
def test_a_checkpoint_from_another_kind_of_device_resumes_here(
    saved_on, state_bytes, named, finished_dir, corpus, tmp_path, capsys
):
    """A run trained on a rented GPU, its out/ copied to a laptop: model and optimizer load, and the batch generator,
    whose state is of another kind (16 bytes on CUDA, 5,056 on a CPU), is seeded afresh, with one line saying so."""
    out_dir = tmp_path / "out"
    shutil.copytree(finished_dir, out_dir)
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    ckpt["rng"]["batches"] = torch.arange(state_bytes, dtype=torch.uint8)  # what that device's generator holds
    if saved_on:
        ckpt["rng"]["device"] = saved_on
    else:
        del ckpt["rng"]["device"]
    torch.save(ckpt, out_dir / "ckpt.pt")
    capsys.readouterr()
    assert gpt.main([*TINY, f"--data={corpus}", f"--out_dir={out_dir}", "--resume", "--max_iters=15"]) == 0
    out, err = capsys.readouterr()
    warning = (
        f"warning: the checkpoint was saved on {named} and resumes on cpu: the batches are drawn afresh and will "
        "not replay exactly those of an unbroken run"
    )
    assert [line for line in out.splitlines() if line.startswith("warning:")] == [warning]
    assert "Traceback" not in out + err
    assert [r["step"] for r in rows(out_dir)] == [0, 5, 10, 15]
    assert gpt.load_checkpoint(out_dir / "ckpt.pt")["rng"]["device"] == "cpu"


def test_the_device_a_run_was_trained_on_does_not_follow_it(finished_dir, corpus, tmp_path, capsys):
    """A checkpoint that names --device=cuda resumes and samples on a machine without CUDA, where it is started."""
    out_dir = tmp_path / "out"
    shutil.copytree(finished_dir, out_dir)
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    ckpt["config"]["device"] = "cuda"
    torch.save(ckpt, out_dir / "ckpt.pt")
    assert gpt.main(["--sample", f"--out_dir={out_dir}", "--max_new_tokens=5"]) == 0
    assert gpt.main([*TINY[1:], f"--data={corpus}", f"--out_dir={out_dir}", "--resume", "--max_iters=12"]) == 0
    assert "| device cpu |" in capsys.readouterr().out


def test_resume_continues_the_newest_run_and_an_older_runs_model_is_set_aside(corpus, tmp_path, monkeypatch, capsys):
    """Run A finishes in out/. Run B starts there with other settings and is stopped by Ctrl-C during its first
    evaluation, which leaves B's last.pt at step 0, behind A's ckpt.pt at step 30. --resume must continue B. A's
    files are not lost: B moved them into a folder of their own when it started, and said so in one line."""
    out_dir = tmp_path / "out"
    common = [*TINY, f"--data={corpus}", f"--out_dir={out_dir}"]
    assert gpt.main([*common, "--n_embd=16", "--max_iters=30"]) == 0
    a_metrics = (out_dir / "metrics.jsonl").read_text()
    capsys.readouterr()

    estimate_loss = gpt.estimate_loss

    def ctrl_c_during_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return estimate_loss(*args, **kwargs)

    monkeypatch.setattr(gpt, "estimate_loss", ctrl_c_during_evaluation)
    assert gpt.main([*common, "--n_embd=32", "--max_iters=60"]) == 130
    monkeypatch.undo()
    out = capsys.readouterr().out
    (earlier,) = out_dir.glob("earlier-*")
    note = f"note: {out_dir} held an earlier run; its ckpt.pt, metrics.jsonl moved to {earlier} (sample it with "
    assert out.splitlines()[1] == note + f"--out_dir={earlier})"  # after the line that says what will be trained
    assert (earlier / "metrics.jsonl").read_text() == a_metrics
    assert gpt.load_checkpoint(earlier / "ckpt.pt")["config"]["n_embd"] == 16
    assert sorted(p.name for p in out_dir.iterdir() if p.is_file()) == ["last.pt", "metrics.jsonl"]

    assert gpt.main([f"--out_dir={out_dir}", f"--data={corpus}", "--resume"]) == 0
    capsys.readouterr()
    ckpt = gpt.load_checkpoint(out_dir / "ckpt.pt")
    assert (ckpt["config"]["n_embd"], ckpt["config"]["max_iters"], ckpt["step"]) == (32, 60, 60)  # B, to its end
    assert [r["step"] for r in rows(out_dir)] == [0, 10, 20, 30, 40, 50, 60]
    assert gpt.main(["--sample", f"--out_dir={earlier}", "--max_new_tokens=5"]) == 0  # A's model, still there


def test_out_of_memory_while_compiling_gets_the_out_of_memory_advice(corpus, tmp_path, monkeypatch, capsys):
    """The compile trial runs a whole forward and backward pass: running out of memory there is the batch's
    fault, not torch.compile's, and gets the same one line as out of memory during training."""

    class RunsOutOfMemory(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def compile(model):
        return RunsOutOfMemory()

    monkeypatch.setattr(torch, "compile", compile)
    argv = [*TINY, f"--data={corpus}", f"--out_dir={tmp_path / 'out'}", "--compile=true"]
    assert gpt.main(argv) == 1
    out, err = capsys.readouterr()
    assert err == f"error: {gpt.out_of_memory(gpt.replace(gpt.Config(), **gpt.parse_overrides(argv)))}\n"
    assert "torch.compile failed" not in out + err and not (tmp_path / "out").exists()


# ---- precision --------------------------------------------------------------------------------------------------


def no_trial(dtype):
    raise AssertionError("nothing was to be timed")


@pytest.mark.parametrize(("dtype", "tf32"), [("float32", False), ("auto", True), ("bfloat16", True)])
def test_an_explicit_float32_turns_tf32_off(dtype, tf32, monkeypatch, tf32_flags):
    """--dtype=float32 means float32 matrix products, as the advice for a loss gone NaN expects; auto keeps TF32 for
    what runs in float32 on a CUDA card (it is several times faster, and precise enough to train)."""
    monkeypatch.setattr(gpt, "cpu_has_bfloat16", lambda: False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    gpt.precision(gpt.Config(dtype=dtype), CPU, no_trial)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)


@pytest.mark.parametrize(
    ("native", "seconds", "picked", "why"),
    [
        (False, None, torch.float32, " (this CPU has no bfloat16 instructions)"),
        (True, {torch.float32: 3.0, torch.bfloat16: 2.0}, torch.bfloat16, " (1.5x faster than float32 here)"),
        (True, {torch.float32: 2.4, torch.bfloat16: 2.0}, torch.bfloat16, " (1.2x faster than float32 here)"),
        (True, {torch.float32: 2.3, torch.bfloat16: 2.0}, torch.float32, " (bfloat16 about as fast here: 1.15x)"),
        (True, {torch.float32: 1.0, torch.bfloat16: 1.1}, torch.float32, " (bfloat16 about as fast here: 0.91x)"),
        (True, {torch.float32: 1.0, torch.bfloat16: 2.5}, torch.float32, " (bfloat16 2.5x slower here)"),
    ],
    ids=["no-bf16-instructions", "bf16-faster", "bf16-1.2x", "bf16-1.15x", "bf16-a-little-slower", "bf16-slower"],
)
def test_auto_on_a_cpu_picks_bfloat16_only_where_it_trains_clearly_faster(
    native, seconds, picked, why, monkeypatch, tf32_flags
):
    """The instructions alone do not say that bfloat16 pays for a given model: auto times a training step in each,
    takes bfloat16 only where it is at least 1.2x faster (it changes the numerics: not for a gain within the noise),
    and says why. Without the instructions bfloat16 is emulated, many times slower: nothing to time."""
    monkeypatch.setattr(gpt, "cpu_has_bfloat16", lambda: native)
    dtype, autocast, scaler, said = gpt.precision(gpt.Config(), CPU, seconds.get if seconds else no_trial)
    assert (dtype, said) == (picked, why) and not scaler.is_enabled()
    assert isinstance(autocast, torch.autocast) == (picked == torch.bfloat16)
    if picked == torch.bfloat16:
        assert (autocast.device, autocast.fast_dtype) == ("cpu", torch.bfloat16)


def test_float32_is_timed_again_after_bfloat16_and_its_faster_window_counts(monkeypatch, tf32_flags):
    """float32 goes first (the note comes from it), when the process has only just started: a first window still
    slow from that must not make bfloat16 look faster than it is."""
    monkeypatch.setattr(gpt, "cpu_has_bfloat16", lambda: True)
    windows = iter([(torch.float32, 3.0), (torch.bfloat16, 2.0), (torch.float32, 2.2)])

    def seconds(dtype):
        expected, took = next(windows)
        assert dtype == expected
        return took

    dtype, _, _, said = gpt.precision(gpt.Config(), CPU, seconds)
    assert (dtype, said) == (torch.float32, " (bfloat16 about as fast here: 1.10x)")
    assert next(windows, None) is None


@pytest.mark.parametrize(("dtype", "scaled"), [("bfloat16", False), ("float16", True), ("float32", False)])
def test_every_dtype_runs_on_any_cpu(dtype, scaled, monkeypatch, tf32_flags):
    monkeypatch.setattr(gpt, "cpu_has_bfloat16", lambda: False)  # named, not picked: even where it is emulated
    got, autocast, scaler, why = gpt.precision(gpt.Config(dtype=dtype), CPU, no_trial)  # named: nothing is timed
    assert got == getattr(torch, dtype) and scaler.is_enabled() == scaled and why == ""  # float16: scaled, as a T4
    assert (getattr(autocast, "fast_dtype", torch.float32), getattr(autocast, "device", "cpu")) == (got, "cpu")
    # and what it gives trains: a step of a small model, its matrix products in that dtype, through the scaler
    cfg = gpt.replace(gpt.Config(), n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4, dropout=0.0)
    torch.manual_seed(0)
    model = gpt.GPT(65, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = gpt.make_optimizer(model, cfg, "cpu")
    x = torch.randint(65, (4, 8))
    with autocast:
        logits, loss = model(x, x)
    assert logits.dtype == got and torch.isfinite(loss)
    scaler.scale(loss).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g.dtype == torch.float32 for g in grads)  # the weights and their gradients stay float32
    with autocast:
        unscaled = torch.autograd.grad(model(x, x)[1], list(model.parameters()))
    factor = 65536.0 if scaled else 1.0  # GradScaler's first scale: float16's gradients come out multiplied by it
    for g, u in zip(grads, unscaled, strict=True):
        torch.testing.assert_close(g, u * factor, rtol=1e-2, atol=1e-3 * factor * u.abs().max().item())
    scaler.step(optimizer)
    scaler.update()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(after, before, strict=True))


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")), reason="reads /proc/cpuinfo of x86"
)
def test_the_bfloat16_probe_says_what_the_cpu_says():
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    assert gpt.cpu_has_bfloat16() == ("avx512_bf16" in flags or "amx_tile" in flags)


def test_mixed_precision_on_apple_gpus_is_refused_in_one_line():
    with pytest.raises(gpt.UserError, match=r"^--dtype=float16 is not supported on mps here; use --dtype=float32 "):
        gpt.precision(gpt.Config(dtype="float16"), torch.device("mps"), no_trial)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_mixed_precision_run_interrupted_and_resumed_is_the_unbroken_run(dtype, corpus, tmp_path, monkeypatch):
    """bfloat16, and float16 with its gradient scaler, end to end on the CPU: stopped by Ctrl-C at step 15 and
    resumed, the run ends with the losses, the weights and the scaler's state of the unbroken one, bit for bit."""
    args = [*TINY, f"--data={corpus}", f"--dtype={dtype}", "--max_iters=30", "--dropout=0.1"]
    assert gpt.main([*args, f"--out_dir={tmp_path / 'whole'}"]) == 0
    interrupt_during_step(monkeypatch, 15)
    assert gpt.main([*args, f"--out_dir={tmp_path / 'cut'}"]) == 130
    monkeypatch.undo()
    last = gpt.load_checkpoint(tmp_path / "cut" / "last.pt")
    assert last["step"] == 15
    # float16's scaler has counted 15 updates without an overflow (at 2,000 it doubles the scale); bfloat16 has none
    assert last["scaler"] == ({"scale": 65536.0, "_growth_tracker": 15} if dtype == "float16" else {}) | last["scaler"]
    assert gpt.main([*args, f"--out_dir={tmp_path / 'cut'}", "--resume"]) == 0
    assert without_timing(tmp_path / "cut") == without_timing(tmp_path / "whole")
    assert same_weights(tmp_path / "cut", tmp_path / "whole")
    scalers = [gpt.load_checkpoint(tmp_path / name / "ckpt.pt")["scaler"] for name in ("cut", "whole")]
    assert scalers[0] == scalers[1]  # counted on from 15, not from 0


def test_a_float16_run_resumes_with_the_loss_scale_it_had(corpus, tmp_path):
    """A float16 run whose scale backed off to 1,024 (overflowing updates, each one skipped, halve it) goes on at
    1,024 when resumed. Started over at 65,536, it would skip its next updates until the scale came down again."""
    out_dir = tmp_path / "out"
    common = [*TINY, f"--data={corpus}", f"--out_dir={out_dir}", "--dtype=float16", "--eval_interval=5"]
    assert gpt.main([*common, "--max_iters=5"]) == 0
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] == 65536.0
    ckpt["scaler"]["scale"] = 1024.0
    torch.save(ckpt, out_dir / "ckpt.pt")
    assert gpt.main([*common, "--resume", "--max_iters=10"]) == 0
    assert gpt.load_checkpoint(out_dir / "ckpt.pt")["scaler"]["scale"] == 1024.0


def has_a_cpp_compiler():
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not has_a_cpp_compiler(), reason="torch.compile on a CPU needs a C++ compiler (g++ or clang++)")
def test_a_real_torch_compile_on_the_cpu_trains_as_the_eager_model_does(corpus, tmp_path, capsys):
    """The GPU's default path, compiled by Inductor into C++ for this CPU: it compiles (no fallback), trains, and
    its losses agree with the eager model's (fused kernels round differently, so not to the last bit)."""
    args = [*TINY, f"--data={corpus}", "--max_iters=6", "--eval_interval=3", "--n_layer=1"]
    torch._dynamo.reset()
    try:
        assert gpt.main([*args, "--compile=true", f"--out_dir={tmp_path / 'compiled'}"]) == 0
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out
    assert "| compile on |" in out and "torch.compile failed" not in out
    assert gpt.main([*args, "--compile=false", f"--out_dir={tmp_path / 'eager'}"]) == 0
    compiled, eager = rows(tmp_path / "compiled"), rows(tmp_path / "eager")
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [0, 3, 6]
    for c, e in zip(compiled, eager, strict=True):
        assert c["train_loss"] == pytest.approx(e["train_loss"], abs=2e-3)
        assert c["val_loss"] == pytest.approx(e["val_loss"], abs=2e-3)
