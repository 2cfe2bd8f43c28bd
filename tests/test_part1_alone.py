"""Part 1 on its own: gpt.train(cfg) with no machine given trains on the plain Machine, as the lecture's script does:
it reads the text, prints the losses at each evaluation, writes no file, returns the model."""

import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import snapshot

import gpt

pytestmark = pytest.mark.usefixtures("one_thread")

# a tiny model that learns something in 40 steps; device and out_dir as a user leaves them: the plain machine reads
# neither (it trains on the CPU and writes nothing)
SMALL = replace(gpt.Config(), n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, dropout=0.1)
SMALL = replace(SMALL, max_iters=40, eval_interval=20, eval_iters=4, learning_rate=1e-2, warmup_iters=5)
SMALL = replace(SMALL, max_new_tokens=20, eval_sample=16)
LOSS_LINE = re.compile(r"step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})")


@pytest.fixture
def text_file(corpus, tmp_path):
    """The first 20,000 characters of tiny Shakespeare, with a character beyond ASCII, in a folder of its own."""
    path = tmp_path / "data" / "text.txt"
    path.parent.mkdir()
    path.write_text(corpus.read_text()[:20_000] + "\nthé end\n", encoding="utf-8")
    return path


def plain_run(cfg, capsys):
    """gpt.train(cfg), no machine given: what it printed, and what it returned."""
    model = gpt.train(cfg)
    return capsys.readouterr().out, model


def test_train_with_no_machine_prints_the_losses_writes_nothing_and_returns_the_model(
    text_file, tmp_path, monkeypatch, capsys
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # where out_dir ("out") would go
    before = snapshot(tmp_path)
    cfg = replace(SMALL, data=str(text_file))
    out, model = plain_run(cfg, capsys)

    assert snapshot(tmp_path) == before  # no out/, no checkpoint, no metrics.jsonl, nothing beside the text
    assert isinstance(model, gpt.GPT) and model.training
    assert model.lm_head.out_features == len(set(text_file.read_text(encoding="utf-8")))  # the text's vocabulary
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # the lecture's line at each evaluation, and nothing else but the sample at the end: the prompt, then 20 characters
    lines = out.split("\n")
    found = [LOSS_LINE.fullmatch(line) for line in lines[:3]]
    assert all(found), out
    assert [int(m[1]) for m in found] == [0, 20, 40]
    sample = "\n".join(lines[3:])
    assert sample.startswith(cfg.prompt) and len(sample) == len(cfg.prompt) + cfg.max_new_tokens + 1
    assert sample.endswith("\n")
    # it learned: the first val loss is about ln(vocabulary), the last well below it
    val = [float(m[3]) for m in found]
    assert val[0] > 3.5 and val[-1] < val[0] - 0.5  # here about 4.07 -> 3.26


def lecture_batch(data, cfg):
    """The lecture's get_batch: batch_size random windows, from torch's own generator."""
    ix = torch.randint(len(data) - cfg.block_size, (cfg.batch_size,))
    x = torch.stack([data[i : i + cfg.block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + cfg.block_size + 1] for i in ix])
    return x, y


@torch.no_grad()
def lecture_estimate_loss(model, splits, cfg):
    out = {}
    model.eval()
    for split, data in splits.items():
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            losses[k] = model(*lecture_batch(data, cfg))[1]
        out[split] = losses.mean().item()
    model.train()
    return out


def test_plain_train_is_the_lecture_loop_written_out(text_file, capsys):
    """gpt.train(cfg) on the plain machine does what the lecture's loop does, written out here by hand with only
    the model, the optimizer and the schedule taken from gpt.py: the same weights to the last bit, the same losses
    printed, the same sample. So the plain hooks add nothing: float32, no autocast, torch's own random numbers, no
    seed of their own, no extra step or evaluation."""
    cfg = replace(SMALL, data=str(text_file))
    out, model = plain_run(cfg, capsys)

    text = text_file.read_text(encoding="utf-8")
    tokenizer = gpt.CharTokenizer.from_text(text)
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}
    torch.manual_seed(cfg.seed)
    expected = gpt.GPT(tokenizer.vocab_size, cfg)
    optimizer = gpt.make_optimizer(expected, cfg, "cpu")
    lines = []
    for step in range(cfg.max_iters + 1):
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            losses = lecture_estimate_loss(expected, splits, cfg)
            lines.append(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if step == cfg.max_iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = gpt.get_lr(step, cfg)
        _, loss = expected(*lecture_batch(splits["train"], cfg))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(expected.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    gpt.print_sample(expected, tokenizer, cfg.prompt, cfg)
    assert out == "\n".join(lines) + "\n" + capsys.readouterr().out
    for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(got, want), name


def test_plain_train_is_deterministic(text_file, capsys):
    cfg = replace(SMALL, data=str(text_file), max_iters=20, eval_interval=10)
    first_out, first = plain_run(cfg, capsys)
    torch.manual_seed(0)  # whatever came before: the run seeds itself from cfg.seed
    torch.randn(100)
    second_out, second = plain_run(cfg, capsys)
    assert first_out == second_out
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    third_out, _ = plain_run(replace(cfg, seed=cfg.seed + 1), capsys)
    assert third_out != first_out  # the seed is what fixes it


def test_the_plain_machines_hooks_are_the_plain_ones(text_file):
    machine = gpt.Machine()
    assert (machine.rank, machine.world_size, machine.device) == (0, 1, torch.device("cpu"))
    assert (machine.start_step, machine.evaluated_step, machine.batches) == (0, -1, None)
    assert not machine.scaler.is_enabled()
    with machine.forward(last=False) as context:
        assert context is None and not torch.is_autocast_enabled("cpu")
    assert machine.evaluate(7, lambda: {"train": 1.5, "val": 2.5}) == {"train": 1.5, "val": 2.5}
    assert machine.stop_requested() is False
    assert machine.watch(3, torch.tensor(float("nan"))) is None  # a plain loop does not look
    model = torch.nn.Linear(2, 2)
    cfg = replace(SMALL, prompt="ROMEO:")
    assert machine.prepare(model, None, None, None, cfg) is model
    assert machine.prompt == "ROMEO:"
    assert machine.best_model() is model and machine.finish() is model and machine.interrupted(5) is model
    # the text, read whole: its vocabulary, the sorted set of its characters, and the text as integers
    tokenizer, data = machine.read_text(str(text_file))
    text = text_file.read_text(encoding="utf-8")
    assert tokenizer.chars == "".join(sorted(set(text))) and "é" in tokenizer.chars
    assert data.dtype == torch.long and data.tolist() == tokenizer.encode(text)
    # Part 2's reader, in chunks (here a small one), gives the same vocabulary and integers
    chars, ids = gpt.read_corpus(str(text_file), chunk_size=1000)
    run_tokenizer, run_data = gpt.Run.read_text(SimpleNamespace(vocab=None), str(text_file))
    assert run_tokenizer.chars == chars == tokenizer.chars and run_data.tolist() == ids.tolist() == data.tolist()


def test_the_plain_read_downloads_tiny_shakespeare_the_first_time(text_file, tmp_path, monkeypatch, capsys):
    target = tmp_path / "input.txt"
    monkeypatch.setattr(gpt, "DEFAULT_DATA", target)
    monkeypatch.setattr(gpt, "download", lambda path: path.write_bytes(text_file.read_bytes()))
    tokenizer, data = gpt.Machine().read_text("")
    assert capsys.readouterr().out == f"downloading tiny Shakespeare to {target}\n"
    assert tokenizer.decode(data.tolist()) == text_file.read_text(encoding="utf-8")
    gpt.Machine().read_text("")  # there now: read, not fetched again
    assert capsys.readouterr().out == ""


def test_build_with_no_machine_gives_the_lessons_pieces(text_file):
    cfg = replace(SMALL, data=str(text_file))
    tokenizer, splits, model, optimizer = gpt.build(cfg)
    n = len(text_file.read_text(encoding="utf-8"))
    assert (len(splits["train"]), len(splits["val"])) == (int(0.9 * n), n - int(0.9 * n))
    assert isinstance(model, gpt.GPT) and model.token_embedding_table.num_embeddings == tokenizer.vocab_size
    assert optimizer.param_groups[0]["params"][0] is next(model.parameters())
