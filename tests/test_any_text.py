"""Any text, any size: the text is read, counted and encoded with numpy a chunk at a time, into the
smallest integer type that holds its vocabulary; tiny Shakespeare reads exactly as before; any UTF-8 text trains; and
--init_from starts a new run from a trained model's weights, shape and vocabulary (fine-tuning)."""

import json
import random
import shutil

import pytest
import torch
from conftest import TINY, built, snapshot, trained_once

import gpt

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def refused(capsys, argv, *watch):
    """main(argv) fails with one line `error: ...` and leaves every folder in `watch` as it was."""
    before = [snapshot(folder) for folder in watch]
    assert gpt.main(argv) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in out + err, out + err
    assert [snapshot(folder) for folder in watch] == before
    return err.removeprefix("error: ").strip()


# ---- reading any text -----------------------------------------------------------------------------------------


def test_tiny_shakespeare_reads_exactly_as_before(corpus):
    """The vocabulary, its order, every id and the split are those of the lesson's CharTokenizer, one byte each."""
    chars, ids = gpt.read_corpus(str(corpus))
    text = gpt.load_text(str(corpus))
    tokenizer = gpt.CharTokenizer.from_text(text)
    assert chars == tokenizer.chars and len(chars) == 65
    assert ids.dtype == torch.uint8 and ids.tolist() == tokenizer.encode(text)
    train, val = gpt.split_data(ids)
    assert (len(train), len(val)) == (1_003_854, 111_540)


MIXED = "Ça va? 中文，日本語。Emoji 🎭 and ASCII.\n" * 50 + "naïve café ﬁn\r\n"


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64, 1 << 22])
def test_chunks_that_cut_a_character_in_two_read_as_the_whole_file(chunk_size, tmp_path):
    """chunk_size characters at a time, from reads of the file that cut characters in two (20 KB: past 16,384 bytes)."""
    path = tmp_path / "mixed.txt"
    path.write_bytes((MIXED * 8).encode("utf-8"))
    chars, ids = gpt.read_corpus(str(path), chunk_size=chunk_size)
    assert chars == "".join(sorted(set(MIXED)))
    assert gpt.CharTokenizer(chars).decode(ids.tolist()) == MIXED * 8


@pytest.mark.parametrize("chunk_size", [1, 4, 1 << 22])
@pytest.mark.parametrize(
    ("content", "byte", "offset"),
    [
        (b"abc" * 10 + b"\xff" + b"def", 0xFF, 30),  # not UTF-8 anywhere
        ("é".encode() * 5 + b"\xc3(", 0xC3, 10),  # a character's first byte, then no second
        ("ab中".encode() + "中".encode()[:2], 0xE4, 5),  # cut short at the end of the file
        (b"a" * 8190 + "中".encode()[:2] + b"(", 0xE4, 8190),  # begun in one read of the file, not ended in the next
    ],
)
def test_a_file_that_is_not_utf8_is_named_with_the_offset_of_its_first_bad_byte(
    content, byte, offset, chunk_size, tmp_path
):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(gpt.UserError) as info:
        gpt.read_corpus(str(path), chunk_size=chunk_size)
    assert (
        str(info.value) == f"{path} is not UTF-8 text (byte {byte:#04x} at offset {offset}); convert it to UTF-8 first"
    )


@pytest.mark.parametrize(("distinct", "dtype"), [(256, torch.uint8), (257, torch.int16), (40_000, torch.int32)])
def test_ids_take_the_smallest_integer_type_that_holds_the_vocabulary(distinct, dtype, tmp_path):
    chars = [chr(0x10000 + i) for i in range(distinct)]  # past the surrogates: every one a character
    text = "".join(chars) + "".join(reversed(chars))
    path = tmp_path / "many.txt"
    path.write_text(text, encoding="utf-8")
    vocab, ids = gpt.read_corpus(str(path))
    assert len(vocab) == distinct and ids.dtype == dtype
    assert ids[:distinct].tolist() == list(range(distinct)) and ids[-1] == 0


def test_the_corpus_stays_small_on_the_device_and_a_batch_becomes_int64(corpus):
    with built([*TINY, f"--data={corpus}"]) as run:
        assert run.splits["train"].dtype == run.splits["val"].dtype == torch.uint8  # 1 byte per character, not 8
        x, y = gpt.get_batch(run.splits["train"], run.cfg, run)
    assert x.dtype == y.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])


def chinese_text(n_chars=60_000, distinct=3000, seed=0):
    """A text of `distinct` Chinese characters in short lines, with a little repeated structure to learn."""
    rng = random.Random(seed)
    alphabet = [chr(0x4E00 + i) for i in range(distinct)]
    words = ["".join(rng.choices(alphabet, k=rng.randint(1, 3))) for _ in range(800)]
    lines = []
    while sum(map(len, lines)) < n_chars:
        lines.append("".join(rng.choices(words, k=rng.randint(3, 8))) + "。")
    return "\n".join(lines) + "\n" + "".join(alphabet)  # every character at least once


def test_a_text_of_thousands_of_characters_trains_and_samples(tmp_path, capsys):
    path, out_dir = tmp_path / "zh.txt", tmp_path / "out"
    path.write_text(chinese_text(), encoding="utf-8")
    argv = [*TINY, f"--data={path}", f"--out_dir={out_dir}", "--max_iters=4", "--eval_interval=2"]
    assert gpt.main([*argv, "--prompt=中"]) == 0
    ckpt = gpt.load_checkpoint(out_dir / "ckpt.pt")
    assert len(ckpt["vocab"]) == 3002 and ckpt["model"]["token_embedding_table.weight"].shape[0] == 3002
    capsys.readouterr()
    assert gpt.main(["--sample", f"--out_dir={out_dir}", "--prompt=中人", "--max_new_tokens=30"]) == 0
    written = capsys.readouterr().out
    assert written.startswith("中人") and len(written) == 2 + 30 + 1 and set(written[:-1]) <= set(ckpt["vocab"])


# ---- fine-tuning: --init_from ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """A tiny model trained on tiny Shakespeare: its out_dir."""
    argv = [*TINY, f"--data={corpus}", "--max_iters=60", "--eval_interval=30"]
    return trained_once(tmp_path_factory, "pretrained", argv)


@pytest.fixture
def small_text(tmp_path):
    """Another text, in a part of the pretrained model's vocabulary (no capitals, no punctuation but the comma)."""
    path = tmp_path / "small.txt"
    path.write_text("to be, or not to be, that is the question\nwhether tis nobler in the mind to suffer\n" * 40)
    return path


def test_fine_tuning_starts_from_the_trained_model_as_a_new_run(pretrained, small_text, tmp_path, capsys):
    out_dir = tmp_path / "tuned"
    init = pretrained / "ckpt.pt"
    argv = [f"--init_from={init}", f"--data={small_text}", f"--out_dir={out_dir}", "--device=cpu", "--dtype=float32"]
    argv += ["--max_iters=10", "--eval_interval=5", "--eval_iters=4", "--learning_rate=3e-4", "--warmup_iters=2"]
    assert gpt.main(argv) == 0
    pre, tuned = gpt.load_checkpoint(init), gpt.load_checkpoint(out_dir / "ckpt.pt")
    # the model's shape and vocabulary are the pretrained model's, whatever the defaults say
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        assert tuned["config"][name] == pre["config"][name]
    assert tuned["vocab"] == pre["vocab"] and tuned["config"]["init_from"] == str(init)
    # a new run: its own step, schedule and optimizer; the first row is the warm-up's first learning rate
    log = rows(out_dir)
    assert [r["step"] for r in log] == [0, 5, 10] and log[0]["lr"] == pytest.approx(3e-4 / 2)
    assert tuned["step"] == 10 and tuned["optimizer"]["state"][0]["step"] == 10
    # its first evaluation is the pretrained model's loss on the new text, not a fresh model's
    cfg = gpt.Config(**tuned["config"])
    model = gpt.GPT(len(pre["vocab"]), cfg)
    model.load_state_dict(pre["model"])
    _, ids = gpt.read_corpus(str(small_text), pre["vocab"])
    splits = dict(zip(("train", "val"), gpt.split_data(ids), strict=True))
    machine = gpt.Machine()
    machine.batches = torch.Generator().manual_seed(cfg.seed)  # the run's batches, as they were at step 0
    expected = gpt.estimate_loss(model, splits, cfg, machine)
    assert (log[0]["train_loss"], log[0]["val_loss"]) == (round(expected["train"], 4), round(expected["val"], 4))
    assert log[0]["val_loss"] < 4.0  # well below a fresh model's ln(65) = 4.17: the pretrained weights at work
    assert "earlier-" not in capsys.readouterr().out and not list(out_dir.glob("earlier-*"))


def test_fine_tuning_refuses_a_text_with_characters_the_model_never_saw(pretrained, tmp_path, capsys):
    text = tmp_path / "french.txt"
    text.write_text("être ou ne pas être, voilà la question\n" * 20)
    argv = [f"--init_from={pretrained / 'ckpt.pt'}", f"--data={text}", f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    message = refused(capsys, argv, pretrained, tmp_path / "out")
    advice = "use a text without them, or train a new model (no --resume, no --init_from)"
    assert message == f"{text} has 2 character(s) the model never saw: 'à' 'ê'; {advice}"


def test_fine_tuning_refuses_a_shape_that_contradicts_the_checkpoint(pretrained, small_text, tmp_path, capsys):
    init = pretrained / "ckpt.pt"
    argv = [f"--init_from={init}", f"--data={small_text}", f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    message = refused(capsys, [*argv, "--n_layer=3"], pretrained, tmp_path / "out")
    keep = "leave it out: fine-tuning keeps the model's shape"
    assert message == f"--n_layer=3 contradicts --init_from={init}, whose n_layer is 2; {keep}"
    same = [*argv, "--n_layer=2", "--max_iters=1", "--eval_iters=1"]
    assert gpt.main(same) == 0  # the same value is no contradiction


def test_fine_tuning_from_a_checkpoint_that_is_not_there(small_text, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "ckpt.pt"
    message = refused(capsys, [f"--init_from={missing}", f"--data={small_text}", f"--out_dir={tmp_path / 'out'}"])
    assert message == f"no checkpoint at {missing}: train first (python gpt.py), or name the ckpt.pt of a trained run"


def test_a_fine_tuning_run_resumes_as_itself(pretrained, small_text, tmp_path, monkeypatch, capsys):
    """--resume continues the fine-tuning run in out_dir (it does not start again from --init_from), with the same
    --init_from or none given; another --init_from with --resume is refused, since it cannot mean both."""
    out_dir, init = tmp_path / "tuned", pretrained / "ckpt.pt"
    argv = [f"--init_from={init}", f"--data={small_text}", f"--out_dir={out_dir}", "--device=cpu", "--eval_interval=5"]
    assert gpt.main([*argv, "--max_iters=5"]) == 0
    elsewhere = tmp_path / "other.pt"
    shutil.copy(init, elsewhere)
    message = refused(capsys, [*argv[1:], "--resume", f"--init_from={elsewhere}"], out_dir)
    assert message == (
        f"--resume continues the run in {out_dir}/, which started from --init_from={init}; leave out --resume to "
        "start a new run from it (in another --out_dir)"
    )
    monkeypatch.setattr(gpt, "load_checkpoint", counting(gpt.load_checkpoint, calls := []))
    assert gpt.main([*argv, "--resume", "--max_iters=10"]) == 0  # the same --init_from: it goes on
    assert str(init) not in [str(path) for path, *_ in calls]  # and the pretrained model is not read again
    assert [r["step"] for r in rows(out_dir)] == [0, 5, 10]
    assert gpt.load_checkpoint(out_dir / "ckpt.pt")["config"]["init_from"] == str(init)


def counting(function, calls):
    def counted(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return counted
