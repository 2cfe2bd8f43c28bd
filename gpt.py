"""A character-level GPT, written out in one file you can read top to bottom.

It follows the lecture "Let's build GPT: from scratch, in code, spelled out" (A. Karpathy, 2023):
a decoder-only Transformer learns to continue tiny Shakespeare one character at a time, then writes
new "Shakespeare" of its own. The file reads in this order:

    1. hyperparameters   the knobs, each one a line you can edit or override: --name=value
    2. data              download input.txt, characters <-> integers, train/val split, random batches
    3. model             causal self-attention -> feed-forward -> Block -> GPT (with generate)
    4. training          learning-rate schedule, loss estimates, checkpoints, the loop
    5. sampling, main()  write text from a checkpoint; everything with side effects runs from main()

    python gpt.py                          train with the defaults below, then print a sample
    python gpt.py --sample --prompt=ROMEO: write text with the model saved in out/ckpt.pt
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import requests
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------------------------------
# 1. Hyperparameters: edit them here, or override any of them on the command line by name.


@dataclass
class Config:
    # data
    data: str = ""  # a UTF-8 text file to train on; empty: tiny Shakespeare (input.txt beside gpt.py)
    block_size: int = 256  # context length: how many characters the model sees at once
    batch_size: int = 64  # sequences per step (per process; times gradient_accumulation_steps)
    # model
    n_embd: int = 384  # width of the residual stream: every token is a vector of n_embd numbers
    n_head: int = 6  # attention heads per block, each n_embd // n_head wide (the lecture's head_size)
    n_layer: int = 6  # number of Blocks
    dropout: float = 0.2  # share of activations zeroed while training, against overfitting
    fused_attention: bool = True  # PyTorch's fused kernel; False: the formula as plain matrix products
    # training (lecture: constant lr 3e-4, AdamW's default betas and weight decay, no clipping)
    max_iters: int = 5000  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate, reached after the warm-up
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay (= learning_rate: constant)
    warmup_iters: int = 100  # steps of linear warm-up from 0 to learning_rate
    weight_decay: float = 0.1  # AdamW weight decay, on matrices and embeddings only
    beta2: float = 0.99  # AdamW's second-moment decay: 0.99 suits small batches of characters
    grad_clip: float = 1.0  # clip the gradient's global norm to this; 0 turns clipping off
    gradient_accumulation_steps: int = 1  # micro-batches summed into one optimizer step
    eval_interval: int = 500  # estimate train and val loss every this many steps
    eval_iters: int = 200  # batches averaged for each loss estimate
    seed: int = 1337  # fixes the initial weights, the batches, dropout and sampling
    # system
    device: str = "auto"  # auto: cuda if present, then mps (Apple), then cpu; or name one
    dtype: str = "auto"  # auto: bfloat16 on CUDA cards that have it, float16 on older ones, else float32
    compile: bool | None = None  # torch.compile the model; unset: on for CUDA under Linux, off elsewhere
    out_dir: str = "out"  # where ckpt.pt (best val), last.pt (on interrupt) and metrics.jsonl go
    resume: bool = False  # continue from the newest checkpoint in out_dir
    # sampling
    sample: bool = False  # write text from out_dir/ckpt.pt instead of training
    prompt: str = "\n"  # every sample starts with this text
    max_new_tokens: int = 500  # characters to generate per sample
    temperature: float = 1.0  # < 1 sharper, > 1 more adventurous; 0 always takes the likeliest character
    top_k: int | None = None  # sample only among the k likeliest characters (above the vocabulary: all)
    num_samples: int = 1  # how many samples to write


# The lecture's gpt.py, for comparison: batch_size=64 block_size=256 max_iters=5000 eval_interval=500
# learning_rate=3e-4 (constant) eval_iters=200 n_embd=384 n_head=6 n_layer=6 dropout=0.2 -> val 1.48.

# A run that fits a laptop: val 1.73 in about 2 minutes on two CPU cores (README: "What to expect").
CPU_RECIPE = (
    "python gpt.py --device=cpu --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=16"
    " --dropout=0 --max_iters=2000 --learning_rate=2e-3 --min_lr=2e-4 --eval_interval=500 --eval_iters=20"
    " --out_dir=out-cpu"
)


class UserError(Exception):
    """A mistake the user can fix. main() prints it as one line, `error: ...`, and exits with 1."""


def _to_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _to_optional_int(text):
    return None if text.lower() == "none" else int(text)


_to_bool.__name__, _to_optional_int.__name__ = "bool", "int"  # argparse names them in its errors


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its usage and exit 2; we want one line
        names = " ".join(f.name for f in fields(Config))
        raise UserError(f"{message}. Valid names: {names}")


def parse_overrides(argv):
    """--name=value or --name value for every field of Config; booleans also as a bare --name.

    Returns only the names given, so that a checkpoint's settings can fill in the rest."""
    parser = _Parser(prog="gpt.py", allow_abbrev=False, add_help=False)
    for f in fields(Config):
        if f.type in (bool, bool | None):
            parser.add_argument(f"--{f.name}", type=_to_bool, nargs="?", const=True, default=argparse.SUPPRESS)
        else:
            convert = _to_optional_int if f.type == int | None else f.type
            parser.add_argument(f"--{f.name}", type=convert, default=argparse.SUPPRESS)
    return vars(parser.parse_args(argv))


def check_config(cfg):
    """Refuse settings that cannot work, before anything is read or written."""
    for name in ("batch_size", "block_size", "n_embd", "n_head", "n_layer", "max_iters", "eval_interval",
                 "eval_iters", "gradient_accumulation_steps", "max_new_tokens", "num_samples"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd ({cfg.n_embd}) must be divisible by --n_head ({cfg.n_head}): "
                        f"each head gets n_embd // n_head channels")  # fmt: skip
    if not cfg.learning_rate > 0:
        raise UserError(f"--learning_rate must be above 0, got {cfg.learning_rate}")
    if not 0 <= cfg.min_lr <= cfg.learning_rate:
        raise UserError(f"--min_lr must be between 0 and --learning_rate ({cfg.learning_rate}), got {cfg.min_lr}")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    for name in ("warmup_iters", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.beta2 < 1:
        raise UserError(f"--beta2 must be in [0, 1), got {cfg.beta2}")
    if cfg.temperature < 0:
        raise UserError(f"--temperature must be at least 0 (0 means greedy), got {cfg.temperature}")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UserError(f"--top_k must be at least 1 (or none for no limit), got {cfg.top_k}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if not cfg.prompt:
        raise UserError("--prompt must have at least one character (the default is a newline)")
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise UserError(f"--out_dir={cfg.out_dir} is a file; name a folder (it is made if it does not exist)")


# ----------------------------------------------------------------------------------------------------
# 2. Data: the text, its characters as integers, and random batches of windows.

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = Path(__file__).with_name("input.txt")


def download(path, url=DATA_URL, sha256=DATA_SHA256, timeout=30):
    """Fetch tiny Shakespeare into `path`, so that `path` is afterwards either whole and correct, or absent.

    The bytes stream into a temporary file beside `path`, their sha256 is checked, and only then is the
    file renamed into place (a rename within one folder is atomic)."""
    path = Path(path)
    by_hand = f"download {url} by hand and save it as {path}"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            for chunk in response.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise UserError(f"the file from {url} is not tiny Shakespeare (sha256 {digest.hexdigest()[:16]}..., "
                            f"expected {sha256[:16]}...); {by_hand}")  # fmt: skip
        os.chmod(tmp, 0o644)  # mkstemp makes it private to us; a data file or checkpoint need not be
        os.replace(tmp, path)
    except requests.RequestException as e:
        reason = f"HTTP {e.response.status_code}" if e.response is not None else type(e).__name__
        raise UserError(f"could not download tiny Shakespeare from {url} ({reason}); "
                        f"check your connection, or {by_hand}") from None  # fmt: skip
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already when the rename happened


def load_text(data=""):
    """The training text: the file named by --data, or tiny Shakespeare, downloaded on first use."""
    path = Path(data) if data else DEFAULT_DATA
    if not data and not path.exists():
        print(f"downloading tiny Shakespeare to {path}")
        download(path)
    if path.is_dir():
        raise UserError(f"--data={path} is a folder; name a text file")
    if not path.is_file():
        raise UserError(f"--data={path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        f"convert it to UTF-8 first") from None  # fmt: skip
    if not text:
        raise UserError(f"{path} is empty; train on a file with some text in it")
    return text


class CharTokenizer:
    """Characters <-> integers. The vocabulary is the sorted set of characters in the text (65 for tiny
    Shakespeare); it is saved with every checkpoint, since the model only knows these integers."""

    def __init__(self, chars):
        self.chars = chars  # the lecture's itos: integer -> character
        self.stoi = {ch: i for i, ch in enumerate(chars)}  # character -> integer

    @classmethod
    def from_text(cls, text):
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, s):
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            raise UserError(f"characters not in the vocabulary: {' '.join(map(repr, unknown))}")
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def split_data(data):
    """The first 90% of the text to train on, the last 10% to validate on (text the model never trains on)."""
    n = int(0.9 * len(data))
    return data[:n], data[n:]


def get_batch(data, batch_size, block_size, generator):
    """batch_size random windows of the text: inputs x (B,T) and targets y (B,T), y being x shifted by one.

    Position t of a window is a training example with context x[:t+1] and answer y[t], so one window of
    block_size characters holds block_size examples. The windows are gathered in one indexing operation."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator, device=data.device)  # starts
    windows = data[ix[:, None] + torch.arange(block_size + 1, device=data.device)]  # (B,T+1)
    return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------------------------------
# 3. The model.


class CausalSelfAttention(nn.Module):
    """Every position asks a question (query), offers a description of itself (key) and a message
    (value); it then takes in the messages of the positions at or before it, weighted by how well its
    query matches their keys: softmax(Q K^T / sqrt(head_size)) V, done by n_head heads side by side.

    The lecture's Head and MultiHeadAttention modules in one: all heads come out of a single matrix
    product and run as one more batch dimension."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_size = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # query, key, value of all heads
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)  # back into the residual stream
        self.dropout = cfg.dropout
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.fused = cfg.fused_attention
        # tril[i, j] says whether position i may look at position j: only at itself and the past
        self.register_buffer("tril", torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool)),
                             persistent=False)  # fmt: skip

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B,T,C)
        # split the channels into heads: (B,T,C) -> (B,T,nh,hs) -> (B,nh,T,hs), the heads now a batch dim
        q, k, v = (t.view(B, T, self.n_head, self.head_size).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # sampling: the keys and values of earlier positions are kept, not recomputed
            if self in cache:
                past_k, past_v = cache[self]
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B,nh,Tk,hs)
            cache[self] = (k, v)
        Tk = k.size(2)  # keys: T, or more when the cache holds earlier positions
        mask = self.tril[Tk - T : Tk, :Tk]  # (T,Tk): the rows of the T newest positions
        if self.fused:  # one kernel, no (T,Tk) matrix in memory; dropout only while training
            causal = T == Tk
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)  # fmt: skip
        else:  # the same, spelled out as in the lecture
            wei = q @ k.transpose(-2, -1) * self.head_size**-0.5  # (B,nh,T,Tk) affinities, kept at unit variance
            wei = wei.masked_fill(~mask, float("-inf"))  # the future may not talk to the past
            wei = F.softmax(wei, dim=-1)  # each row: weights that sum to 1
            wei = self.attn_dropout(wei)
            y = wei @ v  # (B,nh,T,Tk) @ (B,nh,Tk,hs) -> (B,nh,T,hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B,T,C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """After the tokens have talked (attention), each one thinks on its own: a two-layer MLP, 4x wider inside."""

    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)  # back into the residual stream
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # GELU as in GPT-2 (the lecture: ReLU)


class Block(nn.Module):
    """Communication, then computation. Each sublayer reads a normalised copy of the residual stream x
    (pre-LayerNorm) and adds its result back to it, so gradients flow straight down the sum."""

    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.sa = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.ffwd = FeedForward(cfg)

    def forward(self, x, cache=None):
        x = x + self.sa(self.ln1(x), cache)
        x = x + self.ffwd(self.ln2(x))
        return x


class GPT(nn.Module):
    """Token and position embeddings -> n_layer Blocks -> LayerNorm -> logits for the next character."""

    def __init__(self, vocab_size, cfg):
        super().__init__()
        self.block_size = cfg.block_size
        self.token_embedding_table = nn.Embedding(vocab_size, cfg.n_embd)
        self.position_embedding_table = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size)
        # GPT-2's initialisation: small normal weights; the layers that add into the residual stream
        # are scaled down by sqrt(2 * n_layer), so that the stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None, cache=None, start_pos=0):
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)  # (B,T,C) what each character is
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)
        pos_emb = self.position_embedding_table(pos)  # (T,C) where it is
        x = self.drop(tok_emb + pos_emb)  # (B,T,C)
        for block in self.blocks:
            x = block(x, cache)
        logits = self.lm_head(self.ln_f(x))  # (B,T,vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))  # cross_entropy wants (N,C)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """idx (B,T) continued by max_new_tokens sampled characters: (B,T+max_new_tokens)."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, temperature, top_k, use_cache)], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Yield the next characters (B,1) one at a time: each is sampled from the model's prediction
        after all the characters before it, cropped to the last block_size (there are no positions further).

        Without the cache every step runs the whole context through the model, as in the lecture. With
        it, each layer keeps the keys and values it computed, and a step costs one position. The learned
        position embeddings put one limit on that: when the cache holds block_size positions, the next
        character has no position left, and shifting the window would change every position embedding
        and so every cached key. Then the cache is rebuilt from the newest block_size // 2 characters,
        which start again at position 0. The two ways agree exactly while the text fits in block_size;
        past that the cached one sees between block_size // 2 and block_size characters of context."""
        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            cache, n_cached = {}, 0  # n_cached: positions whose keys and values are in the cache
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits, _ = self(idx[:, -self.block_size :])
                elif n_cached == 0 or n_cached == self.block_size:  # (re)build from the newest characters
                    cache.clear()
                    keep = self.block_size if n_cached == 0 else max(1, self.block_size // 2)  # 1 when block_size is 1
                    context = idx[:, -keep:]
                    logits, _ = self(context, cache=cache)
                    n_cached = context.size(1)
                else:  # only the newest character is new
                    logits, _ = self(idx[:, -1:], cache=cache, start_pos=n_cached)
                    n_cached += 1
                logits = logits[:, -1, :].float()  # (B,vocab_size): the prediction after the last character
                if temperature == 0:
                    idx_next = logits.argmax(dim=-1, keepdim=True)  # greedy
                else:
                    logits = logits / temperature
                    if top_k is not None:  # forbid all but the top_k likeliest (top_k above the vocabulary: all)
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    idx_next = torch.multinomial(probs, num_samples=1)  # (B,1)
                idx = torch.cat((idx, idx_next), dim=1)
                yield idx_next
        finally:
            self.train(was_training)


# ----------------------------------------------------------------------------------------------------
# 4. Training.


def get_lr(step, cfg):
    """Linear warm-up to learning_rate, then half a cosine down to min_lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model, cfg, device_type):
    """AdamW. Weight decay pulls weights toward 0; it suits matrices and embeddings, not biases and norms."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), fused=device_type == "cuda")


def train_step(model, optimizer, scaler, x, y, lr, grad_clip, autocast):
    """One optimizer step on x, y of shape (accum, B, T): the gradients of accum micro-batches are summed
    (each loss divided by accum, so the sum is their mean), clipped, and applied. Returns the last loss.

    Nothing here waits for the GPU: the loss stays a tensor on the device."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    accum = x.size(0)
    for micro in range(accum):
        # with several processes, DDP averages the gradients on the last micro-batch only
        last = micro == accum - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync(), autocast:
            _, loss = model(x[micro], y[micro])
        scaler.scale(loss / accum).backward()  # the scaler multiplies float16 losses up, else it does nothing
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def estimate_loss(model, splits, cfg, generator, autocast, rank=0, world_size=1):
    """The mean loss over eval_iters random batches of each split, with dropout off.

    One batch's loss is noisy; an average over many is what we compare and plot. Each batch is a global
    batch as in training (batch_size x accumulation x processes windows), so the batch generator moves on
    alike however that batch is split: each process takes its share in micro-batches, and the means are
    averaged over all of them."""
    model.eval()
    accum = cfg.gradient_accumulation_steps
    means = []
    for data in splits:
        losses = torch.zeros(cfg.eval_iters, device=data.device)
        for i in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size * accum * world_size, cfg.block_size, generator)
            x = x.reshape(accum, world_size, cfg.batch_size, -1)[:, rank]  # (accum,B,T), as in training
            y = y.reshape(accum, world_size, cfg.batch_size, -1)[:, rank]
            with autocast:
                losses[i] = sum(model(x[m], y[m])[1] for m in range(accum)) / accum
        means.append(losses.mean())
    means = torch.stack(means)
    if world_size > 1:
        dist.all_reduce(means)  # sum over the processes
        means /= world_size
    model.train()
    return means.tolist()


# A card's peak dense matrix throughput in TFLOP/s: (bfloat16/float16, float32 as TF32), for MFU.
PEAK_TFLOPS = {"H200": (989, 494), "H100 PCIe": (756, 378), "H100": (989, 494), "A100": (312, 156),
               "L40S": (362, 183), "L4": (121, 60), "A10": (125, 62), "RTX 4090": (165, 83),
               "RTX 3090": (71, 36), "V100": (125, 15.7), "T4": (65, 8.1)}  # fmt: skip


def peak_flops(device, dtype):
    """The peak FLOP/s of this card in this precision, or None where unknown (CPUs, Apple, other cards)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for card, (half, single) in PEAK_TFLOPS.items():
        if card in name:
            return 1e12 * (single if dtype == torch.float32 else half)
    return None


def flops_per_token(model, cfg):
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's QK^T and AV."""
    n_params = sum(p.numel() for p in model.parameters())
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def resolve_device(name):
    """auto -> cuda, else mps, else cpu; an explicit name must exist on this machine."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda, but this machine has no CUDA GPU; use --device=cpu (or leave it auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={name}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps, but Apple's MPS is not available here; use --device=cpu (or leave it auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device={name} is not supported; use auto, cpu, cuda or mps")
    return device


def resolve_dtype(name, device):
    """Training precision: bfloat16 where the GPU has it (same range as float32, no loss scaling), float16
    with a gradient scaler on older GPUs, float32 on CPU and Apple GPUs."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        # bfloat16 units came with compute capability 8.0 (A100); is_bf16_supported() also says yes to older
        # cards that only emulate it, slowly
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if name != "float32" and device.type != "cuda":
        raise UserError(f"--dtype={name} is for CUDA GPUs; use --dtype=float32 on {device.type}")
    return getattr(torch, name)


def fast_path(cfg, device):
    """The speed-ups, all of which only change anything on a CUDA GPU: the training dtype, an autocast
    context that runs matrix products in it, a gradient scaler (which only acts for float16), TF32 for the
    remaining float32 products, and whether to torch.compile (on CUDA under Linux, unless told)."""
    dtype = resolve_dtype(cfg.dtype, device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda" and sys.platform == "linux"
    return dtype, autocast, scaler, use_compile


def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, flush it to the disk, then rename it over `path`:
    a crash or a full disk halfway leaves the previous checkpoint whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private to us; a data file or checkpoint need not be
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); the previous checkpoint is untouched") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def append_metrics(path, row):
    """One line of JSON per evaluation, for plots and scripts."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); the checkpoints beside it are kept") from None


def load_checkpoint(path):
    """A checkpoint as a dict. weights_only=True lets torch.load build tensors and plain containers only,
    so a file crafted to run code when unpickled is refused instead of run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train first (python gpt.py), or point --out_dir at its folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "config", "vocab", "step"} - set(ckpt)
    except Exception as e:
        raise UserError(f"{path} is not a checkpoint that can be read ({type(e).__name__}): it is truncated, "
                        f"damaged or foreign; delete it or train again") from None  # fmt: skip
    if missing:
        raise UserError(f"{path} is not a checkpoint of this program (no {', '.join(sorted(missing))})")
    return ckpt


def newest_checkpoint(out_dir):
    """last.pt (written on an interrupt) or ckpt.pt (best val so far), whichever is further along."""
    found = [load_checkpoint(p) for p in (Path(out_dir) / "last.pt", Path(out_dir) / "ckpt.pt") if p.exists()]
    if not found:
        raise UserError(f"--resume, but there is no checkpoint in {out_dir}/; train without --resume first")
    return max(found, key=lambda ckpt: ckpt["step"])


def config_from(ckpt, overrides):
    """The checkpoint's settings, with the ones given on the command line on top."""
    known = {f.name for f in fields(Config)}
    return replace(Config(**{k: v for k, v in ckpt["config"].items() if k in known}), **overrides)


def load_model_state(model, ckpt, path):
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:150]  # the first mismatch, not all of them
        raise UserError(f"{path} was saved by a model of another shape ({first}); use the settings it was "
                        f"trained with, or another --out_dir") from None  # fmt: skip


def format_duration(seconds):
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to save and stop after the current step; a second one
    stops at once."""

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signum = signum
        self.restore()

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def setup_distributed(device_name):
    """Under torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK) join the process group, one GPU per
    process: NCCL between GPUs, gloo between CPU processes. A plain `python gpt.py` is rank 0 of 1."""
    if "RANK" not in os.environ:
        return resolve_device(device_name), 0, 1
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device, dist.get_rank(), dist.get_world_size()


def train(overrides, defaults=None, make_model=GPT):
    """Train a model; keep the best one in out_dir/ckpt.pt; print a sample from it at the end."""
    cfg = replace(defaults or Config(), **overrides)
    check_config(cfg)
    out_dir = Path(cfg.out_dir)
    ckpt = newest_checkpoint(out_dir) if cfg.resume else None
    if ckpt:  # the checkpoint's settings (model shape above all), then what the command line changes
        cfg = config_from(ckpt, overrides)
        check_config(cfg)
    device, rank, world_size = setup_distributed(cfg.device)
    master = rank == 0  # only one process prints, writes files and samples
    log = print if master else lambda *args, **kwargs: None
    dtype, autocast, scaler, use_compile = fast_path(cfg, device)

    text = load_text(cfg.data)
    tokenizer = CharTokenizer.from_text(text)
    if ckpt and ckpt["vocab"] != tokenizer.chars:
        raise UserError(f"the checkpoint in {out_dir}/ was trained on a text with another vocabulary; resume "
                        f"on the same text, or train into another --out_dir")  # fmt: skip
    if "prompt" in overrides:  # the final sample starts with it: refuse a bad one now, not after training
        encode_prompt(tokenizer, cfg.prompt)
    # the whole corpus lives on the device (9 MB as int64 for tiny Shakespeare): batches never cross the bus
    train_data, val_data = split_data(torch.tensor(tokenizer.encode(text), dtype=torch.long, device=device))
    if len(val_data) <= cfg.block_size:
        raise UserError(f"{cfg.data or DEFAULT_DATA} has {len(text)} characters: too few for block_size "
                        f"{cfg.block_size}, since its last 10% (validation) needs at least {cfg.block_size + 1}; "
                        f"use a longer text or a smaller --block_size")  # fmt: skip

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = raw_model = make_model(tokenizer.vocab_size, cfg).to(device)
    optimizer = make_optimizer(raw_model, cfg, device.type)
    # one generator for the batches, seeded alike everywhere: all processes draw the same global batch
    batch_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    start_step, best_val, elapsed_before = 0, float("inf"), 0.0
    if ckpt:
        load_model_state(raw_model, ckpt, f"the checkpoint in {out_dir}/")
        optimizer.load_state_dict(ckpt["optimizer"])
        batch_gen.set_state(ckpt["rng"]["batches"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        start_step, best_val, elapsed_before = ckpt["step"], ckpt["best_val"], ckpt["elapsed_s"]
    if not ckpt or rank > 0:  # dropout masks differ between processes (a checkpoint holds rank 0's RNG)
        torch.manual_seed(cfg.seed + rank)

    if use_compile:  # compiles on the first call: the model's Python becomes fused GPU kernels
        model = torch.compile(raw_model)
    try:  # one forward pass, timed: as the model's first call, it also finds out whether compiling works
        forward_s = seconds_per_forward(model, train_data, cfg, autocast, device)
    except Exception as e:
        if not use_compile:
            raise
        log(compile_failed(e))
        use_compile, model = False, raw_model
        forward_s = seconds_per_forward(model, train_data, cfg, autocast, device)
    train_model = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model)  # averages gradients across processes

    accum = cfg.gradient_accumulation_steps
    tokens_per_iter = cfg.batch_size * accum * world_size * cfg.block_size
    flops_per_iter = flops_per_token(raw_model, cfg) * tokens_per_iter
    peak = peak_flops(device, dtype)
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"{n_params / 1e6:.2f}M parameters | device {device} | {str(dtype).removeprefix('torch.')}"
        f" | compile {'on' if use_compile else 'off'} | {world_size} process(es)")  # fmt: skip
    sequences = cfg.batch_size * accum * world_size  # the effective batch
    log(f"batch {cfg.batch_size} x {accum} accumulation x {world_size} process(es) = {sequences} sequences"
        f" of {cfg.block_size} = {tokens_per_iter:,} tokens per iteration")  # fmt: skip

    metrics_path, last_path = out_dir / "metrics.jsonl", out_dir / "last.pt"
    if master:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            rows = metrics_path.read_text().splitlines() if ckpt and metrics_path.exists() else []
            rows = [r for r in rows if json.loads(r)["step"] <= start_step]  # what came after the checkpoint is redone
            metrics_path.write_text("".join(r + "\n" for r in rows))
            if not ckpt:
                last_path.unlink(missing_ok=True)  # an old run's interrupt must not be resumed by mistake
        except OSError as e:
            raise UserError(
                f"cannot write to --out_dir={out_dir} ({e.strerror or e}); name a folder you can write to"
            ) from None

    def checkpoint(step):
        rng = {"torch": torch.get_rng_state(), "batches": batch_gen.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "config": asdict(cfg),
                "vocab": tokenizer.chars, "step": step, "best_val": best_val, "rng": rng,
                "elapsed_s": time.time() - t_start}  # fmt: skip

    if master and not ckpt:  # a run of hours says so before it starts
        projected = forward_s * (
            3 * cfg.max_iters * accum + 2 * cfg.eval_iters * (cfg.max_iters // cfg.eval_interval + 1)
        )  # a training step costs about 3 forward passes (the backward pass about 2), an evaluation 2 x eval_iters
        if projected > 1800:
            log(f"note: this run will take about {format_duration(projected)} on {device}; for a run of minutes "
                f"on a CPU try: {CPU_RECIPE}", flush=True)  # fmt: skip

    stop = StopRequest()
    t_start = time.time() - elapsed_before
    first_bad = torch.tensor(-1, device=device)  # the first step whose loss was not finite, kept on the device
    t_last, step_last, losses = time.time(), start_step, None
    ms_per_iter, eval_s = None, 0.0
    try:
        for step in range(start_step, cfg.max_iters + 1):
            lr = get_lr(step, cfg)
            if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not (ckpt and step == start_step):
                if device.type == "cuda":
                    torch.cuda.synchronize()  # so that the clock measures the steps, not just their launch
                if step > step_last:
                    ms_per_iter = 1000 * (time.time() - t_last) / (step - step_last)
                check_finite(first_bad, out_dir)
                t_eval = time.time()
                losses = estimate_loss(model, (train_data, val_data), cfg, batch_gen, autocast, rank, world_size)
                eval_s = time.time() - t_eval
                report = {"step": step, "train_loss": round(losses[0], 4), "val_loss": round(losses[1], 4),
                          "lr": float(f"{lr:.6g}"), "elapsed_s": round(time.time() - t_start, 2),
                          "ms_per_iter": ms_per_iter and round(ms_per_iter, 2)}  # fmt: skip
                line = f"step {step}/{cfg.max_iters} | train {losses[0]:.4f} | val {losses[1]:.4f} | lr {lr:.1e}"
                if ms_per_iter:
                    tok_s = tokens_per_iter / (ms_per_iter / 1000)
                    line += f" | {ms_per_iter:.1f} ms/it | {tok_s / 1000:.0f}k tok/s"
                    if peak:
                        line += f" | mfu {100 * flops_per_iter / (ms_per_iter / 1000) / peak:.0f}%"
                    steps_left = cfg.max_iters - step
                    eta = steps_left * ms_per_iter / 1000 + steps_left // cfg.eval_interval * eval_s
                    line += f" | eta {format_duration(eta)}"
                log(line, flush=True)
                if master:
                    append_metrics(metrics_path, report)
                    if losses[1] < best_val:
                        best_val = losses[1]
                        save_checkpoint(out_dir / "ckpt.pt", checkpoint(step))
                t_last, step_last = time.time(), step
            if step == cfg.max_iters:
                break
            signum = stop_requested(stop, device, world_size)
            if signum:
                check_finite(first_bad, out_dir)  # never save a model that has already blown up
                if master:
                    save_checkpoint(last_path, checkpoint(step))
                log(f"interrupted at step {step}: saved {last_path}; continue with --resume", flush=True)
                return 128 + signum

            x, y = get_batch(train_data, cfg.batch_size * accum * world_size, cfg.block_size, batch_gen)
            # every process drew the same global batch; this one keeps its share: (accum, world, B, T)[:, rank]
            x = x.reshape(accum, world_size, cfg.batch_size, -1)[:, rank]
            y = y.reshape(accum, world_size, cfg.batch_size, -1)[:, rank]
            try:
                loss = train_step(train_model, optimizer, scaler, x, y, lr, cfg.grad_clip, autocast)
            except Exception as e:  # the backward pass is compiled on the first step, and may fail there
                if not use_compile or step != start_step:
                    raise
                log(compile_failed(e))
                use_compile, model = False, raw_model
                train_model = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
                optimizer.zero_grad(set_to_none=True)
                loss = train_step(train_model, optimizer, scaler, x, y, lr, cfg.grad_clip, autocast)
            # noted on the device, read at the next evaluation: the loop never waits for the GPU between them
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            if step == start_step:  # the first step compiled the training graph: ms/it counts from the next one
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t_last, step_last = time.time(), step + 1

    finally:
        stop.restore()
        if dist.is_initialized():  # under torchrun, even with one process
            dist.destroy_process_group()

    if master:
        last_path.unlink(missing_ok=True)  # the run got past the interrupt it resumed from, if any
        if losses is None:  # resumed a finished run: nothing was evaluated in this one
            losses = estimate_loss(model, (train_data, val_data), cfg, batch_gen, autocast)
        wall = time.time() - t_start
        best = load_checkpoint(out_dir / "ckpt.pt")
        raw_model.load_state_dict(best["model"])
        print(f"\nsample from the best model (step {best['step']}, val {best['best_val']:.4f}):")
        torch.manual_seed(cfg.seed)
        prompt = cfg.prompt if set(cfg.prompt) <= tokenizer.stoi.keys() else text[0]  # a text without newlines
        print_sample(raw_model, tokenizer, prompt, 500, cfg.temperature, cfg.top_k, device)
        print(f"\nfinal: train {losses[0]:.4f} | val {losses[1]:.4f} | best val {best_val:.4f} | "
              f"wall {format_duration(wall)} ({wall:.1f}s) | checkpoint {out_dir / 'ckpt.pt'}")  # fmt: skip
    return 0


@torch.no_grad()
def seconds_per_forward(model, data, cfg, autocast, device):
    """The time of one forward pass over a batch as estimate_loss makes it, measured on the second pass.
    The first one compiles the model for estimate_loss, which then finds it ready."""
    model.eval()
    x, y = get_batch(data, cfg.batch_size, cfg.block_size, torch.Generator(data.device).manual_seed(0))
    for _ in range(2):
        t = time.time()
        with autocast:
            model(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    model.train()
    return time.time() - t


def compile_failed(e):
    """The warning for a machine where torch.compile does not work (no Triton, no C compiler, ...)."""
    first_line = str(e).strip().partition("\n")[0][:120]
    return f"warning: torch.compile failed ({type(e).__name__}: {first_line}); training without it"


def check_finite(first_bad, out_dir):
    step = first_bad.item()  # waits for the GPU: called only where the loop stops anyway (evaluation, a signal)
    if step >= 0:
        raise UserError(f"the loss was not finite at step {step}: training stopped. Likely causes: a learning "
                        f"rate too high (lower --learning_rate, keep --grad_clip on) or too little precision "
                        f"(try --dtype=float32); the last good checkpoint in {out_dir}/ is kept")  # fmt: skip


def stop_requested(stop, device, world_size):
    """The number of the signal that asked us to stop, or 0; with several processes, of one that any of
    them got, so that all stop at the same step. Only the handler writes stop.signum: a signal that comes
    while we wait for the others is then seen at the next step, not overwritten with their 0."""
    if world_size == 1:
        return stop.signum
    flag = torch.tensor(stop.signum, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


# ----------------------------------------------------------------------------------------------------
# 5. Sampling and main().


def encode_prompt(tokenizer, prompt):
    """The prompt as integers; the model knows only the characters of the text it was trained on."""
    try:
        return tokenizer.encode(prompt)
    except UserError as e:
        raise UserError(f"the prompt has {e}; use only characters of the training text") from None


def print_sample(model, tokenizer, prompt, max_new_tokens, temperature, top_k, device):
    """Print the prompt, then each new character as soon as it is sampled."""
    idx = torch.tensor([encode_prompt(tokenizer, prompt)], dtype=torch.long, device=device)  # (1,T)
    print(prompt, end="", flush=True)
    for idx_next in model.stream(idx, max_new_tokens, temperature, top_k):
        print(tokenizer.decode(idx_next[0].tolist()), end="", flush=True)
    print()


def sample(overrides, defaults=None, make_model=GPT):
    """Write num_samples texts from out_dir/ckpt.pt, each starting with the prompt."""
    cfg = replace(defaults or Config(), **overrides)
    check_config(cfg)
    path = Path(cfg.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path)
    cfg = config_from(ckpt, overrides)
    check_config(cfg)
    device = resolve_device(cfg.device)
    tokenizer = CharTokenizer(ckpt["vocab"])
    model = make_model(tokenizer.vocab_size, cfg)
    load_model_state(model, ckpt, path)
    model.to(device)
    torch.manual_seed(cfg.seed)
    for i in range(cfg.num_samples):
        print_sample(model, tokenizer, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, device)
        if i < cfg.num_samples - 1:
            print("---")
    return 0


def main(argv=None, defaults=None, make_model=GPT):
    """python gpt.py [--name=value ...]: train, or with --sample write text. Returns the exit status."""
    try:
        overrides = parse_overrides(sys.argv[1:] if argv is None else argv)
        if overrides.get("sample"):
            return sample(overrides, defaults, make_model)
        return train(overrides, defaults, make_model)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one while sampling
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
