"""bench.py: on a tiny model it prints its table and writes the same figures as JSON; bad
input gets one line and exit status 1."""

import importlib.util
import json
import sys
import time

import pytest
import torch
from conftest import ROOT, SERIAL_ENV, TINY, run_script

import gpt

POSITIVE = [
    "train_ms_per_iter",
    "train_tokens_per_s",
    "peak_mem_mb",
    "eval_ms_per_batch",
    "sample_tokens_per_s_cached",
    "sample_tokens_per_s_uncached",
]


def load_bench():
    """bench.py as a module, found by its path (it is a script beside gpt.py, not an installed module)."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # as an imported module is: inspect reads its source (--help) through it
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_the_figures(corpus, tmp_path):
    out = tmp_path / "bench.json"
    r = run_script("bench.py", *TINY, f"--data={corpus}", "--steps=2", f"--json={out}", env=SERIAL_ENV)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())

    assert result["device"] == "cpu" and result["torch"] == torch.__version__ and result["dtype"] == "float32"
    assert result["compile"] is False  # the rule of gpt.train: off on CPU
    assert result["mfu"] is None  # no known peak for a CPU
    for key in POSITIVE:
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["steps"] == 2
    assert result["tokens_per_iter"] == 8 * 16  # TINY: batch 8, block 16
    assert result["train_tokens_per_s"] == pytest.approx(128 / (result["train_ms_per_iter"] / 1000))
    assert result["sample_new_tokens"] == 20  # TINY's --max_new_tokens
    speedup = result["sample_tokens_per_s_cached"] / result["sample_tokens_per_s_uncached"]
    assert result["sample_cache_speedup"] == pytest.approx(speedup)
    # TINY evaluates 2 x 2 batches at steps 0, 10 and 20 of 20
    eval_s, line_s = 3 * 2 * 2 * result["eval_ms_per_batch"], 3 * result["eval_sample_ms"]  # and 3 lines of text
    run_s = 20 * result["train_ms_per_iter"] + eval_s + line_s
    assert result["eval_share_of_run"] == pytest.approx(eval_s / run_s)
    assert result["eval_sample_ms"] > 0 and result["eval_sample_share_of_run"] == pytest.approx(line_s / run_s)
    cfg = gpt.Config(**result["config"])
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.data) == (2, 32, 16, str(corpus))
    assert result["params"] == sum(p.numel() for p in gpt.GPT(65, cfg).parameters())

    # the table shows the same figures
    assert f"{result['train_ms_per_iter']:.1f} ms/iter" in r.stdout
    assert f"{result['sample_tokens_per_s_cached']:,.1f} tokens/s with the KV cache" in r.stdout
    assert "mfu n/a" in r.stdout and "max RSS" in r.stdout


def test_training_steps_are_timed_together_without_waiting_between_them(corpus, monkeypatch, one_thread):
    """A step only launches work that a GPU runs later; waiting for it after every step, as a clock per step must,
    would time something the training loop never does. bench.py times its steps in one window: it waits for the
    device twice, before and after, whatever the number of steps."""
    bench = load_bench()
    waits = []
    monkeypatch.setattr(gpt, "synchronize", lambda device: waits.append(device))
    with gpt.Run({}, defaults=bench.parse_args([*TINY, f"--data={corpus}"]), files=False) as run:
        gpt.build(run.cfg, run)
        waits.clear()  # those of the setup
        result = bench.training(run, steps=7)
    assert len(waits) == 2 and result["steps"] == 7 and result["train_ms_per_iter"] > 0


def test_a_bad_flag_is_one_line_and_exit_1():
    r = run_script("bench.py", "--stepz=3", env=SERIAL_ENV)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith("error: unrecognized arguments: --stepz=3. Valid names: data block_size ")
    assert r.stderr.endswith(" num_samples steps json text_mb\n")  # gpt.py's names, then bench.py's own
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps=0"], "--steps must be at least 1, got 0"),
        (["--steps", "-2"], "--steps must be at least 1, got -2"),
        (["--json="], "--json= is not a file name; name a file to write"),
        (["--json={tmp}"], "--json={tmp} is not a file name; name a file to write"),
        (["--json={tmp}/no/b.json"], "--json={tmp}/no/b.json: the folder {tmp}/no does not exist"),
        (["--n_head=5"], "--n_embd (384) must be divisible by --n_head (5): each head gets n_embd // n_head channels"),
        (["--dtype=float64"], "--dtype must be auto, float32, bfloat16 or float16, got 'float64'"),
    ],
)
def test_bad_input_is_refused_before_any_work(args, message, tmp_path, capsys):
    bench = load_bench()
    args = [a.format(tmp=tmp_path) for a in args]
    assert bench.main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {message.format(tmp=tmp_path)}\n"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_its_own_flags_go_through_gpt_pys_parser(capsys):
    bench = load_bench()
    assert bench.main(["--steps=2.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: argument --steps: invalid int value: '2.5'. Valid names: data ")
    cfg = bench.parse_args(["--steps", "3", "--json=b.json", "--n_layer=2"])  # --name value works for them too
    assert (cfg.steps, cfg.json, cfg.n_layer) == (3, "b.json", 2)


def test_the_figures_against_counts_and_clocks_of_their_own(corpus, monkeypatch, one_thread):
    """Each forward pass given targets (a training or an evaluation batch) made to take 100 ms more, so that a batch's
    time is known here: the mean step is over the N steps asked for (train_step counted), an evaluation batch takes
    what a forward pass timed here takes, MFU is the FLOPs counted by hand over that time, and the sampling without
    the cache feeds the whole context (up to block_size) at every character."""
    delay, steps = 0.1, 3
    fed, forward = [], gpt.GPT.forward

    def slow_forward(self, idx, targets=None, cache=None):
        fed.append((idx.shape[1], targets is not None))
        if targets is not None:
            time.sleep(delay)
        return forward(self, idx, targets, cache)

    calls, train_step = [], gpt.train_step
    monkeypatch.setattr(gpt.GPT, "forward", slow_forward)
    monkeypatch.setattr(gpt, "train_step", lambda *args: calls.append(1) or train_step(*args))
    monkeypatch.setattr(gpt, "peak_flops", lambda device, dtype: 1e9)  # a card of 1 GFLOP/s
    bench = load_bench()
    result = bench.bench(bench.parse_args([*TINY, f"--data={corpus}", f"--steps={steps}", "--eval_sample=0"]))

    assert len(calls) == result["warmup_steps"] + steps and result["steps"] == steps
    assert delay <= result["train_ms_per_iter"] / 1000 < 2.5 * delay  # one step's time: not N's, nor an Nth of one
    assert result["mfu"] == pytest.approx(174_918 * 8 * 16 / (result["train_ms_per_iter"] / 1000) / 1e9)  # TINY's

    model = gpt.GPT(65, gpt.Config(**result["config"])).eval()
    x = torch.zeros((8, 16), dtype=torch.long)
    direct = []
    for _ in range(3):
        t = time.perf_counter()
        with torch.no_grad():
            model(x, x)
        direct.append(time.perf_counter() - t)
    assert 0.6 < result["eval_ms_per_batch"] / 1000 / min(direct) < 1.7  # a batch's time: 2x off is out
    assert sum(with_targets for _, with_targets in fed) == len(calls) + 2 + 2 * steps + 3  # 2 + 2N evaluation batches

    sampled = [T for T, with_targets in fed if not with_targets]
    n = result["sample_new_tokens"]
    assert sampled[-n:] == [min(1 + i, 16) for i in range(n)]  # without the cache: the prompt and all so far, cropped
    assert sum(sampled[-2 * n : -n]) < n + 16  # with it: one character a pass, the window when it is rebuilt
