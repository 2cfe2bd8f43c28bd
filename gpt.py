"""A character-level GPT, written out in one file you can read top to bottom.

It follows the lecture "Let's build GPT: from scratch, in code, spelled out" (A. Karpathy, 2023): a decoder-only
Transformer learns to continue tiny Shakespeare one character at a time, then writes new "Shakespeare" of its own.

    PART 1, THE GPT        1. hyperparameters  2. data  3. model  4. training  5. sampling: the lecture, in order
    PART 2, THE MACHINERY  command line, download, checkpoints, devices, several processes, setting up a run,
                           interrupts, progress reports, the KV cache, main(): a first read can stop before it

    python gpt.py                          train with the defaults below, then print a sample
    python gpt.py --sample --prompt=ROMEO: write text with the model saved in out/ckpt.pt
"""

import argparse
import codecs
import contextlib
import hashlib
import inspect
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import requests
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

try:
    import fcntl  # locks out_dir for one training run
except ImportError:  # Windows
    fcntl = None

# ====================================== PART 1, THE GPT ======================================


# ---- 1. Hyperparameters: edit them here, or override any of them on the command line by name.
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
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay (= learning_rate: constant after the warm-up)
    warmup_iters: int = 100  # steps of linear warm-up from 0 to learning_rate
    weight_decay: float = 0.1  # AdamW weight decay, on matrices and embeddings only
    beta2: float = 0.99  # AdamW's second-moment decay: 0.99 suits small batches of characters
    grad_clip: float = 1.0  # clip the gradient's global norm to this; 0 turns clipping off
    gradient_accumulation_steps: int = 1  # micro-batches summed into one optimizer step
    eval_interval: int = 500  # estimate train and val loss every this many steps
    eval_iters: int = 200  # batches averaged for each loss estimate
    eval_sample: int = 80  # characters the model writes at every evaluation, under the progress line; 0: none
    seed: int = 1337  # fixes the initial weights, the batches, dropout and sampling
    # system
    device: str = "auto"  # auto: cuda if present, then mps (Apple), then cpu; or name one
    dtype: str = "auto"  # auto: bfloat16 where the GPU or CPU computes in it, float16 on older GPUs, else float32
    compile: bool | None = None  # torch.compile the model; unset: on for CUDA under Linux, off elsewhere
    out_dir: str = "out"  # where ckpt.pt (best val), last.pt (on interrupt) and metrics.jsonl go
    resume: bool = False  # continue from the newest checkpoint in out_dir
    init_from: str = ""  # fine-tune: a new run that starts from this checkpoint's weights, shape and vocabulary
    # sampling
    sample: bool = False  # write text from out_dir/ckpt.pt instead of training
    prompt: str = "\n"  # every sample starts with this text
    max_new_tokens: int = 500  # characters to generate per sample
    temperature: float = 1.0  # < 1 sharper, > 1 more adventurous; 0 always takes the likeliest character
    top_k: int | None = None  # sample only among the k likeliest characters (above the vocabulary: all)
    num_samples: int = 1  # how many samples to write


# The lecture's gpt.py, for comparison: batch_size=64 block_size=256 max_iters=5000 eval_interval=500
# learning_rate=3e-4 (constant) eval_iters=200 n_embd=384 n_head=6 n_layer=6 dropout=0.2 -> val 1.48.

# A run that fits a laptop: val 1.74 in about 2 minutes on two CPU cores (README: "What to expect"): a smaller
# model, no dropout, a higher learning rate. command_line(CPU_RECIPE) spells it out as the command to type.
CPU_RECIPE = replace(Config(), block_size=64, batch_size=16, n_embd=128, n_head=4, n_layer=4, dropout=0.0)
CPU_RECIPE = replace(CPU_RECIPE, max_iters=2000, learning_rate=2e-3, min_lr=2e-4, eval_iters=20, device="cpu")
CPU_RECIPE = replace(CPU_RECIPE, eval_interval=250, out_dir="out-cpu")  # its own folder: not the default run's


# ---- 2. Data: the text, its characters as integers, and random batches of windows. (Part 2's read_corpus reads a
# text of any size into the same integers with numpy, and downloads tiny Shakespeare on first use.)
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
    windows = data[ix[:, None] + torch.arange(block_size + 1, device=data.device)].long()  # (B,T+1) as int64
    return windows[:, :-1], windows[:, 1:]


def get_share(data, cfg, generator, rank=0, world_size=1):
    """A step's batch, as this process takes it: x, y of shape (accum,B,T), accum micro-batches of batch_size.
    All processes draw the same global batch and keep their share, so the batches do not depend on the split."""
    accum = cfg.gradient_accumulation_steps
    x, y = get_batch(data, cfg.batch_size * accum * world_size, cfg.block_size, generator)
    shares = (accum, world_size, cfg.batch_size, cfg.block_size)  # (accum * world * B, T) -> (accum,world,B,T)
    return x.reshape(shares)[:, rank], y.reshape(shares)[:, rank]


# ---- 3. The model.
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

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B,T,C)
        # split the channels into heads: (B,T,C) -> (B,T,nh,hs) -> (B,nh,T,hs), the heads now a batch dim
        q, k, v = (t.view(B, T, self.n_head, self.head_size).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # sampling: the keys and values of earlier positions join in (Part 2, KVCache)
            k, v = cache.extend(self, k, v)  # (B,nh,Tk,hs)
        Tk = k.size(2)  # the positions attended to: the T of x, or more with a cache
        # tril[i, j] (T,Tk) says whether the i-th of the T newest positions may look at position j: at itself and the
        # past only. The fused kernel needs it only with a cache (is_causal does the rest). The lecture keeps it as a
        # buffer; made here, there is no buffer for DDP to copy between processes at every step.
        tril = None if self.fused and T == Tk else torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T)
        if self.fused:  # one kernel, no (T,Tk) matrix in memory; dropout only while training
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, tril, dropout_p, is_causal=tril is None)
        else:  # the same, spelled out as in the lecture
            wei = q @ k.transpose(-2, -1) * self.head_size**-0.5  # (B,nh,T,Tk) affinities, kept at unit variance
            wei = wei.masked_fill(~tril, float("-inf"))  # the future may not talk to the past
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

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.shape
        start = len(cache) if cache is not None else 0  # with a KV cache, idx continues the cached positions
        tok_emb = self.token_embedding_table(idx)  # (B,T,C) what each character is
        pos_emb = self.position_embedding_table(torch.arange(start, start + T, device=idx.device))  # (T,C) where
        x = self.drop(tok_emb + pos_emb)  # (B,T,C)
        for block in self.blocks:
            x = block(x, cache)
        logits = self.lm_head(self.ln_f(x))  # (B,T,vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))  # cross_entropy wants (N,C)
        return logits, loss


# ---- 4. Training.
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
    """One optimizer step on x, y of shape (accum,B,T): the gradients of accum micro-batches are summed (each
    loss divided by accum: their mean), clipped, and applied. Returns the last loss, still on the device."""
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
def estimate_loss(model, splits, cfg, generator, autocast, rank=0, world_size=1, stop=None):
    """The mean loss over eval_iters random batches of each split, with dropout off: {'train': .., 'val': ..}.

    One batch's loss is noisy; an average over many is what we compare and plot. The batches are drawn as
    training draws them (get_share), and the means are averaged over the processes. A Ctrl-C (stop.signum,
    Part 2) abandons the estimate within a batch: it then returns None, and leaves the generator as it was."""
    if isinstance(model, nn.parallel.DistributedDataParallel):  # no gradients to average: the model inside it,
        model = model.module  # whose forward passes never wait for the other processes
    model.eval()
    out, state = {}, generator.get_state()
    for split, data in splits.items():
        losses = torch.zeros(cfg.eval_iters, device=data.device)
        for i in range(cfg.eval_iters):
            if stop is not None and stop.signum:
                break
            x, y = get_share(data, cfg, generator, rank, world_size)  # (accum,B,T)
            with autocast:
                losses[i] = sum(model(x[m], y[m])[1] for m in range(len(x))) / len(x)
        out[split] = losses.mean()
    gave_up = float(stop is not None and stop.signum > 0)  # 1.0 if a Ctrl-C cut this process's estimate short
    means = torch.stack([*out.values(), torch.tensor(gave_up, device=losses.device)])  # and whether any gave up
    if world_size > 1:
        dist.all_reduce(means)  # sum over the processes
        means /= world_size
    model.train()
    if means[-1] > 0:
        generator.set_state(state)
        return None
    return dict(zip(out, means.tolist(), strict=False))


def train(overrides, defaults=None, make_model=GPT):
    """Train a model; keep the best one in out_dir/ckpt.pt; print a sample from it at the end. What comes
    before the first step (setup) and the reporting (Progress) are machinery, in Part 2: here is the loop."""
    run = setup(overrides, defaults, make_model)
    cfg, model = run.cfg, run.model
    splits = {"train": run.train_data, "val": run.val_data}
    stop = StopRequest(run.world_size, quiet=not run.master)  # Ctrl-C or SIGTERM: stop after this step, and save
    try:
        progress = Progress(run, stop)  # ms/it, tok/s, MFU, ETA, a line of text, metrics.jsonl, a watch on the loss
        for step in range(run.start_step, cfg.max_iters + 1):
            # the learning rate: a linear warm-up, then a cosine decay
            lr = get_lr(step, cfg)

            # evaluate, report and keep the best model: every eval_interval steps, and at the end
            if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and step > run.evaluated_step:
                progress.pause(step)  # the clock stops for the evaluation; a loss gone NaN stops the run here
                losses = estimate_loss(model, splits, cfg, run.batch_gen, run.autocast, run.rank, run.world_size, stop)
                if losses is None:  # a Ctrl-C abandoned it: save this step, to be evaluated when resumed
                    return run.interrupted(step, stop, progress)
                run.evaluated_step = step
                progress.report(step, losses, lr)
                if losses["val"] < run.best_val:
                    run.best_val = losses["val"]
                    run.save("ckpt.pt", step)
                progress.resume(step)  # the clock goes on: ms/it leaves out the evaluation and the save
            if step == cfg.max_iters:
                break

            # Ctrl-C or SIGTERM (to any of the processes): save this step in last.pt and stop
            if stop.requested():
                return run.interrupted(step, stop, progress)

            # a batch: every process draws the same global batch and keeps its share, (accum,B,T)
            x, y = get_share(run.train_data, cfg, run.batch_gen, run.rank, run.world_size)

            # one optimizer step
            loss = train_step(model, run.optimizer, run.scaler, x, y, lr, cfg.grad_clip, run.autocast)
            progress.watch(step, loss)
        leave_process_group(stop)  # all processes are done; rank 0 alone writes the sample
        return run.finish(progress.losses, stop)
    except torch.OutOfMemoryError:
        raise UserError(out_of_memory(cfg)) from None
    finally:
        stop.restore()
        leave_process_group(stop)
        run.unlock()


# ---- 5. Sampling: the model writes, one character at a time.
def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """The next characters (B,1), drawn from the logits (B,vocab_size) of each sequence's last position."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # greedy: always the likeliest
    logits = logits / temperature
    if top_k is not None:  # forbid all but the top_k likeliest (top_k above the vocabulary: all)
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1).cpu()  # drawn on the CPU: cheap for one row, and Apple's MPS has been seen to
    return torch.multinomial(probs, num_samples=1, generator=generator).to(logits.device)  # draw probabilities of 0


@torch.no_grad()
def stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
    """Yield the next characters (B,1) one at a time, each sampled from the model's prediction after all before
    it, for any model with a block_size that maps idx (B,T) to logits (B,T,vocab_size): the GPT, the bigram.
    As in the lecture, each step runs the context, cropped to block_size, through the model; a GPT keeps a KV
    cache instead (Part 2) and feeds it only what the cache lacks, usually the newest character. The random draws
    come from `generator`, or else from torch's default one."""
    was_training = model.training
    model.eval()  # no dropout while sampling
    cache = KVCache(model.block_size) if use_cache and isinstance(model, GPT) else None
    try:
        for _ in range(max_new_tokens):
            if cache is None:
                logits, _ = model(idx[:, -model.block_size :])
            else:
                logits, _ = model(cache.uncached(idx), cache=cache)
            idx_next = sample_next(logits[:, -1, :].float(), temperature, top_k, generator)  # (B,1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next
    finally:
        model.train(was_training)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
    """idx (B,T) continued by max_new_tokens sampled characters: (B,T+max_new_tokens)."""
    return torch.cat([idx, *stream(model, idx, max_new_tokens, temperature, top_k, use_cache)], dim=1)


def print_sample(model, tokenizer, prompt, max_new_tokens, temperature, top_k, device):
    """Print the prompt, then each new character as soon as it is sampled."""
    idx = torch.tensor([encode_prompt(tokenizer, prompt)], dtype=torch.long, device=device)  # (1,T)
    print(prompt, end="", flush=True)
    for idx_next in stream(model, idx, max_new_tokens, temperature, top_k):
        print(tokenizer.decode(idx_next[0].tolist()), end="", flush=True)
    print()


# =================================== PART 2, THE MACHINERY ===================================
# A first read can stop here: the GPT and its training are all above. What follows makes them run first time
# on any machine, and lose nothing.


# ---- The command line: --name=value for every field of Config, checked before anything is read or written.
class UserError(Exception):
    """A mistake the user can fix. main() prints it as one line, `error: ...`, and exits with 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its usage and exit 2; we want one line
        raise UserError(f"{message}. Valid names: {' '.join(action.dest for action in self._actions)}")


def _converter(kind):
    """argparse's converter for a field of this type; bool takes 1/0, true/false, yes/no, on/off, and a field
    that may be unset (int | None) also takes the word none."""
    base = next(t for t in getattr(kind, "__args__", (kind,)) if t is not type(None))  # X of "X | None"
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

    def convert(text):
        if text.lower() == "none" and base is not kind:
            return None
        if base is bool and text.lower() not in words:
            raise ValueError(text)  # argparse reports it: "invalid bool value: 'maybe'"
        return words[text.lower()] if base is bool else base(text)

    convert.__name__ = base.__name__  # argparse names it in its errors: "invalid int value: 'ten'"
    return convert


def parse_overrides(argv, defaults=None):
    """--name=value or --name value for every field of `defaults` (a Config); booleans also as a bare --name.
    Returns only the names given, so that a checkpoint's settings can fill in the rest. -h or --help: every knob."""
    defaults = defaults or Config()
    if "-h" in argv or "--help" in argv:
        print(knob_help(defaults))
        raise SystemExit(0)
    parser = _Parser(allow_abbrev=False, add_help=False)
    for f in fields(defaults):
        flag = {"nargs": "?", "const": True} if f.type in (bool, bool | None) else {}  # a bare --resume: True
        parser.add_argument(f"--{f.name}", type=_converter(f.type), default=argparse.SUPPRESS, **flag)
    return vars(parser.parse_args(argv))


def knob_help(defaults):
    """Every knob with its default and its comment in the class that defines it (Config, or bench.py's own)."""
    script = Path(sys.argv[0]).name if sys.argv[0].endswith(".py") else "gpt.py"
    lines = [f"usage: python {script} [--name=value ...]: any knob below, by its name; a boolean also as --name"]
    for cls in reversed(type(defaults).__mro__[:-1]):  # Config's knobs first
        for line in inspect.getsource(cls).splitlines():
            if knob := re.fullmatch(r"    (\w+): .+?  # (.+)", line):
                value = getattr(defaults, knob[1])
                shown = f"{value:g}" if type(value) is float else value
                shown = repr(shown) if shown == "" or not str(shown).isprintable() else shown  # '' and '\\n'
                lines.append(f"  {f'--{knob[1]}={shown}':<32} {knob[2]}")
            elif section := re.fullmatch(r"    # (.+)", line):
                lines.append(f"{section[1]}:")
    return "\n".join(lines)


def command_line(cfg, script="gpt.py"):
    """The command that runs cfg: `python gpt.py` and --name=value for every setting not at its default."""
    changed = {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != f.default}
    flags = [f"--{k}={v:g}" if type(v) is float else f"--{k}={v}" for k, v in changed.items()]
    return " ".join([f"python {script}", *flags])


def check_config(cfg):
    """Refuse settings that cannot work, before anything is read or written."""
    at_least_1 = "batch_size block_size n_embd n_head n_layer max_iters eval_interval eval_iters"
    for name in [*at_least_1.split(), "gradient_accumulation_steps", "max_new_tokens", "num_samples"]:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        each = "each head gets n_embd // n_head channels"
        raise UserError(f"--n_embd ({cfg.n_embd}) must be divisible by --n_head ({cfg.n_head}): {each}")
    if not cfg.learning_rate > 0:
        raise UserError(f"--learning_rate must be above 0, got {cfg.learning_rate}")
    if not 0 <= cfg.min_lr <= cfg.learning_rate:
        raise UserError(f"--min_lr must be between 0 and --learning_rate ({cfg.learning_rate}), got {cfg.min_lr}")
    for name in ("dropout", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("warmup_iters", "weight_decay", "grad_clip", "eval_sample"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
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


# ---- Files: the download, checkpoints and metrics.jsonl, each written whole or not at all.
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = Path(__file__).with_name("input.txt")


def write_atomically(path, write):
    """write(f) into a temporary file beside `path`, flushed to the disk, then renamed over `path` (a rename
    within a folder is atomic): a crash, a full disk or an error halfway leaves the old file whole."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private to us; a data file or checkpoint need not be
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already when the rename happened


def download(path, url=DATA_URL, sha256=DATA_SHA256, timeout=30):
    """Fetch tiny Shakespeare into `path` and check its sha256: afterwards `path` is whole and right, or absent."""
    by_hand = f"download {url} by hand and save it as {path}"
    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as e:
        reason = f"HTTP {e.response.status_code}" if e.response is not None else type(e).__name__
        advice = f"check your connection, or {by_hand}"
        raise UserError(f"could not download tiny Shakespeare from {url} ({reason}); {advice}") from None
    got = hashlib.sha256(response.content).hexdigest()
    if got != sha256:
        digests = f"sha256 {got[:16]}..., expected {sha256[:16]}..."
        raise UserError(f"the file from {url} is not tiny Shakespeare ({digests}); {by_hand}")
    write_atomically(Path(path), lambda f: f.write(response.content))


def load_text(path=""):
    """The whole training text as one string, for the notebooks (training reads it with read_corpus)."""
    chars, ids = read_corpus(path)
    return CharTokenizer(chars).decode(ids.tolist())


def read_corpus(path="", chars=None, chunk_size=1 << 22):
    """The text at `path`, or tiny Shakespeare: its vocabulary (as CharTokenizer.from_text makes it, or `chars`, a
    checkpoint's) and its ids in the smallest integer type that holds them, counted then encoded a chunk at a time."""
    if not path and not DEFAULT_DATA.exists():
        print(f"downloading tiny Shakespeare to {DEFAULT_DATA}")
        download(DEFAULT_DATA)
    path = Path(path or DEFAULT_DATA)
    if path.is_dir():
        raise UserError(f"--data={path} is a folder; name a text file")
    if not path.is_file():
        raise UserError(f"--data={path}: no such file")
    counts = np.zeros(0x110000, dtype=np.int64)  # how often each Unicode character occurs
    for points in code_points(path, chunk_size):
        found = np.bincount(points)
        counts[: len(found)] += found
    if not counts.any():
        raise UserError(f"{path} is empty; train on a file with some text in it")
    found = "".join(map(chr, np.flatnonzero(counts)))
    missing = sorted(set(found) - set(chars or found))
    if missing:
        shown = " ".join(map(repr, missing[:8])) + (" ..." if len(missing) > 8 else "")
        advice = "use a text without them, or train a new model (no --resume, no --init_from)"
        raise UserError(f"{path} has {len(missing)} character(s) the model never saw: {shown}; {advice}")
    chars = chars or found
    lookup = np.zeros(0x110000, np.uint8 if len(chars) <= 256 else np.int16 if len(chars) <= 2**15 else np.int32)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    ids, start = np.empty(counts.sum(), lookup.dtype), 0
    for points in code_points(path, chunk_size):
        ids[start : start + len(points)] = lookup[points]
        start += len(points)
    return chars, torch.from_numpy(ids)


def code_points(path, chunk_size):
    """The characters of a UTF-8 file as numpy arrays of their Unicode code points, a chunk of the file at a time."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            held = decoder.getstate()[0]  # the first bytes of a character that the last chunk cut in two
            if chunk and not held and chunk.isascii():  # a byte is a character
                yield np.frombuffer(chunk, np.uint8)
            else:
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    where = f"byte {e.object[e.start]:#04x} at offset {offset - len(held) + e.start}"
                    raise UserError(f"{path} is not UTF-8 text ({where}); convert it to UTF-8 first") from None
                yield np.frombuffer(text.encode("utf-32-le"), np.uint32)
            if not chunk:
                return
            offset += len(chunk)


def save_checkpoint(path, state):
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(Path(path), lambda f: torch.save(state, f))
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); the previous checkpoint is untouched") from None


def load_checkpoint(path, hint="point --out_dir at its folder"):
    """A checkpoint as a dict. weights_only=True lets torch.load build tensors and plain containers only,
    so a file crafted to run code when unpickled is refused instead of run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train first (python gpt.py), or {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "config", "vocab", "step"} - set(ckpt)
    except Exception as e:
        damaged = "it is truncated, damaged or foreign; delete it or train again"
        raise UserError(f"{path} is not a checkpoint that can be read ({type(e).__name__}): {damaged}") from None
    if missing:
        raise UserError(f"{path} is not a checkpoint of this program (no {', '.join(sorted(missing))})")
    return ckpt


def newest_checkpoint(out_dir):
    """last.pt (written on an interrupt) or ckpt.pt (best val so far), whichever is further along. A damaged
    one is skipped with a warning while the other is whole; with neither whole, the first one's error."""
    found, damaged = {}, []
    for path in filter(Path.exists, (Path(out_dir) / "last.pt", Path(out_dir) / "ckpt.pt")):
        try:
            found[path] = load_checkpoint(path)
        except UserError as e:
            damaged.append((path, e))
    if damaged and not found:
        raise damaged[0][1]
    if not found:
        raise UserError(f"--resume, but there is no checkpoint in {out_dir}/; train without --resume first")
    newest = max(found, key=lambda path: found[path]["step"])
    for path, _ in damaged:
        print(f"warning: {path} is damaged and cannot be read; resuming from {newest} instead")
        if path.name == "ckpt.pt":  # the next evaluation writes a whole one
            found[newest]["best_val"] = float("inf")
    return found[newest]


def config_from(ckpt, overrides):
    """The checkpoint's settings, with the ones given on the command line on top; not its device: a run goes on on
    the machine it is started on, so that a checkpoint made on a GPU resumes on a laptop (and back)."""
    known = {f.name for f in fields(Config)} - {"device"}
    return replace(Config(**{k: v for k, v in ckpt["config"].items() if k in known}), **overrides)


def load_model_state(model, ckpt, path):
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:150]  # the first mismatch, not all of them
        advice = "use the settings it was trained with, or another --out_dir"
        raise UserError(f"{path} was saved by a model of another shape ({first}); {advice}") from None


def prepare_out_dir(out_dir, resumed_step):
    """Make out_dir and lock it. A resumed run keeps the whole rows of metrics.jsonl up to its step (it redoes the
    rest; a crash may cut a row short); a new run sets an earlier run's files aside and starts metrics.jsonl afresh."""
    metrics = out_dir / "metrics.jsonl"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock, rows, damaged = lock_out_dir(out_dir), [], 0
        if resumed_step is None:
            set_aside(out_dir)
        resumed = resumed_step is not None and metrics.exists()
        for line in metrics.read_text(errors="replace").splitlines() if resumed else []:
            try:
                if json.loads(line)["step"] <= resumed_step:
                    rows.append(line)
            except (ValueError, TypeError, KeyError):
                damaged += 1
        if damaged:
            print(f"warning: dropped {damaged} damaged line(s) of {metrics}, as a crash while writing leaves them")
        write_atomically(metrics, lambda f: f.write("".join(row + "\n" for row in rows).encode()))
    except OSError as e:
        advice = "name a folder you can write to"
        raise UserError(f"cannot write to --out_dir={out_dir} ({e.strerror or e}); {advice}") from None
    return lock


def set_aside(out_dir):
    """A new run in an out_dir that holds an earlier run's model moves that run's files into a folder named by when
    they were last written: --resume can then never take them up, and nothing trained is lost."""
    files = [out_dir / name for name in ("ckpt.pt", "last.pt", "metrics.jsonl") if (out_dir / name).exists()]
    if not any(f.suffix == ".pt" for f in files):
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(f.stat().st_mtime for f in files)))
    folder = Path(tempfile.mkdtemp(prefix=f"earlier-{stamp}-", dir=out_dir))  # a name no other folder has
    for f in files:
        f.rename(folder / f.name)
    names = ", ".join(f.name for f in files)
    print(f"note: {out_dir} held an earlier run; its {names} moved to {folder} (sample it with --out_dir={folder})")


def lock_out_dir(out_dir):
    """One training run per out_dir: an exclusive lock on out_dir/train.lock, which holds the process id. The
    operating system releases it when the process ends, however it ends (kill -9 too). Not on Windows."""
    f = open(out_dir / "train.lock", "a+")  # kept open: closing it releases the lock
    try:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        other = f.read().strip() or "unknown"
        f.close()
        advice = "wait for it to end or stop it, or train into another --out_dir"
        raise UserError(f"--out_dir={out_dir} is in use by another training run (process {other}); {advice}") from None
    f.truncate(0)
    print(os.getpid(), file=f, flush=True)
    return f


# ---- Devices, precision, compiling, and several processes (torchrun starts one per GPU).
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
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():  # cuda:N, N too large
        raise UserError(f"--device={name}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps, but Apple's MPS is not available here; use --device=cpu (or leave it auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device={name} is not supported; use auto, cpu, cuda or mps")
    return device


def precision(cfg, device, seconds_per_step, world_size=1):
    """The training dtype, an autocast context for the matrix products, float16's gradient scaler, and why auto chose
    the dtype. auto: bfloat16 on CUDA cards from compute capability 8.0, float16 on older ones, float32 on Apple's MPS;
    on a CPU, bfloat16 only where it trains this model faster than float32, timed by seconds_per_step(dtype)."""
    if cfg.dtype in ("bfloat16", "float16") and device.type == "mps":
        raise UserError(f"--dtype={cfg.dtype} is not supported on mps here; use --dtype=float32 (or leave it auto)")
    dtype, why = torch.float32 if cfg.dtype in ("auto", "float32") else getattr(torch, cfg.dtype), ""
    if cfg.dtype == "auto" and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if cfg.dtype == "auto" and device.type == "cpu":
        dtype, why = from_rank_0(lambda: cpu_dtype(seconds_per_step), world_size)  # all processes alike
    # float32 matrix products on CUDA in TF32 (several times faster, precise enough to train) unless float32 is named
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.dtype != "float32"
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return dtype, autocast_to(device, dtype), scaler, why


def cpu_dtype(seconds_per_step):
    """On a CPU, bfloat16 where it has the instructions for it and a training step of this model takes less time in it
    than in float32 (measured: that depends on the model's size too), else float32; and why, for the header line."""
    if not cpu_has_bfloat16():
        return torch.float32, " (this CPU has no bfloat16 instructions)"
    float32, bfloat16 = seconds_per_step(torch.float32), seconds_per_step(torch.bfloat16)
    if bfloat16 < float32:
        return torch.bfloat16, f" ({float32 / bfloat16:.1f}x faster than float32 here)"
    return torch.float32, f" (bfloat16 {bfloat16 / float32:.1f}x slower here)"


def cpu_has_bfloat16():
    """Whether this CPU multiplies bfloat16 matrices in hardware (x86's AVX512-BF16 or AMX, which cpuinfo reads off
    the CPU). Elsewhere bfloat16 is emulated, and several times slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast_to(device, dtype):
    return torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()


def synchronize(device):
    """Wait for the device to finish its queued work, so that a clock measures work, not its launch."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def seconds_per_batch(model, data, cfg, device, autocast, train=True):
    """Seconds of a training step's forward and backward pass on one micro-batch (or with train=False, of an evaluation
    batch), the second of two: the first warms up, and compiles where torch.compile is on. The batch is its own and
    fork_rng restores what dropout drew, so training's random numbers are untouched; no gradient is left behind."""
    x, y = get_batch(data, cfg.batch_size, cfg.block_size, torch.Generator(data.device).manual_seed(0))
    model.train(train)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.set_grad_enabled(train):
            for _ in range(2):
                synchronize(device)
                t = time.perf_counter()
                with autocast:
                    _, loss = model(x, y)
                if train:
                    loss.backward()
                synchronize(device)
        return time.perf_counter() - t
    finally:
        model.zero_grad(set_to_none=True)
        model.train()


def compile_model(model, cfg, device, autocast, data, log):
    """model compiled if cfg says so (unset: on CUDA under Linux), whether it is, and the seconds of a step. Compiling
    happens at the first call: tried here by every process, on a batch of its own, so step 0 finds it ready; where it
    fails in any process (no C compiler, no Triton), all of them train without it. Under torchrun model is already in
    DDP, so that Dynamo cuts the graph where DDP's gradient buckets end and the all-reduce overlaps the backward."""
    if not (cfg.compile if cfg.compile is not None else device.type == "cuda" and sys.platform == "linux"):
        return model, False, None
    compiled, failed, seconds = torch.compile(model), None, None  # the model's Python becomes fused kernels
    try:  # no_sync: no gradient travels in the trial, so a process that fails in it leaves no other one waiting
        with model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else contextlib.nullcontext():
            seconds = seconds_per_batch(compiled, data, cfg, device, autocast)
    except Exception as e:
        if any(isinstance(x, torch.OutOfMemoryError) for x in (e, e.__cause__, getattr(e, "inner_exception", None))):
            raise torch.OutOfMemoryError(str(e)) from None  # not compiling's fault: main() gives the advice
        failed = f"{type(e).__name__}: {str(e).strip().partition(chr(10))[0][:120]}"
    if in_any_process(failed is not None, device):
        log(f"warning: torch.compile failed ({failed or 'in another process'}); training without it")
        return model, False, None
    return compiled, True, seconds


def setup_distributed(device_name):
    """Under torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK) join the process group, one GPU per
    process: NCCL between GPUs, gloo between CPU processes. A plain `python gpt.py` is rank 0 of 1."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return device, 0, 1
    if device.type == "cuda" and int(os.environ["LOCAL_WORLD_SIZE"]) > torch.cuda.device_count():
        gpus = f"this machine has {torch.cuda.device_count()} CUDA GPU(s); give torchrun --nproc_per_node at most that"
        raise UserError(f"torchrun started {os.environ['LOCAL_WORLD_SIZE']} processes on this machine, but {gpus}")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device, dist.get_rank(), dist.get_world_size()


def from_rank_0(load, world_size):
    """load() run by rank 0 alone, its result (or its UserError) sent to the other processes: with several
    machines, --resume needs out_dir on the first one's disk only."""
    if world_size == 1:
        return load()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = load()
        except UserError as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]


def in_any_process(flag, device):
    """Whether flag is true in this process or in any other (one verdict for all: none goes on alone)."""
    if not dist.is_initialized():
        return bool(flag)
    flags = torch.tensor(float(flag), device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


def leave_process_group(stop=None):
    if dist.is_initialized():  # under torchrun, even with one process
        if stop is not None and stop.pending is not None:
            stop.pending.wait()  # the last signal numbers that all processes sent each other (StopRequest)
            stop.pending = None
        dist.destroy_process_group()


def out_of_memory(cfg):
    """What to do when the device runs out of memory, in the user's terms."""
    keep = f"lower --batch_size ({cfg.batch_size}) and raise --gradient_accumulation_steps by the same factor"
    smaller = f"lower --block_size ({cfg.block_size}) or --n_embd ({cfg.n_embd})"
    return f"out of memory on the device: {keep} to keep the effective batch, or {smaller}; the checkpoints are kept"


# ---- Setting up a run: one way to build it, for gpt.py and bench.py alike.
class Run:
    """A training run: settings, device, precision, data, model, optimizer, random states (ckpt's when resuming).
    `model` is what training calls: `raw_model` (the plain module, whose weights are saved), compiled, in DDP."""

    def __init__(self, cfg, device, make_model=GPT, ckpt=None, rank=0, world_size=1, check_prompt=True, init=None):
        self.cfg, self.device, self.rank, self.world_size, self.lock = cfg, device, rank, world_size, None
        self.master, self.out_dir = rank == 0, Path(cfg.out_dir)  # only rank 0 prints, writes files and samples
        self.t_start = time.time() - (ckpt["elapsed_s"] if ckpt else 0.0)  # less the time of the runs it continues
        chars, ids = read_corpus(cfg.data, (ckpt or init or {}).get("vocab"))  # a checkpoint's model keeps its own
        self.tokenizer = CharTokenizer(chars)
        if check_prompt:  # the final sample starts with it: refuse a bad one now, not after training
            encode_prompt(self.tokenizer, cfg.prompt)
        first = self.tokenizer.decode([int(ids[0])])  # the samples' prompt where the text has no newline: its start
        self.prompt = cfg.prompt if set(cfg.prompt) <= self.tokenizer.stoi.keys() else first
        # the whole corpus lives on the device, 1 byte per character for tiny Shakespeare: batches never cross the bus
        self.train_data, self.val_data = split_data(ids.to(device))
        if len(self.val_data) <= cfg.block_size:
            why = f"{cfg.block_size}, since its last 10% (validation) needs at least {cfg.block_size + 1}"
            too_few = f"{cfg.data or DEFAULT_DATA} has {len(ids)} characters: too few for block_size {why}"
            raise UserError(f"{too_few}; use a longer text or a smaller --block_size")
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        self.raw_model = make_model(self.tokenizer.vocab_size, cfg).to(device)
        if init:  # fine-tuning: the weights of a trained model, and from here on a new run
            load_model_state(self.raw_model, init, cfg.init_from)
        self.optimizer = make_optimizer(self.raw_model, cfg, device.type)
        data = self.train_data
        trial = lambda dtype: seconds_per_batch(self.raw_model, data, cfg, device, autocast_to(device, dtype))
        self.dtype, self.autocast, self.scaler, self.why = precision(cfg, device, trial, world_size)
        # one generator for the batches, seeded alike everywhere: all processes draw the same global batch
        self.batch_gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.start_step, self.evaluated_step, self.best_val = 0, -1, float("inf")  # evaluated_step: not again
        if ckpt:
            self.restore(ckpt)
        if not ckpt or rank > 0:  # dropout masks differ between processes (a checkpoint holds rank 0's RNG)
            torch.manual_seed(cfg.seed + rank)
        self.model = self.raw_model
        if world_size > 1:  # averages the gradients over the processes after each backward pass
            self.model = nn.parallel.DistributedDataParallel(self.model)
        compiled = compile_model(self.model, cfg, device, self.autocast, self.train_data, self.log)
        self.model, self.compiled, self.step_s = compiled  # step_s: seconds of a micro-batch's forward and backward
        if self.master and self.start_step == 0:  # for the note on a long run (Progress): what a step and a batch take
            data, autocast = self.train_data, self.autocast  # rank 0 alone: the plain model, and no gradients in DDP
            self.step_s = self.step_s or seconds_per_batch(self.raw_model, data, cfg, device, autocast)
            self.eval_s = seconds_per_batch(self.model, data, cfg, device, autocast, train=False)

    def restore(self, ckpt):
        load_model_state(self.raw_model, ckpt, f"the checkpoint in {self.cfg.out_dir}/")
        # AdamW's moments and step count, into this run's optimizer: its settings (weight decay, betas, fused on CUDA),
        # not those saved with the state, which load_state_dict would otherwise put back
        this_run = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": ckpt["optimizer"]["state"], "param_groups": this_run})
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        rng, here = ckpt["rng"], self.device.type
        if rng.get("device", here) == here and rng["batches"].numel() == self.batch_gen.get_state().numel():
            self.batch_gen.set_state(rng["batches"])
        else:  # each kind of device has a generator of its own kind
            self.batch_gen.manual_seed(self.cfg.seed + ckpt["step"])
            saved = f"the checkpoint was saved on {rng.get('device', 'another device')} and resumes on {here}"
            self.log(
                f"warning: {saved}: the batches are drawn afresh and will not replay exactly those of an unbroken run"
            )
        torch.set_rng_state(rng["torch"])
        if here == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.start_step, self.best_val = ckpt["step"], ckpt["best_val"]
        self.evaluated_step = ckpt.get("evaluated_step", ckpt["step"])  # behind the step if a Ctrl-C cut it short

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)

    def save(self, name, step):
        """Everything needed to go on from `step`, saved as out_dir/name by rank 0."""
        if not self.master:
            return
        rng = {"torch": torch.get_rng_state(), "batches": self.batch_gen.get_state(), "device": self.device.type}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": rng}
        state |= {"scaler": self.scaler.state_dict()}  # float16's loss scale: a resumed run goes on with it
        state |= {"config": asdict(self.cfg), "vocab": self.tokenizer.chars, "step": step, "best_val": self.best_val}
        state |= {"evaluated_step": self.evaluated_step, "elapsed_s": time.time() - self.t_start}
        state |= {"world_size": self.world_size}  # a resume with another number says so: the batch changes with it
        save_checkpoint(self.out_dir / name, state)

    def interrupted(self, step, stop, progress):
        """Save last.pt at `step`, say how to go on, and return the exit status of a run stopped by a signal."""
        progress.check_finite()  # never save a model that has already blown up
        self.save("last.pt", step)
        self.log(f"interrupted at step {step}: saved {self.out_dir / 'last.pt'}; continue with --resume", flush=True)
        return 128 + (stop.signum or stop.agreed or signal.SIGTERM)  # the last: another process's, not known yet

    def finish(self, losses, stop):
        """After the last step: the best model writes a sample (Ctrl-C now stops it at once); a line sums the run up."""
        if not self.master:
            return 0
        (self.out_dir / "last.pt").unlink(missing_ok=True)  # the run got past the interrupt it resumed from
        if losses is None:  # resumed a finished run: nothing was evaluated in this one
            splits = {"train": self.train_data, "val": self.val_data}
            losses = estimate_loss(self.model, splits, self.cfg, self.batch_gen, self.autocast)
        wall, cfg = time.time() - self.t_start, self.cfg
        stop.at_once = True  # nothing is left to save: a Ctrl-C from here on stops the sample at once
        best, model = load_checkpoint(self.out_dir / "ckpt.pt"), self.raw_model
        model.load_state_dict(best["model"])
        print(f"\nsample from the best model (step {best['step']}, val {best['best_val']:.4f}):")
        torch.manual_seed(cfg.seed)
        print_sample(model, self.tokenizer, self.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, self.device)
        summary = f"train {losses['train']:.4f} | val {losses['val']:.4f} | best val {self.best_val:.4f}"
        print(f"\nfinal: {summary} | wall {format_duration(wall)} ({wall:.1f}s) | checkpoint {self.out_dir}/ckpt.pt")
        return 0

    def unlock(self):
        if self.lock:
            (self.out_dir / "train.lock").unlink(missing_ok=True)
            self.lock.close()  # the lock goes with it


def say_what_changed(ckpt, cfg, overrides, world_size):
    """A resumed run goes on with the settings given on its command line: one line says which differ from the run's."""
    said = []
    for name, was in ckpt["config"].items():
        if name in overrides and name not in ("device", "resume") and getattr(cfg, name) != was:
            said.append(f"{name} {getattr(cfg, name)} (was {was})")
    if ckpt.get("world_size", world_size) != world_size:
        sequences = world_size * cfg.batch_size * cfg.gradient_accumulation_steps
        said.append(
            f"{world_size} process(es) (was {ckpt['world_size']}): {sequences} sequences a step, same learning rate"
        )
    if said:
        print(f"note: resuming with settings of its own: {', '.join(said)}")


def setup(overrides, defaults=None, make_model=GPT):
    """What train() needs before its first step: the settings (the checkpoint's, when resuming), the
    processes, the run, and out_dir, locked and ready for it."""
    cfg = replace(defaults or Config(), **overrides)
    check_config(cfg)
    device, rank, world_size = setup_distributed(cfg.device)
    ckpt = from_rank_0(lambda: newest_checkpoint(cfg.out_dir), world_size) if cfg.resume else None
    if ckpt:  # the checkpoint's settings (model shape above all), then what the command line changes
        started = ckpt["config"].get("init_from", "")  # a fine-tuning run resumes as itself, not from init_from again
        if overrides.get("init_from", started) != started:
            where = f"from --init_from={started}" if started else "from scratch"
            new_run = "leave out --resume to start a new run from it (in another --out_dir)"
            raise UserError(f"--resume continues the run in {cfg.out_dir}/, which started {where}; {new_run}")
        cfg = config_from(ckpt, {"device": cfg.device, **overrides})
        check_config(cfg)
        if rank == 0:
            say_what_changed(ckpt, cfg, overrides, world_size)
    hint = "name the ckpt.pt of a trained run"
    init = from_rank_0(lambda: load_checkpoint(cfg.init_from, hint), world_size) if cfg.init_from and not ckpt else None
    if init:  # fine-tuning: the model's shape is the checkpoint's, and the command line may not contradict it
        shape = {name: init["config"][name] for name in ("n_layer", "n_head", "n_embd", "block_size")}
        for name, value in shape.items():
            if overrides.get(name, value) != value:
                keep = f"whose {name} is {value}; leave it out: fine-tuning keeps the model's shape"
                raise UserError(f"--{name}={overrides[name]} contradicts --init_from={cfg.init_from}, {keep}")
        cfg = replace(cfg, **shape)
    if rank == 0 and (Path(cfg.out_dir) / "train.lock").exists():  # in use? say so now, not after compiling
        with contextlib.suppress(OSError):  # a folder we cannot write to is refused below, with its own error
            lock_out_dir(Path(cfg.out_dir)).close()
    run = Run(cfg, device, make_model, ckpt, rank, world_size, check_prompt="prompt" in overrides, init=init)
    if run.master:
        run.lock = prepare_out_dir(run.out_dir, ckpt["step"] if ckpt else None)
    return run


# ---- Interrupts: Ctrl-C or SIGTERM stops the run after the current step (or within an evaluation), and it saves.
class StopRequest:
    """The first Ctrl-C (SIGINT) or SIGTERM asks the run to stop: training saves last.pt after the current step, an
    evaluation is abandoned. A second, or one while nothing is left to save (at_once), raises KeyboardInterrupt."""

    def __init__(self, world_size=1, quiet=False):
        self.signum, self.quiet, self.at_once, self.agreed, self.pending = 0, quiet, False, 0, None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self.group = stop_group() if world_size > 1 else None

    def handle(self, signum, frame):
        if self.signum or self.at_once:
            raise KeyboardInterrupt(signum)
        self.signum = signum
        if not self.quiet:  # os.write, not print: the signal may have come in the middle of a print
            ack = "stopping: last.pt is saved after this step (an evaluation is cut short); Ctrl-C again stops at once"
            os.write(2, f"\n{ack}\n".encode())

    def requested(self):
        """The number of the signal that asked us to stop, or 0. With several processes, of one that any of them got:
        each step sends this process's number without waiting and reads what all sent a step before, so that no step
        waits for the others and all stop at the same step. Only the handler writes self.signum."""
        if self.group is None:
            return self.signum
        if self.pending is not None:
            self.pending.wait()
            self.agreed = int(self.flag)
        self.flag = torch.tensor(self.signum)
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return self.agreed

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def stop_group():
    """A gloo group of the processes, on the CPU, for the stop agreement: no GPU waits for it. gloo connects on the
    network interface that the machine's name resolves to; between machines that must be one the others reach."""
    try:
        return dist.new_group(backend="gloo")
    except RuntimeError as e:
        first = str(e).strip().partition("\n")[0][:150]
        advice = "set GLOO_SOCKET_IFNAME to the network interface the machines reach each other on (e.g. eth0)"
        raise UserError(f"the processes could not connect over gloo ({first}): {advice}") from None


# ---- Progress reports: step | train | val | lr | ms/it | tok/s | mfu | eta, and a row of metrics.jsonl.
# A card's peak dense matrix throughput in TFLOP/s (bfloat16/float16, float32 as TF32), for MFU; by the card's name
# as the driver gives it, less the maker, memory and form factor words: "NVIDIA H100 80GB HBM3" is the H100 (SXM).
PEAK_TFLOPS = {"H100": (989, 494, 67), "H200": (989, 494, 67), "GH200": (989, 494, 67), "H100 PCIE": (756, 378, 51)}
PEAK_TFLOPS |= {"H100 NVL": (835, 418, 60), "H200 NVL": (835, 418, 60), "A100": (312, 156, 19.5)}
PEAK_TFLOPS |= {
    "A100 PCIE": (312, 156, 19.5),
    "L40S": (362, 183, 91.6),
    "L40": (181, 90.5, 90.5),
    "L4": (121, 60, 30.3),
}
PEAK_TFLOPS |= {"A10": (125, 62.5, 31.2), "RTX 4090": (165, 83, 82.6), "RTX 3090": (71, 36, 35.6)}
PEAK_TFLOPS |= {"V100": (125, 15.7, 15.7), "V100 PCIE": (112, 14, 14), "T4": (65, 8.1, 8.1)}  # no TF32 before A100


def peak_flops(device, dtype):
    """The peak FLOP/s of this card in this precision, or None where unknown (CPUs, Apple, other cards). float32 runs in
    TF32 unless --dtype=float32 turned it off (precision): then at the plain float32 rate, often 7x slower."""
    words = torch.cuda.get_device_name(device).upper().replace("-", " ").split() if device.type == "cuda" else []
    card = " ".join(w for w in words if not re.fullmatch(r"NVIDIA|TESLA|GEFORCE|\d+GB|HBM\w*|SXM\d*", w))
    column = 0 if dtype != torch.float32 else 1 if torch.backends.cuda.matmul.allow_tf32 else 2
    return 1e12 * PEAK_TFLOPS[card][column] if card in PEAK_TFLOPS else None


def flops_per_token(model, cfg):
    """Training FLOPs per token: 6 per weight of a matrix product (forward 2, backward 4; the embeddings are lookups,
    not products) plus attention's QK^T and AV. 0 for a model without Linear layers: nothing to report an MFU of."""
    weights = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return 6 * weights + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size if weights else 0


def count_evaluations(cfg):
    """A whole run's evaluations: at step 0, every eval_interval steps, and at max_iters if not one of those."""
    return cfg.max_iters // cfg.eval_interval + 1 + (cfg.max_iters % cfg.eval_interval > 0)


def format_duration(seconds):
    s = int(seconds)
    if s >= 3600:
        return f"{s // 86400}d{s % 86400 // 3600}h" if s >= 86400 else f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


NONE = 2**62  # no step: the first step whose loss was not finite, while there is none


class Progress:
    """A run's reports. ms/it times the training steps alone (elapsed_s in metrics.jsonl counts everything). A loss that
    is not finite is noted on the device, without waiting for it, and checked where the loop stops anyway."""

    def __init__(self, run, stop=None):
        self.run, self.stop, cfg, n = run, stop, run.cfg, run.world_size
        sequences = cfg.batch_size * cfg.gradient_accumulation_steps * n  # the effective batch
        self.tokens_per_iter = sequences * cfg.block_size
        self.flops_per_gpu = flops_per_token(run.raw_model, cfg) * self.tokens_per_iter / n  # each GPU's share
        self.peak = peak_flops(run.device, run.dtype) if self.flops_per_gpu else None
        self.first_bad = torch.tensor(NONE, device=run.device)  # the first step whose loss was not finite
        self.losses, self.ms_per_iter, self.eval_s = None, None, 0.0
        n_params, dtype = sum(p.numel() for p in run.raw_model.parameters()), str(run.dtype).removeprefix("torch.")
        compiled, batch = "on" if run.compiled else "off", f"{cfg.batch_size} x {cfg.gradient_accumulation_steps}"
        device = f"device {run.device} | {dtype}{run.why} | compile {compiled}"
        run.log(f"{n_params / 1e6:.2f}M parameters | {device} | {n} process(es)")
        per_iter = f"{sequences} sequences of {cfg.block_size} = {self.tokens_per_iter:,} tokens per iteration"
        run.log(f"batch {batch} accumulation x {n} process(es) = {per_iter}")
        if run.master and run.start_step == 0:
            self.warn_if_long()
        self.t_last, self.step_last = time.time(), run.start_step

    def warn_if_long(self):
        """A run of hours says so before it starts: its steps and evaluations, from the seconds of a training step's
        micro-batch and of an evaluation batch timed at setup (Run)."""
        run, cfg = self.run, self.run.cfg
        batches = cfg.max_iters * run.step_s + 2 * cfg.eval_iters * count_evaluations(cfg) * run.eval_s
        projected = cfg.gradient_accumulation_steps * batches
        if projected > 1800:
            recipe = f"for a run of minutes on a CPU try: {command_line(CPU_RECIPE)}"
            note = f"note: this run will take about {format_duration(projected)} on {run.device}; {recipe}"
            run.log(note, flush=True)

    def watch(self, step, loss):
        """Note the step if its loss is not finite, on the device: the loop does not wait for the GPU."""
        self.first_bad = torch.where(torch.isfinite(loss), self.first_bad, self.first_bad.clamp(max=step))

    def check_finite(self):
        if self.run.world_size > 1:  # a loss gone NaN in one process stops all of them, at the same step
            dist.all_reduce(self.first_bad, op=dist.ReduceOp.MIN)
        step = self.first_bad.item()  # waits for the GPU: called only where the loop stops anyway
        if step < NONE:
            causes = "a learning rate too high (lower --learning_rate, keep --grad_clip on) or too little precision"
            kept = f"(try --dtype=float32); the last good checkpoint in {self.run.out_dir}/ is kept"
            raise UserError(f"the loss was not finite at step {step}: training stopped. Likely causes: {causes} {kept}")

    def pause(self, step):
        """Before an evaluation: the time per step since the last one, a stop if a loss was not finite, and the line
        of text (rank 0), drawn first so that a Ctrl-C that cuts it short also abandons the evaluation after it."""
        synchronize(self.run.device)  # so that the clock measures the steps, not just their launch
        if step > self.step_last:
            self.ms_per_iter = 1000 * (time.time() - self.t_last) / (step - self.step_last)
        self.check_finite()
        self.t_eval = time.time()
        self.text = sample_line(self.run, self.stop) if self.run.master and self.run.cfg.eval_sample else None

    def report(self, step, losses, lr):
        """After an evaluation: the progress line, and the same figures as a row of metrics.jsonl."""
        run, cfg, ms = self.run, self.run.cfg, self.ms_per_iter
        self.losses, self.eval_s = losses, time.time() - self.t_eval
        line = f"step {step}/{cfg.max_iters} | train {losses['train']:.4f} | val {losses['val']:.4f} | lr {lr:.1e}"
        if ms:
            line += f" | {ms:.1f} ms/it | {self.tokens_per_iter / ms:.0f}k tok/s"  # tokens per ms = k tokens per s
            line += f" | mfu {100 * self.flops_per_gpu / (ms / 1000) / self.peak:.0f}%" if self.peak else ""
            left = cfg.max_iters - step
            line += f" | eta {format_duration(left * ms / 1000 + left // cfg.eval_interval * self.eval_s)}"
        run.log(line, flush=True)
        if self.text is not None:  # as a JSON string: newlines show as \n, and it stays on one line
            run.log(f"  {json.dumps(self.text, ensure_ascii=False)}", flush=True)
        row = dict(step=step, train_loss=round(losses["train"], 4), val_loss=round(losses["val"], 4))
        row |= dict(lr=float(f"{lr:.6g}"), elapsed_s=round(time.time() - run.t_start, 2))
        row |= dict(ms_per_iter=ms and round(ms, 2), sample=self.text)
        try:
            if run.master:  # one line of JSON per evaluation, for plots and scripts
                with open(run.out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
        except OSError as e:
            kept = "the checkpoints beside it are kept"
            raise UserError(f"could not write {run.out_dir / 'metrics.jsonl'} ({e.strerror or e}); {kept}") from None

    def resume(self, step):
        """After the evaluation, its report and its checkpoint: the clock of the training steps goes on."""
        self.t_last, self.step_last = time.time(), step


# ---- Sampling with a KV cache, and the --sample command.
class KVCache:
    """The keys and values each attention layer computed for the positions sampled so far: a new character costs one
    position, not a forward pass over the whole context. Full at block_size positions (learned position embeddings
    cannot shift), it is rebuilt from the newest block_size // 2 characters, at positions 0.. again."""

    def __init__(self, block_size):
        self.block_size, self.kv = block_size, {}  # kv: attention layer -> keys, values (B,nh,positions,hs)

    def __len__(self):  # the positions held
        return next(iter(self.kv.values()))[0].size(2) if self.kv else 0

    def uncached(self, idx):
        """What of idx (B,T) the model must see next: the newest character, or after a rebuild a window."""
        if 0 < len(self) < self.block_size:
            return idx[:, -1:]
        keep = self.block_size if len(self) == 0 else max(1, self.block_size // 2)  # 1 when block_size is 1
        self.kv.clear()
        return idx[:, -keep:]

    def extend(self, layer, k, v):
        """layer's new keys and values (B,nh,T,hs) after those it had: (B,nh,Tk,hs)."""
        if layer in self.kv:
            k, v = torch.cat([self.kv[layer][0], k], dim=2), torch.cat([self.kv[layer][1], v], dim=2)
        self.kv[layer] = (k, v)
        return k, v


def sample_line(run, stop=None):
    """A line of the model's own writing at each evaluation: eval_sample characters after the prompt, from a generator
    of its own seeded alike every time (training's random numbers are left alone); a Ctrl-C cuts it short."""
    generator = torch.Generator().manual_seed(run.cfg.seed)  # on the CPU, where sample_next draws
    idx = torch.tensor([encode_prompt(run.tokenizer, run.prompt)], device=run.device)
    text, cfg = run.prompt, run.cfg
    for idx_next in stream(run.raw_model, idx, cfg.eval_sample, cfg.temperature, cfg.top_k, generator=generator):
        text += run.tokenizer.decode(idx_next[0].tolist())
        if stop is not None and stop.signum:
            break
    return text


def encode_prompt(tokenizer, prompt):
    """The prompt as integers; the model knows only the characters of the text it was trained on."""
    try:
        return tokenizer.encode(prompt)
    except UserError as e:
        raise UserError(f"the prompt has {e}; use only characters of the training text") from None


def sample(overrides, defaults=None, make_model=GPT):
    """Write num_samples texts from out_dir/ckpt.pt, each starting with the prompt."""
    cfg = replace(defaults or Config(), **overrides)
    check_config(cfg)
    path = Path(cfg.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path)
    cfg = config_from(ckpt, overrides)
    check_config(cfg)
    device, tokenizer = resolve_device(cfg.device), CharTokenizer(ckpt["vocab"])
    model = make_model(tokenizer.vocab_size, cfg)
    load_model_state(model, ckpt, path)
    model.to(device)
    torch.manual_seed(cfg.seed)
    for i in range(cfg.num_samples):
        print_sample(model, tokenizer, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, device)
        if i < cfg.num_samples - 1:
            print("---")
    return 0


# ---- main(): every side effect starts here, so that tests, notebooks, bigram.py and bench.py import freely.
def main(argv=None, defaults=None, make_model=GPT):
    """python gpt.py [--name=value ...]: train, or with --sample write text. Returns the exit status."""
    try:
        overrides = parse_overrides(sys.argv[1:] if argv is None else argv, defaults)
        return (sample if overrides.get("sample") else train)(overrides, defaults, make_model)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops alike: the first one says why
            print(f"error: {e}", file=sys.stderr)
        leave_process_group()
        return 1
    except torch.OutOfMemoryError:  # while setting up or sampling (training says it with its own settings)
        print(f"error: {out_of_memory(replace(defaults or Config(), **overrides))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one while nothing was left to save
        saved = "nothing new was saved, the checkpoints on disk are whole"
        print(f"\ninterrupted: stopped at once; {saved}", file=sys.stderr)
        return 128 + (e.args[0] if e.args else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
