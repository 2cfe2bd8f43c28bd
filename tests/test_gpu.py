"""The CUDA paths, on a real card: every test here is marked gpu, runs wherever CUDA is, and is skipped
elsewhere with the reason (tests/conftest.py). `python -m pytest -m gpu` runs them alone, in a few minutes on one H100.

They run what the CPU tests can only imitate: bfloat16 and float16 autocast with the gradient scaler, torch.compile and
its fallback, the fused AdamW, the fused attention kernel, the KV cache, checkpoints moving between a GPU and a CPU,
bench.py, look.py, and NCCL under torchrun. CUDA is not bit-exact from one run to the next (some backward kernels add
with atomics, in whatever order the threads come), so where two runs are compared, they agree within a tolerance stated
beside the comparison, not to the last bit as on the CPU. Runs are short: the default model compiles once, in the
default run; the other runs train without compiling, where compiling is not what they test."""

import json
import math
import re
import shutil
import signal
import time
from dataclasses import replace
from itertools import pairwise

import pytest
import torch
from conftest import TINY, interrupt_during_step, run_script, trained_once
from test_distributed import INTERRUPTED, SETTINGS, Run, interrupt_when_training, metrics, progress_steps
from test_kvcache import BS, plain_last_logits, rule_windows
from test_kvcache import generate as generate_recorded
from test_kvcache import make_model as confident_model
from test_look import KNOBS, look
from test_resume_settings_and_gpu_errors import optimizer_of_each_step

import gpt

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
# TINY on the card, in auto precision
CUDA_TINY = [*(a for a in TINY if not a.startswith(("--device", "--dtype"))), f"--device={DEVICE}"]
# the default model (10.79M parameters, batch 64 x 256) for a few steps: a warm-up of 5 steps, so that it learns in them
SHORT = ["--max_iters=20", "--eval_interval=10", "--eval_iters=4", "--warmup_iters=5", "--max_new_tokens=40"]
SHORT_EAGER = ["--max_iters=10", "--eval_interval=5", "--eval_iters=4", "--warmup_iters=5", "--compile=false"]
SHORT_EAGER += ["--max_new_tokens=20"]
PROGRESS = re.compile(
    r"^step (\d+)/\d+ \| train \S+ \| val \S+ \| lr \S+ \| ([\d.]+) ms/it \| (\d+)k tok/s(?: \| mfu (\d+)%)?"
)


def auto_dtype():
    """What --dtype=auto must pick on this card: bfloat16 from compute capability 8.0 (A100, H100), else float16."""
    return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def header(stdout):
    return next(line for line in stdout.splitlines() if " parameters | device " in line)


def check_learned(out_dir, steps, fall):
    """metrics.jsonl has a row at each of `steps`, every loss finite, and val falling at each evaluation, by `fall` in
    all. Returns the rows."""
    found = rows(out_dir)
    assert [r["step"] for r in found] == steps
    assert all(math.isfinite(r[k]) for r in found for k in ("train_loss", "val_loss")), found
    vals = [r["val_loss"] for r in found]
    assert all(later < earlier for earlier, later in pairwise(vals)), vals
    assert vals[-1] < vals[0] - fall, vals
    return found


def check_speed(stdout, dtype):
    """Each progress line after step 0 shows ms/it, tok/s that is the default batch's 16,384 tokens over that time, and
    an MFU between 0 and 100% against this card's peak in this precision (gpt.peak_flops; no MFU on a card it does not
    know). Read peak_flops after the run: for float32 it depends on whether the run turned TF32 off."""
    cfg = gpt.Config()
    tokens, flops = gpt.throughput(gpt.GPT(65, cfg), cfg, world_size=1)  # tiny Shakespeare has 65 characters
    peak = gpt.peak_flops(torch.device(DEVICE), dtype)
    lines = [m for m in map(PROGRESS.match, stdout.splitlines()) if m]
    assert len(lines) >= 1, stdout
    for m in lines:
        ms, ktok = float(m[2]), int(m[3])
        assert ms > 0 and abs(ktok - tokens / ms) <= 1, m[0]  # tokens per ms: thousands per second
        if peak is None:
            assert m[4] is None, m[0]
            continue
        mfu = 100 * flops / (ms / 1000) / peak
        assert 0 < mfu < 100 and abs(int(m[4]) - mfu) <= 1, (m[0], mfu)  # ms is shown to 0.1, the MFU to 1%


# ---- the default run, as `python gpt.py` trains on a GPU: auto precision, compiled --------------------------------


@pytest.fixture(scope="module")
def default_run(corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("default") / "out"
    r = run_script("gpt.py", f"--data={corpus}", *SHORT, f"--out_dir={out_dir}", timeout=400)
    return r, out_dir


def test_the_default_run_compiles_and_learns_in_auto_precision(default_run, corpus):
    r, out_dir = default_run
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "torch.compile failed" not in r.stdout
    dtype = str(auto_dtype()).removeprefix("torch.")
    params = sum(p.numel() for p in gpt.GPT(65, gpt.Config()).parameters())
    line = header(r.stdout)
    assert line.startswith(f"{params / 1e6:.2f}M parameters | device cuda")
    assert line.endswith(f" | {dtype} | compile on | 1 process(es)")
    check_learned(out_dir, [0, 10, 20], fall=0.5)  # from about 4.17 (ln 65: every character alike): it learned
    check_speed(r.stdout, auto_dtype())
    # ckpt.pt loads on a CPU: float32 weights, and on CPU batches of the text they give the val loss the GPU measured
    # (0.2: the noise of 16 windows here against 256 there, and float32 against the run's bfloat16)
    ckpt = gpt.load_checkpoint(out_dir / "ckpt.pt")
    assert ckpt["step"] == 20 and ckpt["rng"]["device"] == "cuda" and "cuda" in ckpt["rng"]
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ckpt["model"].values())
    cfg = gpt.Config(**ckpt["config"])
    model = gpt.load_weights(gpt.GPT(len(ckpt["vocab"]), cfg), ckpt, out_dir / "ckpt.pt").eval()
    _, ids = gpt.read_corpus(str(corpus), ckpt["vocab"])
    val = gpt.split_data(ids)[1]
    batches = gpt.Machine(torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(*gpt.get_batch(val, replace(cfg, batch_size=8), batches))[1].item() for _ in range(2)]
    assert sum(losses) / 2 == pytest.approx(ckpt["best_val"], abs=0.2)


def test_the_header_names_the_card(default_run):
    """Which GPU a run had, in its output: "device cuda" alone does not tell an H100 from a T4."""
    r, _ = default_run
    assert torch.cuda.get_device_name() in header(r.stdout), header(r.stdout)


def test_float16_trains_with_the_gradient_scaler(corpus, tmp_path, capsys, tf32_flags):
    out_dir = tmp_path / "out"
    assert gpt.main([f"--data={corpus}", *SHORT_EAGER, "--dtype=float16", f"--out_dir={out_dir}"]) == 0
    out = capsys.readouterr().out
    assert header(out).endswith(" | float16 | compile off | 1 process(es)")
    check_learned(out_dir, [0, 5, 10], fall=0.3)
    check_speed(out, torch.float16)
    # the scaler's state is saved: the scale starts at 2^16 and halves at each step whose gradients overflowed (that
    # step is skipped); the tracker counts the steps since the last overflow, so it is at most the steps not skipped
    scaler = gpt.load_checkpoint(out_dir / "ckpt.pt")["scaler"]
    overflows = math.log2(65536 / scaler["scale"])
    assert overflows == int(overflows) and 0 <= overflows < 10, scaler
    assert 0 <= scaler["_growth_tracker"] <= 10 - overflows, scaler


def test_float32_turns_tf32_off_and_reports_mfu_against_the_float32_peak(corpus, tmp_path, capsys, tf32_flags):
    out_dir = tmp_path / "out"
    assert gpt.main([f"--data={corpus}", *SHORT_EAGER, "--dtype=float32", f"--out_dir={out_dir}"]) == 0
    out = capsys.readouterr().out
    assert header(out).endswith(" | float32 | compile off | 1 process(es)")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    check_learned(out_dir, [0, 5, 10], fall=0.3)
    check_speed(out, torch.float32)  # TF32 off: the card's plain float32 peak (an H100's 67 TFLOP/s, not 494)
    assert gpt.load_checkpoint(out_dir / "ckpt.pt")["scaler"] == {}  # no loss scaling outside float16
    # and off on the card itself: a float32 product as exact as float32 makes it (TF32 keeps 10 bits: errors ~1e-3)
    a, b = torch.randn(2, 512, 512, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    error = ((a @ b).double() - a.double() @ b.double()).abs().max() / (a.double() @ b.double()).abs().max()
    assert error < 1e-5, error.item()


# ---- the model's kernels on CUDA -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    # relative to each tensor's norm: float32 (TF32 off) differs by rounding alone; bfloat16 keeps 8 bits (2^-8 = 0.4%)
    # and the two paths round in different places; a wrong mask or scale is off by tens of percent
    [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)],
    ids=["float32", "bfloat16"],
)
@pytest.mark.parametrize("T", [64, 23])  # a full window, and a shorter one (the mask's corner)
def test_the_fused_kernel_is_the_formula_on_cuda(dtype, tolerance, T, tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cfg = gpt.Config(block_size=64, n_embd=128, n_head=4, n_layer=2, dropout=0.0)
    torch.manual_seed(0)
    fused = gpt.GPT(65, cfg).to(DEVICE)
    manual = gpt.GPT(65, replace(cfg, fused_attention=False)).to(DEVICE)
    manual.load_state_dict(fused.state_dict())
    gen = torch.Generator(DEVICE).manual_seed(1)
    idx = torch.randint(65, (4, T), device=DEVICE, generator=gen)
    targets = torch.randint(65, (4, T), device=DEVICE, generator=gen)
    results = []
    for model in (fused, manual):  # training mode, as in a step; dropout 0
        with gpt.autocast_to(torch.device(DEVICE), dtype):
            logits, loss = model(idx, targets)
        loss.backward()
        results.append((logits.float(), {name: p.grad for name, p in model.named_parameters()}))

    def relative(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert relative(results[0][0], results[1][0]) < tolerance
    for name, grad in results[1][1].items():
        assert relative(results[0][1][name], grad) < tolerance, name
    assert results[0][1]["blocks.0.sa.qkv.weight"].abs().max() > 0  # attention really was in the gradient


@pytest.mark.parametrize("fused", [True, False])
def test_sampling_with_the_kv_cache_on_cuda(fused, tf32_flags):
    """Greedy, in float32 (as --sample runs): the cache gives the characters of recomputing the context while the text
    fits in block_size, and past it every step is the argmax of a plain forward pass over the window KVCache's
    docstring names (rebuilt from the newest block_size // 2 characters). Logits agree to 1e-4 (TF32 off); the model's
    large weights make every argmax clear, so the characters are the CPU's too."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    on_cpu = confident_model(fused)
    model = confident_model(fused).to(DEVICE)
    prompt, n = torch.tensor([[1, 4, 2]]), 3 * BS
    out, calls = generate_recorded(model, prompt.to(DEVICE), n, use_cache=True, temperature=0)
    uncached, _ = generate_recorded(model, prompt.to(DEVICE), n, use_cache=False, temperature=0)
    fits = 3 + BS - 3 + 1  # the prompt and the characters predicted from at most block_size characters
    assert out.device.type == DEVICE and torch.equal(out[:, :fits], uncached[:, :fits])
    sizes = rule_windows(3, n, BS)
    rebuilds = [i == 0 or sizes[i] != sizes[i - 1] + 1 for i in range(n)]
    assert [t for t, _, _ in calls] == [w if r else 1 for w, r in zip(sizes, rebuilds, strict=True)]
    assert sum(rebuilds) >= 3  # past block_size, more than once
    for i, (w, (_, _, logits)) in enumerate(zip(sizes, calls, strict=True)):
        expected = plain_last_logits(model, out[:, 3 + i - w : 3 + i])
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(out[:, 3 + i], expected.argmax(-1))
    cpu_out, _ = generate_recorded(on_cpu, prompt, n, use_cache=True, temperature=0)
    assert torch.equal(out.cpu(), cpu_out)


# ---- torch.compile's fallback, Ctrl-C and resume ------------------------------------------------------------------


def test_a_compile_backend_that_fails_on_cuda_leaves_the_run_eager(corpus, tmp_path, monkeypatch, capsys):
    calls = []

    def failing_backend(graph_module, example_inputs):
        calls.append(graph_module)
        raise RuntimeError("no kernels for this card\n(a long traceback follows)")

    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile(model, backend=failing_backend))
    torch._dynamo.reset()
    try:
        argv = [*CUDA_TINY, f"--data={corpus}", "--max_iters=6", "--eval_interval=3", "--compile=true"]
        status = gpt.main([*argv, f"--out_dir={tmp_path}"])
    finally:
        torch._dynamo.reset()
    out, err = capsys.readouterr()
    assert status == 0, out + err
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(calls) >= 1 and len(warnings) == 1, warnings  # the compiler was reached, and failed
    assert warnings[0].startswith("warning: torch.compile failed (")
    assert warnings[0].endswith("); training without it")
    assert "| compile off |" in header(out) and "Traceback" not in out + err
    assert [r["step"] for r in rows(tmp_path)] == [0, 3, 6]
    assert all(math.isfinite(r["val_loss"]) for r in rows(tmp_path))


def test_ctrl_c_on_cuda_then_resume_goes_on_as_the_unbroken_run(corpus, tmp_path, monkeypatch, capsys):
    """With dropout on, so that the CUDA random state must come back too, in float32 without TF32 so that two runs can
    be held close. CUDA is not bit-exact (some backward kernels add with atomics, in whatever order the threads come:
    about 1e-6 apart in float32), so the resumed run's losses are held to the unbroken run's within 5e-4, not to the
    last bit as on the CPU: below what a resume that lost AdamW's moments (3e-3 here by step 20, measured on a CPU) or
    drew other batches (3e-2) gives."""
    args = [*CUDA_TINY, f"--data={corpus}", "--max_iters=30", "--dropout=0.2", "--dtype=float32"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert gpt.main([*args, f"--out_dir={whole}"]) == 0
    with monkeypatch.context() as m:
        interrupt_during_step(m, 15)
        assert gpt.main([*args, f"--out_dir={cut}"]) == 130
    out = capsys.readouterr().out
    assert f"interrupted at step 15: saved {cut / 'last.pt'}; continue with --resume" in out.splitlines()
    last = gpt.load_checkpoint(cut / "last.pt")
    assert last["step"] == 15 and last["rng"]["device"] == "cuda" and "cuda" in last["rng"]
    assert gpt.main([*args, f"--out_dir={cut}", "--resume"]) == 0
    assert "warning:" not in capsys.readouterr().out  # the batches replay: the generator's state is a CUDA one here
    assert not (cut / "last.pt").exists()
    expected, resumed = rows(whole), rows(cut)
    assert [r["step"] for r in resumed] == [r["step"] for r in expected] == [0, 10, 20, 30]
    for a, b in zip(resumed, expected, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=5e-4), (a, b)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=5e-4), (a, b)


@pytest.fixture(scope="module")
def cuda_tiny(corpus, tmp_path_factory):
    """out_dir of a tiny run trained on CUDA in auto precision."""
    return trained_once(
        tmp_path_factory, "cuda_tiny", [*CUDA_TINY, f"--data={corpus}", "--max_iters=10", "--eval_interval=5"]
    )


def test_a_cuda_checkpoint_samples_and_resumes_on_the_cpu(cuda_tiny, corpus, tmp_path, capsys, tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out_dir = tmp_path / "out"
    shutil.copytree(cuda_tiny, out_dir)
    # the text is the same on both (the logits agree to ~1e-6, and the draws come from the CPU's generator alike)
    knobs = ["--sample", f"--out_dir={out_dir}", "--max_new_tokens=30"]
    capsys.readouterr()
    assert gpt.main([*knobs, "--device=cpu"]) == 0
    on_cpu = capsys.readouterr().out
    assert gpt.main([*knobs, f"--device={DEVICE}"]) == 0
    assert capsys.readouterr().out == on_cpu and len(on_cpu) == len("\n") + 30 + len("\n")
    # and training goes on on the CPU, the batches drawn afresh (a CUDA generator's state cannot be a CPU one's)
    assert gpt.main([*TINY, f"--data={corpus}", f"--out_dir={out_dir}", "--resume", "--max_iters=15"]) == 0
    out, err = capsys.readouterr()
    warning = (
        "warning: the checkpoint was saved on cuda and resumes on cpu: the batches are drawn afresh and will not "
        "replay exactly those of an unbroken run"
    )
    assert [line for line in out.splitlines() if line.startswith("warning:")] == [warning]
    assert "| device cpu |" in header(out) and "Traceback" not in out + err
    assert [r["step"] for r in rows(out_dir)] == [0, 5, 10, 15]
    assert all(math.isfinite(r["val_loss"]) for r in rows(out_dir))


def test_a_cpu_checkpoint_resumes_on_cuda_in_float16_with_fused_adamw(corpus, tmp_path, monkeypatch, capsys):
    """The case of a T4 (auto: float16): a run started on a laptop goes on with this run's fused AdamW, the scaler
    handing it the overflow flag, and the batches drawn afresh on the card."""
    args = [*TINY, f"--data={corpus}", "--max_iters=12", f"--out_dir={tmp_path}"]
    with monkeypatch.context() as m:
        interrupt_during_step(m, 6)
        assert gpt.main(args) == 130
    assert not gpt.load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"][0]["fused"]
    seen = optimizer_of_each_step(monkeypatch)
    capsys.readouterr()
    on_cuda = [*CUDA_TINY, f"--data={corpus}", "--max_iters=12", f"--out_dir={tmp_path}", "--dtype=float16"]
    assert gpt.main([*on_cuda, "--resume"]) == 0
    out, err = capsys.readouterr()
    assert len(seen) == 6 and all(group["fused"] for groups in seen for group in groups)
    assert header(out).endswith(" | float16 | compile off | 1 process(es)") and "| device cuda" in header(out)
    warning = "warning: the checkpoint was saved on cpu and resumes on cuda: the batches are drawn afresh"
    assert [line for line in out.splitlines() if line.startswith("warning:")][0].startswith(warning)
    assert "Traceback" not in out + err
    assert [r["step"] for r in rows(tmp_path)] == [0, 10, 12]
    assert all(math.isfinite(r["val_loss"]) for r in rows(tmp_path))
    ckpt = gpt.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] in (10, 12) and ckpt["optimizer"]["param_groups"][0]["fused"]
    assert ckpt["scaler"]["scale"] > 0  # float16's loss scale, saved for the next resume


# ---- bench.py and look.py on CUDA ----------------------------------------------------------------------------------


def test_bench_measures_the_card(corpus, tmp_path):
    out = tmp_path / "bench.json"
    args = [f"--data={corpus}", "--compile=false", "--steps=10", "--eval_iters=2", "--max_new_tokens=50"]
    r = run_script("bench.py", *args, f"--json={out}", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    assert result["device"] == DEVICE and result["device_name"] == torch.cuda.get_device_name()
    assert result["torch"] == torch.__version__ and result["compile"] is False
    assert result["dtype"] == str(auto_dtype()).removeprefix("torch.")
    ms, tokens = result["train_ms_per_iter"], result["tokens_per_iter"]
    assert tokens == 64 * 256 and ms > 0
    assert result["train_tokens_per_s"] == pytest.approx(tokens / (ms / 1000))
    cfg = gpt.Config()
    flops = gpt.flops_per_token(gpt.GPT(65, cfg), cfg) * tokens
    peak = gpt.peak_flops(torch.device(DEVICE), auto_dtype())
    if peak is None:  # a card gpt.PEAK_TFLOPS does not know: no MFU rather than a wrong one
        assert result["mfu"] is None
    else:
        assert 0 < result["mfu"] < 1
        assert result["mfu"] == pytest.approx(flops / (ms / 1000) / peak)
    # peak memory: at least the float32 weights, their gradients and AdamW's two moments (16 bytes a weight), and less
    # than the card has
    assert result["peak_mem_kind"] == "torch.cuda.max_memory_allocated"
    card_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
    assert 16 * result["params"] / 2**20 < result["peak_mem_mb"] < card_mb
    for key in ("eval_ms_per_batch", "sample_tokens_per_s_cached", "sample_tokens_per_s_uncached"):
        assert result[key] > 0, key


def test_look_on_cuda_writes_the_text_that_sample_writes(cuda_tiny, tmp_path, capsys):
    html = tmp_path / "look.html"
    knobs = [f"--out_dir={cuda_tiny}", f"--device={DEVICE}", *KNOBS]
    assert gpt.main(["--sample", *knobs]) == 0
    sample = capsys.readouterr().out
    assert look.main([*knobs, f"--html={html}"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(sample) and len(sample) == len("ROMEO:\nWhat, ho!") + 40 + len("\n")
    page = look.read_page(html.read_text())
    assert page["text"] + "\n" == sample and page["written"] == 40


# ---- two GPUs: NCCL under torchrun --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nccl_runs(corpus, tmp_path_factory):
    """torchrun with two processes on two GPUs: 6 steps of batch 4 each ("two"), a mistake ("bad"), and a long run
    stopped by SIGINT to torchrun once it has printed step 0 ("sig"); and one process with batch 8 ("one")."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"needs two CUDA GPUs for NCCL between two processes; this machine has {gpus}")
    root = tmp_path_factory.mktemp("nccl")
    common = [*(a for a in SETTINGS if not a.startswith("--device")), f"--device={DEVICE}", f"--data={corpus}"]
    long_run = [*common, "--batch_size=4", "--max_iters=100000", "--eval_interval=100000"]
    runs = {
        "two": Run(root / "two", [*common, "--batch_size=4", "--max_iters=6"], world_size=2),
        "bad": Run(root / "bad", [*common, "--n_head=5"], world_size=2),
        "sig": Run(root / "sig", long_run, world_size=2),
    }
    deadline = time.monotonic() + 240
    launchers = {name: run.torchrun() for name, run in runs.items()}
    try:
        one = run_script("gpt.py", *common, "--batch_size=8", "--max_iters=6", f"--out_dir={root / 'one'}")
        runs["one"] = {"result": one, "out_dir": root / "one"}
        interrupt_when_training(runs["sig"], lambda: launchers["sig"].send_signal(signal.SIGINT), deadline)
        for name, launcher in launchers.items():
            launcher.wait(timeout=max(1, deadline - time.monotonic()))
            runs[name].returncodes = [launcher.returncode]
    finally:
        for launcher in launchers.values():
            if launcher.poll() is None:
                launcher.kill()
    return runs


def test_two_gpus_over_nccl_train_as_one_process_with_their_whole_batch(nccl_runs):
    """Two processes of batch 4 and one of batch 8 take the same steps: the losses agree to 1e-3 (float32 without TF32;
    NCCL's sums and CUDA's kernels round differently from one process's), and so do the weights."""
    two, one = nccl_runs["two"], nccl_runs["one"]["result"]
    assert two.returncodes == [0], two.stdout() + two.stderr()
    assert one.returncode == 0, one.stdout + one.stderr
    assert progress_steps(two) == ["step 0/6", "step 3/6", "step 6/6"]
    assert header(two.stdout()).endswith("| 2 process(es)") and "| device cuda:0" in header(two.stdout())
    found, expected = metrics(two), rows(nccl_runs["one"]["out_dir"])
    assert [r["step"] for r in found] == [r["step"] for r in expected] == [0, 3, 6]
    for a, b in zip(found, expected, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-3)
    w2, w1 = (gpt.load_checkpoint(d / "ckpt.pt")["model"] for d in (two.out_dir, nccl_runs["one"]["out_dir"]))
    assert max((w2[k] - w1[k]).abs().max().item() for k in w1) < 1e-4


def test_a_mistake_under_torchrun_on_gpus_is_one_error_line(nccl_runs):
    bad = nccl_runs["bad"]
    assert bad.returncodes != [0]
    errors = [line for line in bad.stderr().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: --n_embd (32) must be divisible by --n_head (5)")


def test_ctrl_c_to_torchrun_on_gpus_saves_once(nccl_runs):
    sig = nccl_runs["sig"]
    assert sig.signalled, sig.stdout() + sig.stderr()
    stopped = INTERRUPTED.findall(sig.stdout())
    assert len(stopped) == 1, sig.stdout() + sig.stderr()
    assert gpt.load_checkpoint(sig.out_dir / "last.pt")["step"] == int(stopped[0][0])
    assert sorted(p.name for p in sig.out_dir.iterdir()) == ["ckpt.pt", "last.pt", "metrics.jsonl"]
    assert "forcefully" not in sig.stderr()  # torchrun had no worker to kill: both stopped within its grace period
