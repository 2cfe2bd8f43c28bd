"""Data: the character tokenizer, the 90/10 split and random batches (issue 2, "Data")."""

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


def test_get_batch_shapes_and_shift_by_one():
    data = torch.arange(1000)  # every value is its own position, so a window shows where it came from
    gen = torch.Generator().manual_seed(0)
    x, y = gpt.get_batch(data, batch_size=7, block_size=11, generator=gen)
    assert x.shape == y.shape == (7, 11)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # the target at t is the character after input t
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # each row is one contiguous window of the text
    assert x[:, 0].min() >= 0 and y[:, -1].max() <= 999
    assert len(set(x[:, 0].tolist())) > 1  # random starts, not one window repeated


def test_get_batch_on_text_and_reproducible(text):
    tok = gpt.CharTokenizer.from_text(text)
    data = torch.tensor(tok.encode(text))
    x1, y1 = gpt.get_batch(data, 4, 8, torch.Generator().manual_seed(3))
    x2, y2 = gpt.get_batch(data, 4, 8, torch.Generator().manual_seed(3))
    x3, _ = gpt.get_batch(data, 4, 8, torch.Generator().manual_seed(4))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # the generator alone decides the batch
    assert not torch.equal(x1, x3)
    assert torch.equal(y1[:, :-1], x1[:, 1:])
    for row_x, row_y in zip(x1, y1, strict=True):  # inputs plus the last target: 9 characters of the text
        assert tok.decode(row_x.tolist() + [row_y[-1].item()]) in text


def test_get_batch_with_a_single_possible_window():
    data = torch.arange(9)  # block_size + 1 characters: exactly one window fits
    x, y = gpt.get_batch(data, 3, 8, torch.Generator().manual_seed(0))
    assert x.tolist() == [list(range(8))] * 3
    assert y.tolist() == [list(range(1, 9))] * 3
