"""The two commands work on any machine: --help on every script, a dtype that auto picks by timing this model on this
CPU, a note on a long run that times what the run does, sampling that draws on the CPU, and a suite that tells a new
user how to get the corpus."""

import copy
import inspect
import json
import re
from dataclasses import fields, replace

import pytest
import torch
from conftest import ROOT, TINY, find_corpus, run_script
from test_bench import load_bench

import gpt

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- --help -------------------------------------------------------------------------------------------------------


def comments(source):
    """name -> comment of every `name: type = default  # comment` line of a class's source."""
    return dict(re.findall(r"^    (\w+): .+?  # (.+)$", source, flags=re.M))


def help_of(script, flag, capsys):
    """What `python script flag` prints, run in this process: its main() prints the help and exits with 0."""
    mains = {"gpt.py": gpt.main, "bigram.py": __import__("bigram").main, "bench.py": load_bench().main}
    with pytest.raises(SystemExit) as done:
        mains[script]([flag, "--n_layer=ten"])  # --help wins over anything else on the line, even a bad value
    out, err = capsys.readouterr()
    assert done.value.code == 0 and err == "", err
    return re.sub(r"^usage: python \S+", f"usage: python {script}", out)  # from the shell, sys.argv[0] names it


def test_help_from_the_shell_exits_0():
    r = run_script("gpt.py", "--help")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("usage: python gpt.py [--name=value ...]")


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", ["gpt.py", "bigram.py", "bench.py"])
def test_help_prints_every_knob_with_its_default_and_comment(script, flag, capsys):
    out = help_of(script, flag, capsys)
    assert out.startswith(f"usage: python {script} [--name=value ...]")
    bench = script == "bench.py"
    defaults = {"gpt.py": gpt.Config(), "bigram.py": __import__("bigram").DEFAULTS}.get(script)
    source = (ROOT / script).read_text() if bench else ""
    described = comments(inspect.getsource(gpt.Config)) | comments(source)
    names = [f.name for f in fields(gpt.Config)] + (["steps", "json", "text_mb"] if bench else [])
    assert len(re.findall(r"^  --\w+=", out, flags=re.M)) == len(names)
    for name in names:
        default = getattr(defaults or gpt.Config(), name, None)
        shown = f"{default:g}" if type(default) is float else default
        shown = repr(shown) if shown == "" or not str(shown).isprintable() else shown
        assert re.search(rf"^  --{name}={re.escape(str(shown))} +{re.escape(described[name])}$", out, re.M), name
    if script == "bigram.py":  # its own defaults, not gpt.py's
        assert "--block_size=8 " in out and "--learning_rate=0.01 " in out


# ---- auto picks the faster dtype on this CPU ------------------------------------------------------------------------


def test_the_dtype_trial_leaves_training_exactly_as_float32_would_have_it(corpus, tmp_path, monkeypatch, capsys):
    """auto on a CPU with bfloat16 instructions times real training steps of this model in float32 and in bfloat16.
    The trial draws no random number that training uses and leaves no trace in the weights or AdamW's state: where it
    keeps float32, the run is the run of --dtype=float32, bit for bit. (The timings are made to favour float32 here,
    so that the test holds on any CPU.)"""
    args = [*TINY, f"--data={corpus}", "--dropout=0.1"]
    assert gpt.main([*args, f"--out_dir={tmp_path / 'float32'}"]) == 0
    timed, real = [], gpt.seconds_per_step

    def slow_bfloat16(model, optimizer, cfg, run, autocast, steps):
        seconds = real(model, optimizer, cfg, run, autocast, steps)  # real steps, with AdamW, in that dtype
        timed.append(getattr(autocast, "fast_dtype", torch.float32))
        return seconds * (3 if timed[-1] == torch.bfloat16 else 1) + (1.0 if timed[-1] == torch.bfloat16 else 0)

    monkeypatch.setattr(gpt, "cpu_has_bfloat16", lambda: True)
    monkeypatch.setattr(gpt, "seconds_per_step", slow_bfloat16)
    capsys.readouterr()
    assert gpt.main([*[a for a in args if a != "--dtype=float32"], f"--out_dir={tmp_path / 'auto'}"]) == 0
    assert timed == [torch.float32, torch.bfloat16, torch.float32]  # float32 again: the faster of its two counts
    header = next(line for line in capsys.readouterr().out.splitlines() if " parameters | " in line)
    assert re.search(r"\| float32 \(bfloat16 \d+\.\dx slower here\) \|", header), header
    rows = [
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("float32", "auto")
    ]
    assert [(r["train_loss"], r["val_loss"], r["sample"]) for r in rows[0]] == [
        (r["train_loss"], r["val_loss"], r["sample"]) for r in rows[1]
    ]
    ckpts = [gpt.load_checkpoint(tmp_path / d / "ckpt.pt") for d in ("float32", "auto")]
    assert all(torch.equal(ckpts[0]["model"][k], ckpts[1]["model"][k]) for k in ckpts[0]["model"])
    moments = [ckpt["optimizer"]["state"] for ckpt in ckpts]  # AdamW's step and moments, parameter by parameter
    assert moments[0].keys() == moments[1].keys() and len(moments[0]) > 0
    for i in moments[0]:
        assert moments[0][i].keys() == moments[1][i].keys()
        assert all(torch.equal(moments[0][i][k], moments[1][i][k]) for k in moments[0][i])


def test_a_timed_step_leaves_no_trace(corpus):
    """seconds_per_step runs real training steps (the warm-up and the timed ones), then puts back everything they
    changed: the weights, AdamW's moments and step count, the learning rate, torch's random numbers (dropout) and
    the batch generator; no gradient is left. Here AdamW has moments already, as after a resume."""
    args = [*TINY, f"--data={corpus}", "--dropout=0.1", "--grad_clip=1.0"]
    with gpt.Run(gpt.parse_overrides(args), files=False) as run:
        gpt.build(run.cfg, run)
        model, optimizer, cfg = run.raw_model, run.optimizer, run.cfg
        gpt.train_step(model, optimizer, run.splits["train"], 1e-4, cfg, run)
        before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
        rng, batches = torch.get_rng_state(), run.batches.get_state()
        seconds = gpt.seconds_per_step(model, optimizer, cfg, run, torch.autocast("cpu", torch.bfloat16), steps=3)
        after = (model.state_dict(), optimizer.state_dict())
    assert seconds > 0
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1]["param_groups"] == after[1]["param_groups"]  # the lr of 1e-4 too, not the trial's
    for i, state in before[1]["state"].items():
        assert all(torch.equal(state[k], after[1]["state"][i][k]) for k in state)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(run.batches.get_state(), batches)
    assert all(p.grad is None for p in model.parameters())


def test_an_explicit_dtype_is_obeyed_and_not_timed(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpt, "cpu_has_bfloat16", lambda: True)
    monkeypatch.setattr(gpt, "cpu_dtype", lambda seconds: pytest.fail("an explicit --dtype was second-guessed"))
    argv = [*TINY, f"--data={corpus}", "--dtype=bfloat16", "--max_iters=2", f"--out_dir={tmp_path}"]
    assert gpt.main(argv) == 0
    assert "| device cpu | bfloat16 | compile off |" in capsys.readouterr().out


# ---- the note on a long run -----------------------------------------------------------------------------------------


def test_the_first_line_says_what_will_be_trained_before_anything_is_timed(corpus, tmp_path, monkeypatch, capsys):
    """On a CPU a step of the default model takes seconds: the first line comes before the first one is timed (here
    by auto's trial, on a CPU with bfloat16 instructions, which comes before the header)."""
    printed = []

    def timed_step(*args, **kwargs):
        printed.append(capsys.readouterr().out)
        return 0.001

    monkeypatch.setattr(gpt, "cpu_has_bfloat16", lambda: True)
    monkeypatch.setattr(gpt, "seconds_per_step", timed_step)
    argv = [*TINY, f"--data={corpus}", "--max_iters=3", f"--out_dir={tmp_path}"]
    assert gpt.main([a for a in argv if a != "--dtype=float32"]) == 0
    text = corpus.read_text(encoding="utf-8")
    model = gpt.GPT(len(set(text)), replace(gpt.Config(), n_layer=2, n_head=2, n_embd=32, block_size=16))
    size = sum(p.numel() for p in model.parameters())
    first = f"training {size:,} parameters on cpu: 3 steps on {corpus} ({len(text):,} characters)\n"
    assert printed == [first, "", ""]  # float32's trial, bfloat16's, float32's again


@pytest.mark.parametrize("accum", [1, 3])
def test_the_note_counts_every_step_and_every_evaluation_batch(accum, corpus, tmp_path, monkeypatch, capsys):
    """The projected time is the run's steps times a timed training step (every micro-batch's forward and backward,
    and the optimizer) plus its evaluations' batches times a timed evaluation batch, each micro-batch counted."""
    monkeypatch.setattr(gpt, "seconds_per_step", lambda *args: 2.25)  # a whole step
    monkeypatch.setattr(gpt, "seconds_per_batch", lambda *args, **kwargs: 0.1)  # an evaluation batch
    argv = [*TINY, f"--data={corpus}", "--max_iters=3000", "--eval_interval=1000", "--eval_iters=50"]
    argv += [f"--gradient_accumulation_steps={accum}", "--eval_sample=0", "--compile=0", f"--out_dir={tmp_path}"]
    monkeypatch.setattr(gpt, "train_step", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt(2)))
    gpt.main(argv)  # stopped at its first step: the note comes before it
    expected = 3000 * 2.25 + accum * 4 * 2 * 50 * 0.1  # 4 evaluations (0, 1000, 2000, 3000) of 2 x 50 batches
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note:"))
    assert note.startswith(f"note: this run will take about {gpt.format_duration(expected)} on cpu in float32; ")


# ---- sampling draws on the CPU --------------------------------------------------------------------------------------


class Elsewhere(torch.Tensor):
    """A tensor that says it is on another device (meta here, the one every build has), its numbers on the CPU: what
    is computed from it is Elsewhere too, until .cpu() brings it back to a plain CPU tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func == torch.Tensor.device.__get__:
            return torch.device("meta")
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_next_character_is_drawn_on_the_cpu_and_never_one_top_k_forbade(monkeypatch):
    """torch.multinomial on Apple's MPS has drawn characters of probability 0; the draw is made on the CPU, whatever
    the device of the logits, from a CPU generator, and comes back to the logits' device."""
    drawn_from, drawn, multinomial = [], [], torch.multinomial

    def spy(probs, num_samples, generator=None):
        drawn_from.append((type(probs), probs.device.type, None if generator is None else generator.device.type))
        drawn.append(multinomial(probs, num_samples, generator=generator))
        return drawn[-1]

    monkeypatch.setattr(torch, "multinomial", spy)
    logits = torch.randn(4, 65, generator=torch.Generator().manual_seed(0))
    allowed = torch.topk(logits, 3).indices
    for seed in range(50):
        idx = gpt.sample_next(logits, temperature=1.5, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert idx.device == logits.device and idx.shape == (4, 1)
        assert all(i in row for i, row in zip(idx[:, 0].tolist(), allowed.tolist(), strict=True))
    assert set(drawn_from) == {(torch.Tensor, "cpu", "cpu")}
    # logits on another device: drawn from a plain CPU tensor, the draw brought back to the logits' device
    elsewhere = logits.as_subclass(Elsewhere)
    assert elsewhere.device.type == "meta" and (elsewhere / 2).device.type == "meta"  # the stand-in stands
    for seed in range(50):
        idx = gpt.sample_next(elsewhere, temperature=1.5, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert idx.device.type == "meta" and idx.shape == (4, 1)
        assert all(i in row for i, row in zip(drawn[-1][:, 0].tolist(), allowed.tolist(), strict=True))
    assert set(drawn_from) == {(torch.Tensor, "cpu", "cpu")}


# ---- a new user without the corpus ----------------------------------------------------------------------------------


def test_a_missing_corpus_is_explained_with_the_command_that_fetches_it(tmp_path):
    with pytest.raises(pytest.fail.Exception) as failed:
        find_corpus(tmp_path)
    message = str(failed.value)
    assert 'python -c "import gpt; gpt.load_text()"' in message and gpt.DATA_URL in message
    assert str(tmp_path / "input.txt") in message and ".." not in message
