"""How fast is gpt.py on this machine? Training steps, MFU, memory, evaluation and sampling, measured.

    python bench.py                                   the default model on the best device here
    python bench.py --recipe=cpu                      the CPU recipe's model
    python bench.py --device=cpu --batch_size=8 --steps=3 --json=bench.json
    python bench.py --text_mb=1,100,1000              what the size of the text costs before training

It takes gpt.py's hyperparameters by the same names (--name=value), plus three of its own: --steps=N, the number of
timed training steps (default: 50 on CUDA, 5 elsewhere, after a few untimed warm-up steps); --json=PATH, to write
the figures as one JSON object; and --text_mb=SIZES, which measures instead a 1-step run of a tiny model on tiny
Shakespeare (or --data) repeated to each size in MB. The run is built by gpt.Run and gpt.build, as `python gpt.py` does
(precision, fused optimizer, torch.compile, tried once at setup). Its weights are random, which does not change the
speed; its vocabulary is that of the training text, since sampling needs one. Sampling writes --max_new_tokens
characters (500) after --prompt (a newline), with the KV cache and without.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import gpt
from gpt import UserError


@dataclass
class BenchConfig(gpt.Config):
    steps: int | None = None  # timed training steps; unset: 50 on CUDA, 5 elsewhere
    json: str | None = None  # write the figures to this file as one JSON object
    text_mb: str | None = None  # instead: what a text's size costs before training, e.g. 1,100,1000 (MB)


def parse_args(argv):
    """gpt.py's settings and bench.py's own, through gpt.py's parser."""
    overrides = gpt.parse_overrides(argv, BenchConfig())
    cfg = replace(BenchConfig(**asdict(gpt.starting_point(overrides))), **overrides)  # --recipe=cpu: the recipe's size
    if cfg.steps is not None and cfg.steps < 1:
        raise UserError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.json is not None and (not cfg.json or Path(cfg.json).is_dir()):
        raise UserError(f"--json={cfg.json} is not a file name; name a file to write")
    if cfg.json is not None and not Path(cfg.json).parent.is_dir():
        raise UserError(f"--json={cfg.json}: the folder {Path(cfg.json).parent} does not exist")
    try:
        sizes = [float(mb) for mb in cfg.text_mb.split(",")] if cfg.text_mb is not None else []
    except ValueError:
        sizes = [0]
    if not all(mb > 0 for mb in sizes):
        raise UserError(f"--text_mb={cfg.text_mb} is not a list of sizes in MB; give some, as in --text_mb=1,100,1000")
    gpt.check_config(cfg)
    return cfg


def timed(device, fn):
    """Seconds that fn() takes on the device."""
    gpt.synchronize(device)
    t = time.perf_counter()
    fn()
    gpt.synchronize(device)
    return time.perf_counter() - t


def peak_memory(device):
    """Peak memory in MB, and what was measured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    import resource  # Unix only

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return max_rss / (2**20 if sys.platform == "darwin" else 2**10), "max RSS of the whole process"


def bench(cfg):
    """Every figure, as one dict: the run is built as python gpt.py builds it (gpt.build), with random weights."""
    with gpt.Run({}, defaults=cfg, files=False) as run:
        gpt.build(run.cfg, run)
        device = run.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "dtype": str(run.dtype).removeprefix("torch."),
            "compile": run.compiled,
            "params": sum(p.numel() for p in run.raw_model.parameters()),
            "config": asdict(gpt.Config(**{k: v for k, v in asdict(cfg).items() if k in gpt.Config.__annotations__})),
            "weights": "random",
        }
        result |= training(run, cfg.steps or (50 if device.type == "cuda" else 5))
        result |= evaluation(run, result["steps"], result["train_ms_per_iter"])
        result["peak_mem_mb"], result["peak_mem_kind"] = peak_memory(device)
        return result | sampling(run)


def training(run, steps):
    """Training steps as the loop runs them, a batch then a step, after an untimed warm-up (cuBLAS heuristics, the
    caching allocator): all of them in one timed window, with no synchronisation between steps, as in training."""
    cfg, warmup = run.cfg, 5 if run.device.type == "cuda" else 1
    tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.block_size

    def step():
        gpt.train_step(run.model, run.optimizer, run.splits["train"], cfg.learning_rate, cfg, run)

    for _ in range(warmup):
        step()
    ms = 1000 * timed(run.device, lambda: [step() for _ in range(steps)]) / steps
    peak, flops = gpt.peak_flops(run.device, run.dtype), gpt.flops_per_token(run.raw_model, cfg)
    mfu = flops * tokens_per_iter / (ms / 1000) / peak if peak and flops else None
    return {
        "warmup_steps": warmup,
        "steps": steps,
        "tokens_per_iter": tokens_per_iter,
        "train_ms_per_iter": ms,
        "train_tokens_per_s": tokens_per_iter / (ms / 1000),
        "mfu": mfu,
    }


def evaluation(run, steps, train_ms):
    """Evaluation as gpt.train runs it (eval_iters batches of each split, without gradients, under autocast; then the
    line of text, eval_sample characters), and the shares of a whole run with these settings that each takes."""
    cfg, splits = run.cfg, run.splits
    gpt.estimate_loss(run.model, splits, replace(cfg, eval_iters=1), run)  # warm-up
    timed_cfg = replace(cfg, eval_iters=steps)  # 2 * steps batches
    eval_s = timed(run.device, lambda: gpt.estimate_loss(run.model, splits, timed_cfg, run))
    eval_ms = 1000 * eval_s / (2 * steps)
    line_s = [timed(run.device, lambda: gpt.sample_line(run)) for _ in range(2)][1] if cfg.eval_sample else 0.0
    evals = gpt.count_evaluations(cfg)
    eval_run_s, line_run_s = evals * 2 * cfg.eval_iters * eval_ms / 1000, evals * line_s  # a whole run's
    run_s = cfg.max_iters * train_ms / 1000 + eval_run_s + line_run_s
    return {
        "eval_ms_per_batch": eval_ms,
        "eval_batches_timed": 2 * steps,
        "eval_share_of_run": eval_run_s / run_s,
        "eval_sample_ms": 1000 * line_s,
        "eval_sample_share_of_run": line_run_s / run_s,
    }


def sampling(run):
    """max_new_tokens characters after the prompt, with the KV cache and without: the uncompiled model in
    float32, as gpt.py samples."""
    cfg, n = run.cfg, run.cfg.max_new_tokens
    prompt = torch.tensor([gpt.encode_prompt(run.tokenizer, cfg.prompt)], dtype=torch.long, device=run.device)

    def sample(n, use_cache):
        torch.manual_seed(cfg.seed)
        gpt.generate(run.raw_model, prompt, n, cfg.temperature, cfg.top_k, use_cache=use_cache)

    for use_cache in (True, False):
        sample(min(n, 10), use_cache)  # warm-up
    cached = n / timed(run.device, lambda: sample(n, True))
    uncached = n / timed(run.device, lambda: sample(n, False))
    return {
        "sample_new_tokens": n,
        "sample_tokens_per_s_cached": cached,
        "sample_tokens_per_s_uncached": uncached,
        "sample_cache_speedup": cached / uncached,
    }


def setup_cost(cfg, repeats=3):
    """What a text's size costs before training: tiny Shakespeare (or --data) repeated to each size, and a 1-step run of
    a tiny model on it in a fresh process (repeats times, the median kept), its wall time and its peak memory."""
    text, rows = gpt.load_text(cfg.data).encode(), []  # downloaded and checked on first use
    tiny = ["--n_layer=1", "--n_head=1", "--n_embd=16", "--block_size=16", "--batch_size=4", "--max_iters=1"]
    tiny += ["--eval_iters=1", "--max_new_tokens=1", f"--device={cfg.device}", f"--dtype={cfg.dtype}"]
    tiny += ["--compile=false"]  # compiling would cost each run far more than its text; not what is measured here
    with tempfile.TemporaryDirectory() as tmp:
        for mb in (float(size) for size in cfg.text_mb.split(",")):
            path, copies = Path(tmp) / "text.txt", max(1, round(mb * 1e6 / len(text)))  # whole copies: whole characters
            with open(path, "wb") as f:
                for _ in range(copies):
                    f.write(text)
            runs = []
            for i in range(repeats):
                command = [sys.executable, gpt.__file__, f"--data={path}", *tiny, f"--out_dir={tmp}/out{i}"]
                t = time.perf_counter()
                proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                _, status, usage = os.wait4(proc.pid, 0)  # the resources of this child alone
                if os.waitstatus_to_exitcode(status) != 0:
                    raise UserError(f"the run on {mb:g} MB failed; try it by hand: {' '.join(command)}")
                runs.append((time.perf_counter() - t, usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)))
            wall, peak = (statistics.median(x) for x in zip(*runs, strict=True))
            rows.append({"text_mb": copies * len(text) / 1e6, "wall_s": wall, "peak_mem_mb": peak})
    return rows


def setup_table(rows):
    """The figures of setup_cost as a Markdown table, each size also against the first."""
    lines = ["| text | wall time, start to end | peak memory | more than the first |", "| --- | --- | --- | --- |"]
    for r in rows:
        more = f"{r['wall_s'] - rows[0]['wall_s']:+.1f} s, {(r['peak_mem_mb'] - rows[0]['peak_mem_mb']) / 1024:+.2f} GB"
        lines.append(f"| {r['text_mb']:,.0f} MB | {r['wall_s']:.1f} s | {r['peak_mem_mb'] / 1024:.2f} GB | {more} |")
    return "\n".join(lines)


def table(r):
    """The figures, as lines a person reads."""
    c = r["config"]
    mfu = f"mfu {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "mfu n/a (no known peak for this device)"
    threads = f", torch threads {r['cpu_threads']}" if r["device"] == "cpu" else ""
    lines = [
        f"device         {r['device']} ({r['device_name']}{threads}) | torch {r['torch']} | {r['dtype']} | "
        f"compile {'on' if r['compile'] else 'off'}",
        f"model          {r['params'] / 1e6:.2f}M parameters: {c['n_layer']} layers x {c['n_head']} heads x "
        f"{c['n_embd']}, block {c['block_size']}; random weights",
        f"batch          {c['batch_size']} x {c['gradient_accumulation_steps']} accumulation = "
        f"{r['tokens_per_iter']:,} tokens per step",
        f"training step  {r['train_ms_per_iter']:.1f} ms/iter ({r['steps']} steps timed together after "
        f"{r['warmup_steps']} warm-up) | "
        f"{r['train_tokens_per_s']:,.0f} tokens/s | {mfu}",
        f"peak memory    {r['peak_mem_mb']:,.0f} MB ({r['peak_mem_kind']})",
        f"evaluation     {r['eval_ms_per_batch']:.1f} ms/batch | {100 * r['eval_share_of_run']:.0f}% of a whole run "
        f"({c['max_iters']} steps, {2 * c['eval_iters']} batches every {c['eval_interval']}) | its line of "
        f"{c['eval_sample']} characters {r['eval_sample_ms']:.0f} ms, {100 * r['eval_sample_share_of_run']:.2f}%",
        f"sampling       {r['sample_new_tokens']} new tokens: {r['sample_tokens_per_s_cached']:,.1f} tokens/s with "
        f"the KV cache, {r['sample_tokens_per_s_uncached']:,.1f} without: {r['sample_cache_speedup']:.1f}x",
    ]
    return "\n".join(lines)


def main(argv=None):
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        result = setup_cost(cfg) if cfg.text_mb else bench(cfg)
        print(setup_table(result) if cfg.text_mb else table(result))
        if cfg.json:
            try:
                Path(cfg.json).write_text(json.dumps(result, indent=2) + "\n")
            except OSError as e:
                raise UserError(f"could not write {cfg.json} ({e.strerror or e})") from None
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
