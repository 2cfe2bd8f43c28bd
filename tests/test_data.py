"""Data: the character tokenizer, the 90/10 split and random batches."""

import pytest
import torch

import gpt


@pytest.fixture(scope="module")
def text(corpus):
    return gpt.load_text(str(corpus))


def test_vocabulary_is_the_sorted_set_of_characters():
    tok = gpt.CharTokenizer.from_text("hello")
    assert tok.chars == "ehlo"
    assert tok.vocab_size == 4
    assert tok.encode("hello") == [1, 0, 2, 2, 3]
    assert tok.decode([3, 2, 0]) == "ole"


def test_round_trip_on_the_corpus(text):
    tok = gpt.CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    assert list(tok.chars) == sorted(set(text))
    ids = tok.encode(text)
    assert len(ids) == len(text) == 1_115_394
    assert min(ids) == 0 and max(ids) == 64
    assert tok.decode(ids) == text
    passage = text[1000:1300]  # several lines, spaces and punctuation
    assert tok.decode(tok.encode(passage)) == passage


def test_unknown_characters_are_named():
    tok = gpt.CharTokenizer.from_text("abc \n")
    with pytest.raises(gpt.UserError) as info:
        tok.encode("a cab é€ é")
    message = str(info.value)
    assert "'é'" in message and "'€'" in message
    assert message.count("'é'") == 1  # each unknown character once
    assert "'a'" not in message and "'c'" not in message  # known ones are not blamed
    assert "\n" not in message


def test_split_sizes_on_the_corpus(text):
    data = torch.tensor(gpt.CharTokenizer.from_text(text).encode(text))
    train, val = gpt.split_data(data)
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert torch.equal(torch.cat([train, val]), data)  # the first 90%, then the last 10%, nothing lost


def test_split_is_first_ninety_percent():
    train, val = gpt.split_data(torch.arange(20))
    assert train.tolist() == list(range(18))
    assert val.tolist() == [18, 19]


def batches(generator, rank=0, world_size=1):
    """A machine whose batches come from this generator, as process `rank` of `world_size`."""
    machine = gpt.Machine()
    machine.batches, machine.rank, machine.world_size = generator, rank, world_size
    return machine


def test_get_batch_shapes_and_shift_by_one():
    data = torch.arange(1000)  # every value is its own position, so a window shows where it came from
    gen = torch.Generator().manual_seed(0)
    x, y = gpt.get_batch(data, gpt.Config(batch_size=7, block_size=11), batches(gen))
    assert x.shape == y.shape == (7, 11)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # the target at t is the character after input t
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # each row is one contiguous window of the text
    assert x[:, 0].min() >= 0 and y[:, -1].max() <= 999
    assert len(set(x[:, 0].tolist())) > 1  # random starts, not one window repeated


def test_get_batch_on_text_and_reproducible(text):
    tok = gpt.CharTokenizer.from_text(text)
    data = torch.tensor(tok.encode(text))
    cfg = gpt.Config(batch_size=4, block_size=8)
    x1, y1 = gpt.get_batch(data, cfg, batches(torch.Generator().manual_seed(3)))
    x2, y2 = gpt.get_batch(data, cfg, batches(torch.Generator().manual_seed(3)))
    x3, _ = gpt.get_batch(data, cfg, batches(torch.Generator().manual_seed(4)))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # the generator alone decides the batch
    assert not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:])
    for row_x, row_y in zip(x1, y1, strict=True):  # inputs plus the last target: 9 characters of the text
        assert tok.decode(row_x.tolist() + [row_y[-1].item()]) in text


def test_get_batch_with_a_single_possible_window():
    data = torch.arange(9)  # block_size + 1 characters: exactly one window fits
    x, y = gpt.get_batch(data, gpt.Config(batch_size=3, block_size=8), batches(torch.Generator().manual_seed(0)))
    assert x.tolist() == [list(range(8))] * 3
    assert y.tolist() == [list(range(1, 9))] * 3


def test_without_a_machine_get_batch_draws_from_torchs_own_generator_as_the_lecture_does():
    data, cfg = torch.arange(1000), gpt.Config(batch_size=5, block_size=8)
    torch.manual_seed(7)
    x, _ = gpt.get_batch(data, cfg)
    torch.manual_seed(7)
    assert torch.equal(x[:, 0], torch.randint(1000 - 8, (5,)))


def test_each_process_keeps_its_share_of_one_global_batch():
    """All processes draw the same batch_size x world_size windows; process r keeps the r-th batch_size of them. So
    two processes of batch 4 train on the windows that one process of batch 8 would."""
    data, one = torch.arange(1000), gpt.Config(batch_size=8, block_size=8)
    whole, _ = gpt.get_batch(data, one, batches(torch.Generator().manual_seed(1)))
    shares = [
        gpt.get_batch(data, gpt.Config(batch_size=4, block_size=8), batches(torch.Generator().manual_seed(1), r, 2))[0]
        for r in (0, 1)
    ]
    assert torch.equal(torch.cat(shares), whole)


def test_micro_batches_drawn_one_after_the_other_are_the_windows_of_one_draw():
    """On a CPU the generator draws in sequence: two micro-batches of 4 (gradient accumulation) are the windows one
    batch of 8 would have been. Training with accumulation takes the batches that training without it takes."""
    data = torch.arange(1000)
    whole, _ = gpt.get_batch(data, gpt.Config(batch_size=8, block_size=8), batches(torch.Generator().manual_seed(2)))
    machine, half = batches(torch.Generator().manual_seed(2)), gpt.Config(batch_size=4, block_size=8)
    assert torch.equal(torch.cat([gpt.get_batch(data, half, machine)[0] for _ in range(2)]), whole)
