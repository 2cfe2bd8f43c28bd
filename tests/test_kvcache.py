"""KV-cache sampling: while the text fits in block_size the cached path gives the uncached
path's characters and logits; past it, every step is a plain forward pass over the window that the rebuild
rule in KVCache's docstring names (the newest block_size // 2 characters, at positions 0..)."""

from dataclasses import replace

import pytest
import torch

import bigram
import gpt

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 11
BS = 8  # block_size
# dropout well above 0: if sampling left it on, the two paths would draw different masks and disagree
CFG = gpt.Config(block_size=BS, n_embd=32, n_head=4, n_layer=2, dropout=0.5)


def make_model(fused=True, cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = gpt.GPT(VOCAB, replace(cfg, fused_attention=fused))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # larger than the init: confident, distinct predictions, no near-ties for argmax
    return model  # left in training mode: generate must turn dropout off by itself


def generate(model, idx, n, use_cache, temperature=1.0, seed=1):
    """generate(), and for each model call the stream made: (positions fed, first position, last position's logits).
    The first position is where the cache's positions end (0 without a cache), read before the call adds to it."""
    calls, starts = [], []

    def before(module, args, kwargs):
        cache = kwargs.get("cache")
        starts.append(len(cache) if cache is not None else 0)

    def record(module, args, kwargs, output):
        calls.append((args[0].size(1), starts.pop(), output[0][:, -1].clone()))

    handles = [model.register_forward_pre_hook(before, with_kwargs=True)]
    handles.append(model.register_forward_hook(record, with_kwargs=True))
    try:
        torch.manual_seed(seed)
        out = gpt.generate(model, idx, n, temperature=temperature, use_cache=use_cache)
    finally:
        for handle in handles:
            handle.remove()
    return out, calls


def rule_windows(prompt_len, n, block_size):
    """KVCache's rule: how many of the newest characters the cached path has seen at each of n steps."""
    sizes, cached = [], 0
    for _ in range(n):
        if cached == 0:
            cached = min(prompt_len, block_size)  # the first step builds the cache from the (cropped) prompt
        elif cached == block_size:
            cached = max(1, block_size // 2)  # full: rebuilt from the newest half, at positions 0..
        else:
            cached += 1
        sizes.append(cached)
    return sizes


@torch.no_grad()
def plain_last_logits(model, window):
    """The uncached reference: one ordinary forward pass over `window`, in eval mode."""
    was_training = model.training
    model.eval()
    logits = model(window)[0][:, -1]
    model.train(was_training)
    return logits


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_cached_and_uncached_agree_over_the_first_block(fused):
    model = make_model(fused)
    prompt = torch.tensor([[3]])
    cached, cached_calls = generate(model, prompt, BS, use_cache=True)
    uncached, uncached_calls = generate(model, prompt, BS, use_cache=False)
    assert torch.equal(cached, uncached)  # the same characters, sampled with the same seed
    assert len(set(cached[0].tolist())) > 2  # a real sample, not one character repeated
    for (_, _, a), (_, _, b) in zip(cached_calls, uncached_calls, strict=True):
        close(a, b)
    # the cache did the work: after the prompt, each step fed one new position, at the next position
    assert [(t, pos) for t, pos, _ in cached_calls] == [(1, 0)] + [(1, p) for p in range(1, BS)]
    assert [t for t, _, _ in uncached_calls] == list(range(1, BS + 1))
    assert model.training  # the mode is given back


def check_follows_the_rule(model, prompt, n):
    """Greedy cached generation: well formed, and every step the argmax of a plain forward pass over the
    window that the rule implies. Returns the output, the calls, and the steps at which that window is also
    the uncached path's (the newest min(length, block_size) characters)."""
    B, P = prompt.shape
    out, calls = generate(model, prompt, n, use_cache=True, temperature=0)
    assert out.shape == (B, P + n) and out.dtype == torch.long
    assert torch.equal(out[:, :P], prompt)
    assert 0 <= out.min() and out.max() < VOCAB
    sizes = rule_windows(P, n, BS)
    # a rebuild feeds its whole window, every other step one position
    rebuilds = [i == 0 or sizes[i] != sizes[i - 1] + 1 for i in range(n)]
    assert [t for t, _, _ in calls] == [w if r else 1 for w, r in zip(sizes, rebuilds, strict=True)]
    agree = []
    for i, (w, (_, _, logits)) in enumerate(zip(sizes, calls, strict=True)):
        length = P + i  # characters before the one predicted at this step
        expected = plain_last_logits(model, out[:, length - w : length])
        close(logits, expected)
        assert torch.equal(out[:, length], expected.argmax(-1))
        if w == min(length, BS):
            agree.append(i)
    return out, calls, agree


@pytest.mark.parametrize("fused", [True, False])
def test_three_blocks_follow_the_rebuild_rule_and_agree_where_defined(fused):
    model = make_model(fused)
    prompt = torch.tensor([[1, 4, 2]])
    out, calls, agree = check_follows_the_rule(model, prompt, 3 * BS)
    assert len([i for i in agree if 3 + i > BS]) >= 2  # also past block_size, whenever the cache is full
    # the uncached sliding window: the same characters while the text fits in block_size
    uncached, _ = generate(model, prompt, 3 * BS, use_cache=False, temperature=0)
    first = BS - 3 + 1  # new characters predicted from at most block_size characters
    assert torch.equal(out[:, : 3 + first], uncached[:, : 3 + first])
    # whenever the cache holds min(length, block_size) characters, the uncached path continues the same text
    # the same way: same character, same logits
    for i in agree:
        step, step_calls = generate(model, out[:, : 3 + i], 1, use_cache=False, temperature=0)
        assert torch.equal(step[:, -1], out[:, 3 + i])
        close(step_calls[0][2], calls[i][2])


@pytest.mark.parametrize("fused", [True, False])
def test_a_prompt_longer_than_block_size(fused):
    model = make_model(fused)
    torch.manual_seed(2)
    prompt = torch.randint(VOCAB, (1, 2 * BS + 3))
    out, _, agree = check_follows_the_rule(model, prompt, BS + 2)
    assert agree[0] == 0  # the first character comes from the newest block_size characters of the prompt
    uncached, _ = generate(model, prompt, 1, use_cache=False, temperature=0)
    assert torch.equal(out[:, : 2 * BS + 4], uncached)


@pytest.mark.parametrize("fused", [True, False])
def test_a_batch_of_two_prompts(fused):
    model = make_model(fused)
    prompts = torch.tensor([[1, 2], [7, 0]])
    out, _, _ = check_follows_the_rule(model, prompts, 3 * BS)
    for row in range(2):  # each row as if generated alone
        alone, _ = generate(model, prompts[row : row + 1], 3 * BS, use_cache=True, temperature=0)
        assert torch.equal(out[row : row + 1], alone)
    cached, cached_calls = generate(model, prompts, BS - 1, use_cache=True)
    uncached, uncached_calls = generate(model, prompts, BS - 1, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached[0, 2:], cached[1, 2:])  # two different samples
    for (_, _, a), (_, _, b) in zip(cached_calls, uncached_calls, strict=True):
        close(a, b)


def test_block_size_1():
    model = make_model(cfg=replace(CFG, block_size=1))
    prompt = torch.tensor([[5]])
    for temperature in (0, 1.0):
        cached, _ = generate(model, prompt, 12, use_cache=True, temperature=temperature)
        uncached, _ = generate(model, prompt, 12, use_cache=False, temperature=temperature)
        assert torch.equal(cached, uncached)


def test_the_same_sampler_serves_the_bigram_far_past_block_size():
    """gpt.generate samples the bigram too: far past block_size, each character is drawn from the table's row
    of the character before it, and only the last block_size characters are ever fed to the model. A bigram
    has no KV cache, so use_cache changes nothing."""
    torch.manual_seed(0)
    model = bigram.BigramLanguageModel(VOCAB, CFG)
    torch.nn.init.normal_(model.token_embedding_table.weight)  # zeros at init: every sample would be uniform
    prompt = torch.tensor([[0], [6]])
    cached, cached_calls = generate(model, prompt, 3 * BS, use_cache=True)
    uncached, uncached_calls = generate(model, prompt, 3 * BS, use_cache=False)
    assert torch.equal(cached, uncached)
    assert max(t for t, _, _ in cached_calls) == BS and len(cached_calls) == 3 * BS
    torch.manual_seed(1)  # generate()'s seed above: the same draws, made by hand from the table
    by_hand = prompt
    with torch.no_grad():
        for _ in range(3 * BS):
            probs = torch.softmax(model.token_embedding_table.weight[by_hand[:, -1]], dim=-1)
            by_hand = torch.cat([by_hand, torch.multinomial(probs, 1)], dim=1)
    assert torch.equal(cached, by_hand)


def test_a_cache_is_fed_one_new_character_or_a_whole_window():
    """The fused kernel's causal mask (is_causal) lines the first query up with the first key: right for a whole
    window fed to an empty cache, and a single new character may look at all it holds. Several new characters after
    a cache would each see those after it (the formula's mask would be right): the cache refuses them."""
    model = make_model(fused=True).eval()
    idx = torch.randint(VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    cache = gpt.KVCache(BS)
    with torch.no_grad():
        model(idx[:, :3], cache=cache)  # a whole window, into an empty cache
        model(idx[:, 3:4], cache=cache)  # one new character
        with pytest.raises(AssertionError, match="^a KV cache takes one new character at a time"):
            model(idx[:, 4:], cache=cache)
