"""look.py: the page where a trained model writes and each character shows what it looked at. The text is
gpt.py --sample's; each character's context is the window its KV cache held, past block_size and its rebuilds; the
attention and the odds stored are the model's own, checked against a plain forward pass of the spelled-out formula;
a real headless Chromium shows them when a character is clicked; the page stays small; bad input gets one line."""

import importlib.util
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SERIAL_ENV, TINY, run_script, trained_once
from torch.nn import functional as F

import gpt


def load_look():
    """look.py as a module, found by its path (a script beside gpt.py, like bench.py)."""
    spec = importlib.util.spec_from_file_location("look", ROOT / "look.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


look = load_look()

BS = 8  # block_size: a sample of 40 characters goes past it several times, and the cache is rebuilt each time
# a prompt longer than block_size (the first forward pass sees only its end), temperature and top-k both in play
KNOBS = ["--prompt=ROMEO:\nWhat, ho!", "--max_new_tokens=40", "--temperature=0.9", "--top_k=7", "--seed=7"]


@pytest.fixture(scope="module")
def out_dir(corpus, tmp_path_factory):
    return trained_once(tmp_path_factory, "look", [*TINY, f"--block_size={BS}", f"--data={corpus}"])


@pytest.fixture(scope="module")
def written(out_dir, tmp_path_factory):
    """The page look.py writes for KNOBS, and what it recorded: (html path, cfg, prompt ids, steps, text)."""
    html = tmp_path_factory.mktemp("page") / "look.html"
    assert look.main([f"--out_dir={out_dir}", *KNOBS, f"--html={html}"]) == 0
    overrides, _ = look.parse_args([f"--out_dir={out_dir}", *KNOBS])
    cfg, _, tokenizer, model = look.load(overrides)
    prompt_ids, steps, text = look.write(cfg, tokenizer, model)
    return html, cfg, prompt_ids, steps, text


@pytest.fixture(scope="module")
def direct(out_dir):
    """The reference: the same weights with the spelled-out attention, run once over a context (no cache, positions
    0..), as gpt.GPT runs it; its wei read where the model applies it (attn_dropout's input). For text ids[start:end]:
    the last position's wei (n_layer,n_head,end-start) and logits (vocab_size,)."""
    _, _, _, model = look.load({"out_dir": str(out_dir), "sample": True, "fused_attention": False})
    model.eval()
    kept = {}
    for layer, block in enumerate(model.blocks):
        block.sa.attn_dropout.register_forward_hook(lambda m, args, out, layer=layer: kept.update({layer: out}))

    @torch.no_grad()
    def run(ids, start, end):
        logits, _ = model(torch.tensor([ids[start:end]]))
        return torch.stack([kept[layer][0, :, -1] for layer in range(len(model.blocks))]), logits[0, -1]

    return run


def ids_of(text, out_dir):
    return gpt.CharTokenizer(gpt.load_checkpoint(out_dir / "ckpt.pt")["vocab"]).encode(text)


def test_writes_the_text_that_gpt_sample_writes(out_dir, written, capsys):
    html, *_, text = written
    assert gpt.main(["--sample", f"--out_dir={out_dir}", *KNOBS]) == 0
    sample = capsys.readouterr().out
    assert look.main([f"--out_dir={out_dir}", *KNOBS, f"--html={html}"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(sample) and sample == text + "\n"
    assert len(text) == len("ROMEO:\nWhat, ho!") + 40
    assert f"wrote {html}: 40 characters after the prompt" in printed
    assert look.read_page(html.read_text())["text"] == text


def test_each_context_is_the_window_the_cache_held(out_dir):
    """KVCache's rule, written out: a 1-character prompt grows to block_size, then restarts from the newest half; a
    long prompt is cropped to its last block_size characters first."""
    for prompt, lengths in [("\n", [1, 2, 3, 4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 4, 5]), ("ROMEO:\nWhat, ho!", [8, 4, 5])]:
        knobs = [f"--out_dir={out_dir}", f"--prompt={prompt}", f"--max_new_tokens={len(lengths)}"]
        overrides, _ = look.parse_args(knobs)
        cfg, _, tokenizer, model = look.load(overrides)
        prompt_ids, steps, _ = look.write(cfg, tokenizer, model)
        assert [s["wei"].shape[-1] for s in steps] == lengths
        assert [s["start"] for s in steps] == [len(prompt_ids) + j - n for j, n in enumerate(lengths)]


def test_attention_and_odds_are_the_models_own(out_dir, written, direct):
    _, _, prompt_ids, steps, text = written
    ids = ids_of(text, out_dir)
    for j, step in enumerate(steps):
        end = len(prompt_ids) + j  # the character at `end` was predicted from text[start:end]
        wei, logits = direct(ids, step["start"], end)
        torch.testing.assert_close(step["wei"], wei, atol=1e-5, rtol=0)
        torch.testing.assert_close(step["logits"], logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(step["wei"].sum(-1), torch.ones(wei.shape[:2]))
        assert ids[end] == step["id"]


def test_the_page_stores_them_to_its_precision(out_dir, written, direct):
    html, cfg, prompt_ids, steps, text = written
    data = look.read_page(html.read_text())
    ids, vocab, P, at = ids_of(text, out_dir), data["vocab"], len(prompt_ids), 0
    assert data["prompt_chars"] == P and data["written"] == 40 and data["changed"] is True
    for j, step in enumerate(steps):
        assert data["start"][j] == step["start"]
        wei, logits = direct(ids, step["start"], P + j)
        stored = data["wei"][at : at + wei.numel()].view(wei.shape).double()
        at += wei.numel()
        assert (stored.sum(-1) == 255).all()  # every stored row sums to exactly 1
        assert (stored / 255 - wei).abs().max() < 1 / 255 + 1e-5
        # the odds: the ten likeliest at temperature 1, in order, then as drawn after temperature 0.9 and top-k 7
        plain, scaled = F.softmax(logits, dim=-1), logits / 0.9
        kept = scaled.argsort(descending=True)[:7]
        drawn = torch.zeros_like(plain).index_put((kept,), F.softmax(scaled[kept], dim=-1))
        rows = data["odds"][j]
        assert [i for i, _, _ in rows[:10]] == plain.argsort(descending=True)[:10].tolist()
        for i, p, pd in rows:
            assert p == pytest.approx(plain[i].item(), abs=2e-6) and pd == pytest.approx(drawn[i].item(), abs=2e-6)
        assert any(i == step["id"] and pd > 0 for i, _, pd in rows)  # the drawn one is listed, and could be drawn
        assert vocab[step["id"]] == text[P + j]
    assert at == data["wei"].numel()  # nothing more: no weight for any later character is stored


def test_odds_as_drawn_follow_temperature_and_top_k():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    plain, drawn = look.odds(logits, 0.0, None)
    assert drawn.tolist() == [0, 1, 0, 0]  # greedy: all on the likeliest
    torch.testing.assert_close(plain, F.softmax(logits, dim=-1))
    _, drawn = look.odds(logits, 0.5, 2)
    e = torch.tensor([3.0, 2.0]).div(0.5).exp()
    torch.testing.assert_close(drawn, torch.tensor([0.0, e[0] / e.sum(), e[1] / e.sum(), 0.0]))
    _, drawn = look.odds(logits, 1.0, 99)  # top_k above the vocabulary: all of it, as in gpt.sample_next
    torch.testing.assert_close(drawn, plain)


def test_quantised_rows_sum_to_one_and_stay_within_a_step():
    torch.manual_seed(0)
    for tk in (1, 2, 7, 64, 256):
        for rows in (F.softmax(torch.randn(3, 5, tk) * 4, dim=-1), torch.full((1, tk), 1 / tk)):
            q = look.quantise(rows)
            assert q.dtype == torch.uint8 and (q.sum(-1, dtype=torch.int64) == 255).all()
            assert (q.double() / 255 - rows.double()).abs().max() < 1 / 255


def test_a_click_in_chromium_shows_that_characters_attention_and_odds(out_dir, written, direct):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    html, _, prompt_ids, steps, text = written
    ids, P = ids_of(text, out_dir), len(prompt_ids)
    j = next(j for j in range(1, len(steps)) if steps[j]["start"] > steps[j - 1]["start"] + 1)  # after a rebuild
    i, start = P + j, steps[j]["start"]
    wei, logits = direct(ids, start, i)
    with sync_api.sync_playwright() as p:
        if not (look.find_chromium() or Path(p.chromium.executable_path).is_file()):
            pytest.skip("no Chromium here: none on the PATH (chromium, google-chrome), and not Playwright's own")
        browser = look.open_browser(p)  # one is installed: where it will not start, the test fails, as --png would
        try:
            tab, _ = look.open_page(browser, html)
            tab.click(f'#text span[data-i="{i}"]')

            def shown():  # the weight each character of the text shows, None where it shows none
                js = "spans => spans.map(s => s.dataset.w === undefined ? null : Number(s.dataset.w))"
                return tab.eval_on_selector_all("#text span", js)

            def close(row):
                on_page = shown()
                assert on_page[:start] == [None] * start and on_page[i:] == [None] * (len(text) - i)
                assert max(abs(a - b) for a, b in zip(on_page[start:i], row.tolist(), strict=True)) < 1 / 255 + 1e-5

            assert tab.get_attribute("#text span.sel", "data-i") == str(i)
            close(wei[-1].mean(0))  # as it opens: the last layer, the mean over its heads
            tab.select_option("#layer", "0")
            tab.select_option("#head", "1")
            close(wei[0, 1])
            js = "rows => rows.map(r => [r.dataset.char, +r.dataset.p, +r.dataset.pd, r.classList.contains('drawn')])"
            rows = tab.eval_on_selector_all("#odds tr[data-char]", js)
            plain, vocab = F.softmax(logits, dim=-1), gpt.load_checkpoint(out_dir / "ckpt.pt")["vocab"]
            top = plain.argsort(descending=True)[:10].tolist()
            assert [c for c, *_ in rows[:10]] == [vocab[k] for k in top]
            assert [p for _, p, _, _ in rows[:10]] == pytest.approx(plain[top].tolist(), abs=2e-6)
            assert [c for c, _, pd, drawn in rows if drawn] == [text[i]] and all(pd > 0 for *_, pd, d in rows if d)
            # the keyboard steps back one character; a hover elsewhere does not take a clicked selection away
            tab.keyboard.press("ArrowLeft")
            tab.hover(f'#text span[data-i="{i + 2}"]')
            assert tab.get_attribute("#text span.sel", "data-i") == str(i - 1)
            before = direct(ids, steps[j - 1]["start"], i - 1)[0][0, 1]  # layer 1, head 2 still chosen
            on_page = shown()[steps[j - 1]["start"] : i - 1]
            assert max(abs(a - b) for a, b in zip(on_page, before.tolist(), strict=True)) < 1 / 255 + 1e-5
        finally:
            browser.close()


def test_the_cpu_recipe_fits_in_a_megabyte_for_200_characters(corpus, tmp_path):
    """At the CPU recipe's size, with random weights: the page is under 1 MB, and would be even if deflate saved
    nothing (trained attention compresses differently from random attention)."""
    cfg = replace(gpt.CPU_RECIPE, data=str(corpus))
    chars = gpt.CharTokenizer.from_text(corpus.read_text()).chars
    torch.manual_seed(0)
    model = gpt.GPT(len(chars), cfg)
    state = {"model": model.state_dict(), "config": asdict(cfg), "vocab": chars, "step": 0, "best_val": 4.2}
    gpt.save_checkpoint(tmp_path / "ckpt.pt", state)
    html = tmp_path / "look.html"
    r = run_script("look.py", f"--out_dir={tmp_path}", "--max_new_tokens=200", f"--html={html}", env=SERIAL_ENV)
    assert r.returncode == 0, r.stderr
    data, size = look.read_page(html.read_text()), html.stat().st_size
    assert data["written"] == 200 and size < 1e6
    packed = len(html.read_text().split('"wei":"', 1)[1].split('"', 1)[0])  # the base64 text of the deflated rows
    assert data["wei_bytes"] == data["wei"].numel() and size - packed + data["wei_bytes"] * 4 / 3 < 1e6


def test_bad_input_gets_one_line_and_writes_nothing(out_dir, tmp_path, capsys, monkeypatch):
    page = tmp_path / "look.html"
    page.write_text("the page from before")
    (tmp_path / "folder").mkdir()
    cases = {
        "no checkpoint at": [f"--out_dir={tmp_path / 'none'}"],
        "the prompt has characters not in the vocabulary": ["--prompt=\u20ac"],
        "is a folder": [f"--html={tmp_path / 'folder'}"],
        "does not exist": [f"--html={tmp_path / 'missing' / 'look.html'}"],
        "is a file, not a folder": [f"--html={page}/look.html"],
        "look.py shows one sample": ["--num_samples=2"],
        "--select=99": ["--select=99", "--max_new_tokens=5"],
        "unrecognized arguments": ["--colour=blue"],
    }
    for words, argv in cases.items():
        assert look.main([f"--out_dir={out_dir}", f"--html={page}", *argv]) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err

    def full(path, write):
        raise OSError(28, "disk full")

    monkeypatch.setattr(gpt, "write_atomically", full)
    assert look.main([f"--out_dir={out_dir}", f"--html={page}", "--max_new_tokens=5"]) == 1
    assert capsys.readouterr().err == f"error: could not write {page} (disk full)\n"
    assert page.read_text() == "the page from before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "look.html"]  # no half-written file anywhere


def test_the_command_line_has_help_and_fails_cleanly(tmp_path):
    r = run_script("look.py", "--help", env=SERIAL_ENV)
    assert r.returncode == 0 and "--html=look.html" in r.stdout and "--temperature=1" in r.stdout
    assert "--png=''" in r.stdout and "the page:" in r.stdout
    r = run_script("look.py", f"--out_dir={tmp_path}", env=SERIAL_ENV)
    assert r.returncode == 1 and r.stderr.startswith("error: no checkpoint at") and r.stderr.count("\n") == 1
    assert r.stdout == ""
