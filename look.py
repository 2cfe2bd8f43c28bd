"""A page where a trained model writes, and every character shows what the model looked at when it wrote it.

    python look.py                                    write a sample with out/ckpt.pt and save it as look.html
    python look.py --out_dir=out-cpu --prompt=ROMEO: --max_new_tokens=200 --html=romeo.html
    python look.py --png=look.png                     also a screenshot of the page (needs Playwright and Chromium)

It takes the knobs of `python gpt.py --sample` by the same names and writes the same text for them (the same seed
gives the same characters), plus --html=PATH, the page, --select=N, the character selected when it opens, and
--png=PATH. The page is one HTML file with nothing to fetch: open it from the disk in any current browser. Click (or
hover) a character the model wrote: the characters it could see are shaded by the chosen layer's and head's
attention (a row of `wei`), and beside them stand its ten likeliest next characters, the drawn one marked.

The attention is the model's own: hooks on its modules keep what each attention layer was fed, and the last
position's row of wei is computed from the layer's own queries and its KV cache's keys, as the spelled-out formula in
gpt.py computes it (the fused kernel is proven equal to it). The odds are the softmax of its logits.
"""

import base64
import json
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch.nn import functional as F

import gpt
from gpt import UserError


@dataclass
class LookConfig(gpt.Config):
    # the page
    html: str = "look.html"  # the page to write: one HTML file that needs nothing else
    select: int = -1  # the character selected when the page opens, by its index in the text; -1: the last one
    png: str = ""  # also save a screenshot of the page here (needs Playwright and Chromium); empty: none


OWN = {f.name for f in fields(LookConfig)} - {f.name for f in fields(gpt.Config)}  # look.py's knobs, not gpt.py's
TOP = 10  # next characters listed for each written one


def parse_args(argv):
    """gpt.py's settings for --sample and look.py's own, through gpt.py's parser: (the overrides for gpt.settings,
    look.py's settings). Paths are checked now, before minutes of writing end in an error."""
    overrides = gpt.parse_overrides(argv, LookConfig())
    look = replace(LookConfig(), **overrides)
    if overrides.get("num_samples", 1) != 1:
        raise UserError("look.py shows one sample; leave out --num_samples")
    for name in ("html", "png"):
        path = Path(getattr(look, name))
        if name == "png" and not look.png:
            continue
        if not path.name or path.is_dir():
            raise UserError(f"--{name}={path} is a folder; name a file to write")
        if path.parent.exists() and not path.parent.is_dir():
            raise UserError(f"--{name}={path}: {path.parent} is a file, not a folder")
        if not path.parent.is_dir():
            raise UserError(f"--{name}={path}: the folder {path.parent} does not exist")
    return {k: v for k, v in overrides.items() if k not in OWN} | {"sample": True}, look


# ---- What the model saw: each new character, the attention behind it, and the odds it was drawn from.
@torch.no_grad()
def record(model, idx, cfg):
    """Sample max_new_tokens characters after idx (1,T) exactly as gpt.print_sample does (gpt.stream, its KV cache,
    torch's default generator), and for each one keep what the forward pass that predicted it saw. A list with one
    dict per new character: id; start, where its context begins in the text (it ends just before the character);
    wei (n_layer, n_head, context length); logits (vocab_size,)."""
    seen = {"wei": [None] * len(model.blocks)}

    def keep_wei(layer):
        def hook(sa, args, kwargs, output):
            x = args[0]  # (1,T,C) what the attention layer read: the LayerNorm'd residual stream of the new positions
            cache = args[1] if len(args) > 1 else kwargs.get("cache")
            B, T, C = x.shape
            q, k, _ = sa.qkv(x).split(C, dim=2)  # the layer's own projections, as in its forward
            q = q.view(B, T, sa.n_head, sa.head_size).transpose(1, 2)[:, :, -1:]  # (1,nh,1,hs): the last position's
            if cache is not None:  # the keys of the whole context, the cached ones and the new ones: (1,nh,Tk,hs)
                k = cache.kv[sa][0]
            else:
                k = k.view(B, T, sa.n_head, sa.head_size).transpose(1, 2)
            wei = q @ k.transpose(-2, -1) * sa.head_size**-0.5  # (1,nh,1,Tk) the last query against every key
            # the last position may look at the whole context: its row of tril is all ones, nothing to mask
            seen["wei"][layer] = F.softmax(wei.float(), dim=-1)[0, :, 0].cpu()  # (nh,Tk)

        return hook

    def keep_logits(lm_head, args, output):
        seen["logits"] = output[0, -1].float().cpu()  # (vocab_size,) what sample_next draws from

    hooks = [b.sa.register_forward_hook(keep_wei(i), with_kwargs=True) for i, b in enumerate(model.blocks)]
    hooks.append(model.lm_head.register_forward_hook(keep_logits))
    steps, n = [], idx.size(1)  # n: characters in the text so far
    try:
        for idx_next in gpt.stream(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k):
            wei = torch.stack(seen["wei"])  # (n_layer,nh,Tk)
            steps.append({"id": int(idx_next), "start": n - wei.size(-1), "wei": wei, "logits": seen["logits"]})
            n += 1
    finally:
        for hook in hooks:
            hook.remove()
    return steps


def odds(logits, temperature, top_k):
    """The model's probabilities for the next character (vocab_size,): at temperature 1 (its softmax), and as drawn,
    after gpt.sample_next's temperature and top-k (temperature 0: all on the likeliest)."""
    plain = F.softmax(logits, dim=-1)
    if temperature == 0:
        return plain, F.one_hot(logits.argmax(), logits.numel()).float()
    scaled = logits / temperature
    if top_k is not None:
        kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return plain, F.softmax(scaled, dim=-1)


def quantise(wei):
    """Rows of weights that sum to 1 (..., Tk) as bytes that sum to exactly 255: each weight w becomes floor(255 w) or
    one more, the extra units going to the largest remainders, so each is within 1/255 of the model's weight and each
    stored row still sums to 1."""
    scaled = 255 * wei.double() / wei.double().sum(-1, keepdim=True)
    low = scaled.floor()
    short = (255 - low.sum(-1, keepdim=True)).round()  # units still to hand out in each row (0 <= short < Tk)
    rank = (scaled - low).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0: the largest remainder
    return (low + (rank < short)).to(torch.uint8)


# ---- The page.
def page_data(steps, text, prompt_chars, tokenizer, cfg, ckpt, select):
    """Everything the page shows, as one JSON-able dict; the rows of wei packed as described in PAGE's comment."""
    written, top_k = len(steps), cfg.top_k
    changed = cfg.temperature != 1 or (top_k is not None and top_k < tokenizer.vocab_size)
    rows = []
    for step in steps:
        plain, drawn = odds(step["logits"], cfg.temperature, cfg.top_k)
        top = torch.topk(plain, min(TOP, plain.numel())).indices.tolist()
        top += [] if step["id"] in top else [step["id"]]  # the drawn character, even where it was an outsider
        rows.append([[i, round(plain[i].item(), 6), round(drawn[i].item(), 6)] for i in top])
    packed = b"".join(quantise(step["wei"]).numpy().tobytes() for step in steps)
    return {
        "vocab": tokenizer.chars,
        "text": text,
        "prompt_chars": prompt_chars,
        "select": select if select >= 0 else len(text) + select,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "block_size": cfg.block_size,
        "about": {
            "model": f"{cfg.n_layer} layers x {cfg.n_head} heads, n_embd {cfg.n_embd}, block_size {cfg.block_size}",
            "trained": f"step {ckpt['step']}, val loss {ckpt.get('best_val', float('nan')):.4f}",
            "sampled": f"seed {cfg.seed}, temperature {cfg.temperature:g}, top_k {'none' if top_k is None else top_k}",
        },
        "changed": changed,  # whether temperature or top_k changed the odds: then the page shows both columns
        "start": [step["start"] for step in steps],
        "odds": rows,
        "wei": base64.b64encode(zlib.compress(packed)).decode("ascii"),  # zlib level 6: level 9 saves ~10%, 25x slower
        "wei_bytes": len(packed),
        "written": written,
    }


def page(data):
    """The HTML page, with data inside it. A "<" inside a JSON string is written \\u003c, so that no "</script>" in
    the text can end the script early."""
    return PAGE.replace("/*DATA*/", json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c"))


def read_page(html):
    """The data of a page that look.py wrote, the rows of wei unpacked into one uint8 tensor (for tests, to read)."""
    data = json.loads(html.split('<script id="look-data" type="application/json">', 1)[1].split("</script>", 1)[0])
    data["wei"] = torch.frombuffer(bytearray(zlib.decompress(base64.b64decode(data["wei"]))), dtype=torch.uint8)
    return data


# ---- The browser, for --png (and the tests): Playwright driving the Chromium on this machine.
def find_chromium():
    """The path of a Chromium or Chrome on this machine, or None (then Playwright's own, if it has one)."""
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next(filter(None, map(shutil.which, names)), None)


def open_browser(playwright):
    """A headless Chromium that talks to no one: no sandbox (root in a container has none), no GPU, no updates."""
    args = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    args += ["--disable-background-networking", "--disable-component-update", "--disable-default-apps"]
    try:
        return playwright.chromium.launch(executable_path=find_chromium(), headless=True, args=args)
    except Exception as e:  # Playwright's error names the browser it looked for
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"Chromium would not start ({first}); install it: apt-get install chromium") from None


def open_page(browser, path, width=1180, height=720):
    """A tab with the page at `path`, ready: its data unpacked and a character shown. Returns it and the milliseconds
    from the start of loading to ready, as the page measured them."""
    tab = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
    tab.goto(Path(path).resolve().as_uri())
    tab.wait_for_selector("body[data-ready]", timeout=20_000)
    return tab, float(tab.get_attribute("body", "data-ready"))


def screenshot(html, png):
    """Save a screenshot of the page at `html` as `png`, written atomically; returns the page's time to ready (ms)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise UserError("--png needs Playwright for Python: pip install playwright (and Chromium)") from None
    with sync_playwright() as p:
        browser = open_browser(p)
        try:
            tab, ready_ms = open_page(browser, html)
            shot = tab.screenshot(type="png")
        finally:
            browser.close()
    try:
        gpt.write_atomically(Path(png), lambda f: f.write(shot))
    except OSError as e:
        raise UserError(f"could not write {png} ({e.strerror or e})") from None
    return ready_ms


# ---- main()
def load(overrides):
    """The settings, checkpoint, vocabulary and model, loaded as gpt.sample loads them."""
    cfg, ckpt, _ = gpt.settings(overrides)
    tokenizer, device = gpt.CharTokenizer(ckpt["vocab"]), gpt.resolve_device(cfg.device)
    model = gpt.load_weights(gpt.GPT(tokenizer.vocab_size, cfg), ckpt, Path(cfg.out_dir) / "ckpt.pt").to(device)
    return cfg, ckpt, tokenizer, model


def write(cfg, tokenizer, model):
    """The sample that gpt.sample writes for cfg, recorded: (the prompt's ids, record's steps, the whole text)."""
    prompt_ids = gpt.encode_prompt(tokenizer, cfg.prompt)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=next(model.parameters()).device)  # (1,T)
    torch.manual_seed(cfg.seed)  # as gpt.sample does, for the same text
    steps = record(model, idx, cfg)
    return prompt_ids, steps, cfg.prompt + tokenizer.decode([step["id"] for step in steps])


def build_page(argv):
    """The page that `python look.py argv...` writes, as text, for main() and for a notebook, which can show it
    inline; with look.py's own settings, the sample's text and how many characters the model wrote."""
    overrides, own = parse_args(argv)
    cfg, ckpt, tokenizer, model = load(overrides)
    text_len = len(gpt.encode_prompt(tokenizer, cfg.prompt)) + cfg.max_new_tokens
    if not -text_len <= own.select < text_len:
        raise UserError(f"--select={own.select}: the text will have {text_len} characters (0 to {text_len - 1}, or -1)")
    prompt_ids, steps, text = write(cfg, tokenizer, model)
    return page(page_data(steps, text, len(prompt_ids), tokenizer, cfg, ckpt, own.select)), own, text, len(steps)


def look(argv):
    """Sample as python gpt.py --sample does, save the page (and its screenshot), and say where they are."""
    t = time.perf_counter()
    html, own, text, written = build_page(argv)
    html = html.encode("utf-8")
    try:
        gpt.write_atomically(Path(own.html), lambda f: f.write(html))
    except OSError as e:
        raise UserError(f"could not write {own.html} ({e.strerror or e})") from None
    print(text)
    took = time.perf_counter() - t
    print(f"wrote {own.html}: {written} characters after the prompt, {len(html) / 1e6:.2f} MB, in {took:.1f} s")
    if own.png:
        print(f"wrote {own.png}: the page, ready in {screenshot(own.html, own.png):.0f} ms in headless Chromium")
    return 0


def main(argv=None):
    try:
        return look(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


# The page: plain HTML, CSS and JavaScript, nothing fetched. /*DATA*/ becomes the JSON of page_data.
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>What the model looked at</title>
<style>
body { margin: 0; font: 14px/1.45 system-ui, sans-serif; color: #222; background: #fff; }
header { padding: 10px 18px 6px; border-bottom: 1px solid #ddd; background: #f8f8f6; }
h1 { font-size: 18px; margin: 0 0 2px; }
.about { color: #555; font-size: 12.5px; }
.controls { margin: 6px 0 2px; }
.controls label { margin-right: 12px; }
details { font-size: 13px; max-width: 1100px; margin-top: 4px; }
details p { margin: 4px 0; }
main { display: flex; gap: 22px; padding: 12px 18px; align-items: flex-start; }
#text { flex: 1; max-width: 84ch; font: 15px/1.7 ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap;
  word-break: break-all; outline: none; }
#text span { border-radius: 2px; cursor: pointer; }
#text span.prompt { color: #8a8a8a; cursor: default; }
#text span.ctrl { color: #b0b0b0; }
#text span.ctx { box-shadow: inset 0 -2px 0 #9db4dc; }
#text span.sel { outline: 2px solid #e8590c; outline-offset: 0; color: #000; }
aside { width: 330px; position: sticky; top: 10px; font-size: 13px; }
#info { margin-bottom: 8px; }
table { border-collapse: collapse; width: 100%; }
th { text-align: left; font-weight: 600; font-size: 12px; color: #555; padding: 2px 4px; white-space: nowrap; }
td { padding: 2px 4px; }
td.ch { font-family: ui-monospace, Menlo, Consolas, monospace; width: 2.5em; }
td.num { text-align: right; width: 4em; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; vertical-align: middle; height: 10px; margin-right: 6px; background: #2563eb;
  border-radius: 2px; }
td.p { white-space: nowrap; }
tr.drawn td { font-weight: 700; background: #fff1e6; }
kbd { font: 12px ui-monospace, monospace; border: 1px solid #ccc; border-radius: 3px; padding: 0 3px; }
</style>
</head>
<body>
<header>
<h1>What the model looked at</h1>
<div class="about" id="about"></div>
<div class="controls">
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<span class="about">hover a character the model wrote, click to keep it, <kbd>&larr;</kbd> <kbd>&rarr;</kbd> to step;
grey: your prompt</span>
</div>
<details open>
<summary>What you are looking at</summary>
<p>The model writes one character at a time. To predict the one you pick, every character of its context (underlined)
  offered a <b>key</b>, and the character just before the one you pick asked a <b>query</b>. In every head, the
  query is matched against each key: <code>wei = softmax(q &middot; k<sup>T</sup> / &radic;head_size)</code>, with
  the future masked out (<code>tril</code>), so the weights sum to 1 and nothing after a character is seen. The
  shading is that row of <code>wei</code> for the layer and head chosen above (or their mean): the darker a character,
  the more of its <b>value</b> went into the prediction, relative to the darkest. Hover a character for its weight.</p>
<p>The context is what the model's KV cache held: at most <code>block_size</code> characters; when it is full it
  starts again from the newest half. On the right, the model's ten likeliest next characters there: its softmax at
  temperature 1, and where temperature or top-k changed them, the odds as drawn (logits divided by the temperature,
  all but the top-k likeliest forbidden). The drawn character is marked.</p>
</details>
</header>
<main>
<div id="text" tabindex="0"></div>
<aside><div id="info"></div><table id="odds"></table></aside>
</main>
<!-- The data. wei holds one row of attention weights per written character, layer and head: for written character j
(text index prompt_chars + j), its context is text[start[j] : prompt_chars + j], Tk characters long, and its rows are
n_layer x n_head x Tk bytes, layer by layer, head by head, in text order. Each byte is a weight times 255, rounded so
that every row sums to exactly 255 (each within 1/255 of the model's weight). The rows of all characters, one after
the other, are deflated (zlib) and written in base64. odds[j]: [vocabulary index, probability at temperature 1,
probability as drawn] for the ten likeliest next characters, and the drawn one if it is not among them. -->
<script id="look-data" type="application/json">/*DATA*/</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("look-data").textContent);
const L = D.n_layer, H = D.n_head, P = D.prompt_chars;
const chars = Array.from(D.text), vocab = Array.from(D.vocab); // code points, as the model counts characters
const box = document.getElementById("text"), info = document.getElementById("info");
const oddsTable = document.getElementById("odds"), layerSel = document.getElementById("layer");
const headSel = document.getElementById("head");
let wei = null, current = null, pinned = false, shaded = [];

function glyph(c) { // what a character looks like on its own: a newline, a space or a control made visible
  if (c === "\\n") return "\\u23ce";
  if (c === " ") return "\\u2423";
  const code = c.codePointAt(0);
  return code < 32 ? String.fromCodePoint(0x2400 + code) : c;
}

document.getElementById("about").textContent =
  `${D.about.model} | trained to ${D.about.trained} | ${D.written} characters written after the prompt, ` +
  `${D.about.sampled}`;
for (let l = 0; l < L; l++) layerSel.add(new Option(`${l + 1} of ${L}`, l));
for (let h = 0; h < H; h++) headSel.add(new Option(`${h + 1} of ${H}`, h));
headSel.add(new Option("mean over heads", "mean"));
layerSel.value = L - 1;
headSel.value = "mean";

const spans = chars.map((c, i) => {
  const s = document.createElement("span");
  s.dataset.i = i;
  s.textContent = c === "\\n" || c.codePointAt(0) < 32 ? glyph(c) : c;
  if (c !== glyph(c) && c !== " ") s.classList.add("ctrl");
  if (i < P) s.classList.add("prompt");
  return s;
});
const frag = document.createDocumentFragment();
spans.forEach((s, i) => {
  frag.appendChild(s);
  if (chars[i] === "\\n") frag.appendChild(document.createTextNode("\\n")); // the text keeps its lines
});
box.appendChild(frag);

const offsets = []; // where the rows of written character j begin in wei
for (let j = 0, at = 0; j < D.written; j++) {
  offsets.push(at);
  at += L * H * (P + j - D.start[j]);
}

function row(j) { // the chosen layer's row of wei (or its mean over heads) behind written character j, as numbers
  const tk = P + j - D.start[j], out = new Float64Array(tk), layer = Number(layerSel.value);
  const heads = headSel.value === "mean" ? [...Array(H).keys()] : [Number(headSel.value)];
  for (const h of heads) {
    const at = offsets[j] + (layer * H + h) * tk;
    for (let t = 0; t < tk; t++) out[t] += wei[at + t] / 255 / heads.length;
  }
  return out;
}

function pct(p) { return p >= 0.001 || p === 0 ? `${(100 * p).toFixed(1)}%` : "<0.1%"; }

function select(i) {
  for (const s of shaded) {
    s.style.background = "";
    s.classList.remove("ctx");
    delete s.dataset.w;
    s.removeAttribute("title");
  }
  shaded = [];
  if (current !== null) spans[current].classList.remove("sel");
  current = i;
  spans[i].classList.add("sel");
  const j = i - P;
  oddsTable.replaceChildren();
  if (j < 0) {
    info.textContent = `Character ${i} is part of the prompt: you wrote it, not the model.`;
    return;
  }
  const w = row(j), start = D.start[j], most = Math.max(...w);
  w.forEach((x, t) => {
    const s = spans[start + t];
    s.dataset.w = x;
    s.title = `wei ${x.toFixed(3)}`;
    s.style.background = `rgba(37, 99, 235, ${(0.85 * x / most).toFixed(3)})`;
    s.classList.add("ctx");
    shaded.push(s);
  });
  const rebuilt = j > 0 && D.start[j] > D.start[j - 1] + 1 ? "; the KV cache had just been rebuilt" : "";
  const head = headSel.value === "mean" ? "the mean of its heads" : `head ${Number(headSel.value) + 1}`;
  info.replaceChildren(`Character ${i}, `, Object.assign(document.createElement("b"), {textContent: glyph(chars[i])}),
    `, was predicted from the ${w.length} characters before it${rebuilt}. Shading: layer ` +
    `${Number(layerSel.value) + 1}, ${head}.`);
  const heading = oddsTable.insertRow();
  for (const t of ["next", "at temperature 1", D.changed ? "as drawn" : ""]) {
    if (t) heading.appendChild(Object.assign(document.createElement("th"), {textContent: t}));
  }
  for (const [id, p, pd] of D.odds[j]) {
    const tr = oddsTable.insertRow();
    Object.assign(tr.dataset, {char: vocab[id], p, pd});
    if (vocab[id] === chars[i]) tr.classList.add("drawn");
    tr.insertCell().textContent = glyph(vocab[id]) + (vocab[id] === chars[i] ? " \\u25c0" : "");
    tr.cells[0].className = "ch";
    const bar = tr.insertCell();
    bar.className = "p";
    bar.append(Object.assign(document.createElement("div"), {className: "bar"}));
    bar.firstChild.style.width = `${Math.max(1, 100 * p).toFixed(1)}px`;
    bar.append(pct(p));
    if (D.changed) Object.assign(tr.insertCell(), {className: "num", textContent: pct(pd)});
  }
}

function pick(event, pin) {
  const i = event.target.dataset && event.target.dataset.i;
  if (i === undefined || (pinned && !pin) || Number(i) < P) return;
  pinned = pin ? !(pinned && Number(i) === current) : pinned;
  select(Number(i));
}

async function unpack(b64) { // base64 -> bytes -> inflated (the browser's own DecompressionStream)
  const bin = atob(b64), bytes = new Uint8Array(bin.length);
  for (let k = 0; k < bin.length; k++) bytes[k] = bin.charCodeAt(k);
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

unpack(D.wei).then((bytes) => {
  wei = bytes;
  box.addEventListener("mouseover", (e) => pick(e, false));
  box.addEventListener("click", (e) => pick(e, true));
  for (const sel of [layerSel, headSel]) sel.addEventListener("change", () => select(current));
  document.addEventListener("keydown", (e) => {
    const step = {ArrowLeft: -1, ArrowRight: 1}[e.key];
    if (e.key === "Escape") pinned = false;
    if (!step || e.target.tagName === "SELECT") return;
    e.preventDefault();
    pinned = true;
    select(Math.min(chars.length - 1, Math.max(P, current + step)));
  });
  const asked = Number(location.hash.slice(1));
  select(location.hash && asked >= 0 && asked < chars.length ? asked : D.select);
  document.body.dataset.ready = performance.now().toFixed(1); // ms since the page began to load
}, (error) => {
  info.textContent = `This browser could not unpack the attention (${error}): open the page in a current one.`;
});
</script>
</body>
</html>
"""


if __name__ == "__main__":
    sys.exit(main())
