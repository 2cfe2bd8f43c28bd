"""A character-level GPT, written out in one file you can read top to bottom.

It follows the lecture "Let's build GPT: from scratch, in code, spelled out" (A. Karpathy, 2023): a decoder-only
Transformer learns to continue tiny Shakespeare one character at a time, then writes new "Shakespeare" of its own.

    PART 1, THE GPT        hyperparameters, data, model, training, sampling: the lecture's whole flow, in its order
    PART 2, THE MACHINERY  what a real machine adds around it (command line, files, devices, precision, several
                           processes, interrupts, progress reports): a first read can stop before it

    python gpt.py                          train with the defaults below, then print a sample
    python gpt.py --sample --prompt=ROMEO: write text with the model saved in out/ckpt.pt
    python gpt.py --help                   every knob, with its default
"""

import argparse
import contextlib
import copy
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
    recipe: str = ""  # cpu: start from CPU_RECIPE (a small model that trains in minutes on a laptop), not the defaults
    device: str = "auto"  # auto: cuda if present, then mps (Apple), then cpu; or name one
    dtype: str = "auto"  # auto: bfloat16 on recent GPUs, float16 on older ones; on a CPU bfloat16 where 1.2x faster
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

# A run that fits a laptop, python gpt.py --recipe=cpu: val about 1.74 in about 2 minutes on two CPU cores (README): a
# smaller model, no dropout, a higher learning rate. Any knob given beside --recipe=cpu changes it.
CPU_RECIPE = replace(Config(), recipe="cpu", block_size=64, batch_size=16, n_embd=128, n_head=4, n_layer=4, dropout=0.0)
CPU_RECIPE = replace(CPU_RECIPE, max_iters=2000, learning_rate=2e-3, min_lr=2e-4, eval_iters=20, device="cpu")
CPU_RECIPE = replace(CPU_RECIPE, eval_interval=250, out_dir="out-cpu")  # its own folder: not the default run's


class Machine:
    """What the lesson's functions ask of the machine they run on, a method each, answered at its plainest: one process
    on the CPU, float32, torch's own random numbers, the losses printed, no files, as in the lecture; Config's system
    knobs unread. Part 2's Run answers the same for a real machine: GPUs, precision, processes, checkpoints, Ctrl-C."""

    rank, world_size = 0, 1  # this process, of how many (Part 2: several under torchrun)
    device = torch.device("cpu")  # where the model and the data live (Part 2: --device, a GPU if any)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # float16's loss scaling: off
    start_step, evaluated_step = 0, -1  # the first step, the last evaluated (Part 2: a checkpoint's)

    def __init__(self, batches=None):
        self.batches = batches  # the generator that batches are drawn from; None: torch's own

    def read_text(self, path):
        """The text at `path` (empty: tiny Shakespeare), read whole as in the lecture: a tokenizer of its characters,
        and the text as integers (Part 2: a text of any size, in chunks; a trained model's own vocabulary)."""
        if not path and not DEFAULT_DATA.exists():  # the first time: Part 2 fetches it, and checks its sha256
            print(f"downloading tiny Shakespeare to {DEFAULT_DATA}")
            download(DEFAULT_DATA)
        with open(path or DEFAULT_DATA, encoding="utf-8") as f:
            text = f.read()
        tokenizer = CharTokenizer.from_text(text)
        return tokenizer, torch.tensor(tokenizer.encode(text), dtype=torch.long)

    def prepare(self, model, optimizer, tokenizer, splits, cfg):
        """The model as training calls it: this one, kept (Part 2: a checkpoint's, in its precision, DDP, compiled)."""
        self.model = model
        self.prompt = cfg.prompt  # the sample at the end starts with it (Part 2: checked before training)
        return model

    def forward(self, last=True):
        """The context a forward pass runs in (Part 2: autocast; with several processes, when gradients travel)."""
        return contextlib.nullcontext()

    def evaluate(self, step, estimate):
        """estimate()'s losses, as they are (Part 2: the means over the processes; None if a Ctrl-C cut them short)."""
        return estimate()

    def report(self, step, losses, lr):
        """Print the losses as the lecture does (Part 2: a progress line, metrics.jsonl, ckpt.pt if val is the best)."""
        print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

    def stop_requested(self):
        """Whether to stop after this step: never, Ctrl-C stops at once (Part 2: after a Ctrl-C or SIGTERM)."""
        return False

    def interrupted(self, step):
        """What train() returns if it stops at `step`: the model (Part 2: last.pt saved, and the exit status)."""
        return self.model

    def watch(self, step, loss):
        """Nothing (Part 2: a step whose loss is not finite is noted, and the run stops at the next evaluation)."""

    def best_model(self):
        """The model that writes after training: the last (Part 2: the best, from ckpt.pt; None but in rank 0)."""
        return self.model

    def finish(self):
        """What train() returns at the end: the trained model (Part 2: a line sums the run up; the exit status)."""
        return self.model


PLAIN = Machine()


# ---- 2. Data: the text, its characters as integers, and random batches of windows.
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


def get_batch(data, cfg, run=PLAIN):
    """batch_size random windows of the text: inputs x (B,T) and targets y (B,T), y being x shifted by one.

    Position t of a window is a training example with context x[:t+1] and answer y[t], so one window of
    block_size characters holds block_size examples. With several processes all draw the same windows and each
    keeps its own batch_size of them, so that the batches do not depend on how the work is split."""
    starts = (cfg.batch_size * run.world_size,)
    ix = torch.randint(len(data) - cfg.block_size, starts, generator=run.batches, device=data.device)
    ix = ix[run.rank * cfg.batch_size : (run.rank + 1) * cfg.batch_size]  # this process's share
    windows = data[ix[:, None] + torch.arange(cfg.block_size + 1, device=data.device)].long()  # (B,T+1), gathered
    return windows[:, :-1], windows[:, 1:]


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
        if cache is not None:  # sampling with a KV cache (Part 2): the keys and values of the characters before these
            k, v = cache.extend(self, k, v)  # (B,nh,Tk,hs)
        Tk = k.size(2)  # the positions attended to: T, or with a cache those before them too
        if self.fused:  # the same in one kernel, without the (T,Tk) matrix; is_causal masks as tril below does, and a
            # single new character after a cache (the only other case: a cache is fed one character or a whole window)
            # may look at all of it
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T == Tk)
        else:  # the formula, spelled out as in the lecture
            wei = q @ k.transpose(-2, -1) * self.head_size**-0.5  # (B,nh,T,Tk) affinities, kept at unit variance
            tril = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T)  # each sees itself and the past
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
        first = len(cache) if cache is not None else 0  # with a KV cache, idx continues the positions it holds
        tok_emb = self.token_embedding_table(idx)  # (B,T,C) what each character is
        pos_emb = self.position_embedding_table(torch.arange(first, first + T, device=idx.device))  # (T,C) where
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


def train_step(model, optimizer, data, lr, cfg, run=PLAIN):
    """One optimizer step at learning rate lr: the gradients of gradient_accumulation_steps micro-batches are summed
    (each loss divided by their number: their mean), clipped, and applied. Returns the last loss, on the device."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    accum = cfg.gradient_accumulation_steps
    for micro in range(accum):
        x, y = get_batch(data, cfg, run)
        with run.forward(last=micro == accum - 1):  # with several processes, gradients travel after the last one
            _, loss = model(x, y)
        run.scaler.scale(loss / accum).backward()  # the scaler multiplies float16 losses up, else it does nothing
    if cfg.grad_clip > 0:
        run.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.scaler.step(optimizer)
    run.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def estimate_loss(model, splits, cfg, run=PLAIN):
    """The mean loss over eval_iters random batches of each split, with dropout off: {'train': .., 'val': ..}.
    One batch's loss is noisy; an average over many is what we compare and plot."""
    out = {}
    model.eval()
    for split, data in splits.items():
        losses = torch.zeros(cfg.eval_iters, device=data.device)
        for k in range(cfg.eval_iters):
            # a batch as a training step takes it: gradient_accumulation_steps micro-batches
            with run.forward():
                micro = [model(*get_batch(data, cfg, run))[1] for _ in range(cfg.gradient_accumulation_steps)]
            losses[k] = sum(micro) / len(micro)
        out[split] = losses.mean().item()
    model.train()
    return out


def build(cfg, run=None, make_model=None):
    """The lecture's first steps, on run's device (left out: a plain Machine): the text read, its vocabulary built and
    the text encoded, then split; the model and its optimizer made. run.prepare then fits them to the machine."""
    run = run or Machine()
    # the text, its vocabulary (its characters, sorted; Part 2: a resumed model keeps its own), the text as integers
    tokenizer, data = run.read_text(cfg.data)
    train_data, val_data = split_data(data.to(run.device))  # all of it on the device: no batch crosses a bus
    # the model, the same in every process, and the optimizer that trains it
    torch.manual_seed(cfg.seed)
    model = (make_model or GPT)(tokenizer.vocab_size, cfg).to(run.device)
    optimizer = make_optimizer(model, cfg, run.device.type)
    splits = {"train": train_data, "val": val_data}
    # Part 2: a checkpoint's weights and state, the precision, compiling, DDP; what training calls
    return tokenizer, splits, run.prepare(model, optimizer, tokenizer, splits, cfg), optimizer


def train(cfg, run=None, make_model=None):
    """Train a model, let it write, and return what run.finish() gives. `run` is the machine, each of its calls says
    what it does: left out, a plain Machine (the losses printed, no file; it returns the model); in python gpt.py,
    Part 2's Run, which reports, keeps the best model in out_dir/ckpt.pt, stops on Ctrl-C, returns the exit status."""
    run = run or Machine()  # a plain machine of this run's own: it keeps the model it trains
    tokenizer, splits, model, optimizer = build(cfg, run, make_model)
    for step in range(run.start_step, cfg.max_iters + 1):
        # the learning rate: a linear warm-up, then a cosine decay
        lr = get_lr(step, cfg)

        # every eval_interval steps and at the end: estimate the losses and report them (Part 2: keep the best model)
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and step > run.evaluated_step:
            losses = run.evaluate(step, lambda: estimate_loss(model, splits, cfg, run))  # averaged over processes
            if losses is None:  # Part 2: a Ctrl-C cut it short; save this step, to be evaluated when resumed
                return run.interrupted(step)
            run.report(step, losses, lr)  # printed (Part 2: metrics.jsonl, ckpt.pt if val is the best yet)
        if step == cfg.max_iters:
            break

        # Part 2: Ctrl-C or SIGTERM (to any of the processes): save this step in last.pt and stop
        if run.stop_requested():
            return run.interrupted(step)

        # one optimizer step on random batches of the training text
        loss = train_step(model, optimizer, splits["train"], lr, cfg, run)
        run.watch(step, loss)  # Part 2: a loss that is not finite stops the run at the next evaluation

    # the model writes (Part 2: the best one, from ckpt.pt, by rank 0 alone), and a line sums the run up
    best = run.best_model()
    if best is not None:
        print_sample(best, tokenizer, run.prompt, cfg)
    return run.finish()


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
    come from `generator` (a CPU one), or else from torch's default one."""
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


def print_sample(model, tokenizer, prompt, cfg):
    """Print the prompt, then each of max_new_tokens new characters as soon as it is sampled."""
    device = next(model.parameters()).device
    idx = torch.tensor([encode_prompt(tokenizer, prompt)], dtype=torch.long, device=device)  # (1,T)
    print(prompt, end="", flush=True)
    for idx_next in stream(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k):
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
    """argparse's converter for a field of this type: bool takes 1/0, true/false, yes/no, on/off; X | None also none."""
    base = next(t for t in getattr(kind, "__args__", (kind,)) if t is not type(None))  # X of "X | None"
    words = dict.fromkeys("1 true yes on".split(), True) | dict.fromkeys("0 false no off".split(), False)

    def convert(text):
        if text.lower() == "none" and base is not kind:
            return None
        if base is bool and text.lower() not in words:
            raise ValueError(text)  # argparse reports it: "invalid bool value: 'maybe'"
        return words[text.lower()] if base is bool else base(text)

    convert.__name__ = base.__name__  # argparse names it in its errors: "invalid int value: 'ten'"
    return convert


def parse_overrides(argv, defaults=None):
    """The names given: --name=value, --name value, or a bare --name (a boolean); a checkpoint's fill in the rest."""
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
    usage = f"usage: python {script} [--name=value ...]"
    lines = [f"{usage}: any knob below, by its name; a boolean also as --name"]
    for cls in reversed(type(defaults).__mro__[:-1]):  # Config's knobs first
        for line in inspect.getsource(cls).splitlines():
            if knob := re.fullmatch(r"    (\w+): .+?  # (.+)", line):
                value = getattr(defaults, knob[1])
                shown = f"{value:g}" if type(value) is float else value
                shown = repr(shown) if shown == "" or not str(shown).isprintable() else shown  # '' and '\n'
                lines.append(f"  {f'--{knob[1]}={shown}':<32} {knob[2]}")
            elif section := re.fullmatch(r"    # (.+)", line):
                lines.append(f"{section[1]}:")
    return "\n".join(lines)


def command_line(cfg, script="gpt.py"):
    """The command that runs cfg: `python gpt.py`, its --recipe, and --name=value for every setting that differs."""
    start = starting_point({"recipe": cfg.recipe})
    words = [f"python {script}"]
    if cfg.recipe:
        words.append(f"--recipe={cfg.recipe}")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value != getattr(start, f.name):
            words.append(f"--{f.name}={value:g}" if type(value) is float else f"--{f.name}={value}")
    return " ".join(words)


def starting_point(overrides, defaults=None):
    """What the command line changes: CPU_RECIPE where it says --recipe=cpu, else the script's defaults."""
    return CPU_RECIPE if overrides.get("recipe") == "cpu" else defaults or Config()


def check_config(cfg):
    """Refuse settings that cannot work, before anything is read or written."""
    ones = "batch_size block_size n_embd n_head n_layer max_iters eval_interval eval_iters"
    ones += " gradient_accumulation_steps max_new_tokens num_samples"
    for least, names in {1: ones, 0: "warmup_iters weight_decay grad_clip eval_sample"}.items():
        for name in names.split():
            if getattr(cfg, name) < least:
                raise UserError(f"--{name} must be at least {least}, got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        each = "each head gets n_embd // n_head channels"
        raise UserError(f"--n_embd ({cfg.n_embd}) must be divisible by --n_head ({cfg.n_head}): {each}")
    if not cfg.learning_rate > 0:
        raise UserError(f"--learning_rate must be above 0, got {cfg.learning_rate}")
    if not 0 <= cfg.min_lr <= cfg.learning_rate:
        between = f"between 0 and --learning_rate ({cfg.learning_rate})"
        raise UserError(f"--min_lr must be {between}, got {cfg.min_lr}")
    for name in ("dropout", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.temperature < 0:
        raise UserError(f"--temperature must be at least 0 (0 means greedy), got {cfg.temperature}")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise UserError(f"--top_k must be at least 1 (or none for no limit), got {cfg.top_k}")
    if cfg.recipe not in ("", "cpu"):
        raise UserError(f"--recipe must be cpu (or empty: the defaults), got {cfg.recipe!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if not cfg.prompt:
        raise UserError("--prompt must have at least one character (the default is a newline)")
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        raise UserError(f"--out_dir={cfg.out_dir} is a file; name a folder (it is made if it does not exist)")


def settings(overrides, defaults=None, world_size=1):
    """A run's settings, checked: the defaults, or a checkpoint's (--resume, --sample) but for its device, with the
    command line on top; and that checkpoint, or --init_from's, read by rank 0 and sent to the others."""
    cfg = replace(starting_point(overrides, defaults), **overrides)
    check_config(cfg)
    ckpt = None
    init = None
    if cfg.sample:
        ckpt = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", no_checkpoint_advice(cfg, overrides, defaults))
    elif cfg.resume:
        advice = no_checkpoint_advice(cfg, overrides, defaults)
        ckpt = from_rank_0(lambda: newest_checkpoint(cfg.out_dir, advice), world_size)
        started = ckpt["config"].get("init_from", "")  # a fine-tuning run resumes as itself
        if overrides.get("init_from", started) != started:
            where = f"from --init_from={started}" if started else "from scratch"
            new_run = "leave out --resume to start a new run from it (in another --out_dir)"
            raise UserError(f"--resume continues the run in {cfg.out_dir}/, which started {where}; {new_run}")
    elif cfg.init_from:  # fine-tuning: the model's shape is the checkpoint's
        named = "train first (python gpt.py), or name the ckpt.pt of a trained run"
        init = from_rank_0(lambda: load_checkpoint(cfg.init_from, named), world_size)
        shape = {name: init["config"][name] for name in ("n_layer", "n_head", "n_embd", "block_size")}
        for name, value in shape.items():
            if overrides.get(name, value) != value:
                keep = f"whose {name} is {value}; leave it out: fine-tuning keeps the model's shape"
                raise UserError(f"--{name}={overrides[name]} contradicts --init_from={cfg.init_from}, {keep}")
        cfg = replace(cfg, **shape)
    if ckpt:
        saved = {k: v for k, v in ckpt["config"].items() if k in {f.name for f in fields(Config)}}
        cfg = replace(Config(), **(saved | overrides | {"device": cfg.device}))
        check_config(cfg)
    return cfg, ckpt, init


def no_checkpoint_advice(cfg, overrides, defaults):
    """What to type when out_dir holds no checkpoint to --sample or --resume from; where gpt.py's starting point
    chose out_dir (not the command line, not bigram.py) and the other one's folder holds one, the flag to reach it."""
    recipe = cfg.recipe == "cpu"
    other = Config() if recipe else CPU_RECIPE  # the defaults' out/, or the CPU recipe's out-cpu/
    names = ["ckpt.pt"] if cfg.sample else ["last.pt", "ckpt.pt"]
    found = any((Path(other.out_dir) / name).is_file() for name in names)
    if found and defaults is None and "out_dir" not in overrides:
        whose = "the default run's" if recipe else "the CPU recipe's"
        flag = "leave out --recipe=cpu" if recipe else "add --recipe=cpu"
        return f"{whose} is in {other.out_dir}/; {flag} to use it"
    if not cfg.sample:
        return "train without --resume first"
    if defaults is not None:  # bigram.py's: its own script trains it
        return "train first, or point --out_dir at its folder"
    return f"train first (python gpt.py{' --recipe=cpu' if recipe else ''}), or point --out_dir at its folder"


def say_what_changed(ckpt, cfg, overrides, world_size):
    """A resumed run goes on with the settings given on its command line: one line says which differ from the run's."""
    given = {k: getattr(cfg, k) for k in overrides.keys() - {"device", "resume", "out_dir"}}
    said = [f"{k} {given[k]} (was {v})" for k, v in ckpt["config"].items() if k in given and given[k] != v]
    if ckpt.get("world_size", world_size) != world_size:
        sequences = f"{world_size * cfg.batch_size * cfg.gradient_accumulation_steps} sequences a step"
        said.append(f"{world_size} process(es) (was {ckpt['world_size']}): {sequences}, same learning rate")
    if said:
        print(f"note: resuming with settings of its own: {', '.join(said)}")


# ---- Files: the download, the text, checkpoints and out_dir, each written whole or not at all.
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


@contextlib.contextmanager
def disk_errors(what, then="name a folder you can write to"):
    """An OSError within (a full disk, a folder that cannot be written to) as `{what} ({its reason}); {then}`."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{what} ({e.strerror or e}); {then}") from None


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
    """The whole training text as one string, for the notebooks (python gpt.py reads it with read_corpus)."""
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
    dtype = np.uint8 if len(chars) <= 256 else np.int16 if len(chars) <= 2**15 else np.int32
    lookup = np.zeros(0x110000, dtype)  # code point -> id
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    ids = np.empty(counts.sum(), dtype)
    start = 0
    for points in code_points(path, chunk_size):
        ids[start : start + len(points)] = lookup[points]
        start += len(points)
    return chars, torch.from_numpy(ids)


def code_points(path, chunk_size):
    """The characters of a UTF-8 file as numpy arrays of their Unicode code points, chunk_size characters at a time."""
    with open(path, encoding="utf-8", newline="\n") as f:  # newline="\n": no newline translated, "\r\n" as is
        try:
            while text := f.read(chunk_size):
                if text.isascii():  # a character is a byte
                    yield np.frombuffer(text.encode("ascii"), np.uint8)
                else:
                    yield np.frombuffer(text.encode("utf-32-le"), np.uint32)
        except UnicodeDecodeError as e:
            # e.object: the bytes being decoded (with any held over from the last read), which end where f.buffer is
            offset = f.buffer.tell() - len(e.object) + e.start
            where = f"byte {e.object[e.start]:#04x} at offset {offset}"
            raise UserError(f"{path} is not UTF-8 text ({where}); convert it to UTF-8 first") from None


def save_checkpoint(path, state):
    with disk_errors(f"could not write {path}", "the previous checkpoint is untouched"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path, advice="train first (python gpt.py), or point --out_dir at its folder"):
    """A checkpoint as a dict. weights_only=True: a file crafted to run code when unpickled is refused, not run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: {advice}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "config", "vocab", "step"} - set(ckpt)
    except Exception as e:
        cannot = f"{path} is not a checkpoint that can be read ({type(e).__name__})"
        raise UserError(f"{cannot}: it is truncated, damaged or foreign; delete it or train again") from None
    if missing:
        raise UserError(f"{path} is not a checkpoint of this program (no {', '.join(sorted(missing))})")
    return ckpt


def newest_checkpoint(out_dir, advice):
    """last.pt (written on an interrupt) or ckpt.pt (best val so far), whichever is whole and further along."""
    found, damaged = {}, []
    for path in filter(Path.exists, (Path(out_dir) / "last.pt", Path(out_dir) / "ckpt.pt")):
        try:
            found[path] = load_checkpoint(path)
        except UserError as e:
            damaged.append((path, e))
    if damaged and not found:
        raise damaged[0][1]
    if not found:
        raise UserError(f"--resume, but there is no checkpoint in {out_dir}/; {advice}")
    newest = max(found, key=lambda path: found[path]["step"])
    for path, _ in damaged:
        print(f"warning: {path} is damaged and cannot be read; resuming from {newest} instead")
        if path.name == "ckpt.pt":  # the next evaluation writes a whole one
            found[newest]["best_val"] = float("inf")
    return found[newest]


def load_weights(model, ckpt, path):
    """The checkpoint's weights into model: resuming, fine-tuning, sampling and the final sample all load them so."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:150]  # the first mismatch, not all of them
        advice = "use the settings it was trained with, or another --out_dir"
        raise UserError(f"{path} was saved by a model of another shape ({first}); {advice}") from None
    return model


def prepare_out_dir(out_dir, resumed_step, lock=None):
    """Make out_dir and lock it (unless `lock` holds it already). A resumed run keeps the whole rows of metrics.jsonl up
    to its step (it redoes the rest; a crash may cut a row short); a new run sets an earlier run's files aside."""
    metrics = out_dir / "metrics.jsonl"
    with disk_errors(f"cannot write to --out_dir={out_dir}"):
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = lock or lock_out_dir(out_dir)
        rows = []
        damaged = 0
        if resumed_step is None:
            set_aside(out_dir)
        elif metrics.exists():
            for line in metrics.read_text(errors="replace").splitlines():
                try:
                    if json.loads(line)["step"] <= resumed_step:
                        rows.append(line)
                except (ValueError, TypeError, KeyError):
                    damaged += 1
        if damaged:
            why = "as a crash while writing leaves them"
            print(f"warning: dropped {damaged} damaged line(s) of {metrics}, {why}")
        write_atomically(metrics, lambda f: f.write("".join(row + "\n" for row in rows).encode()))
    return lock


def set_aside(out_dir):
    """A new run moves an earlier run's files to out_dir/earlier-<when last written>-*/, out of --resume's way."""
    files = [out_dir / name for name in ("ckpt.pt", "last.pt", "metrics.jsonl") if (out_dir / name).exists()]
    if not any(f.suffix == ".pt" for f in files):
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(f.stat().st_mtime for f in files)))
    folder = Path(tempfile.mkdtemp(prefix=f"earlier-{stamp}-", dir=out_dir))  # a name no other folder has
    for f in files:
        f.rename(folder / f.name)
    names = ", ".join(f.name for f in files)
    sample = f"sample it with --out_dir={folder}"
    print(f"note: {out_dir} held an earlier run; its {names} moved to {folder} ({sample})")


def lock_out_dir(out_dir):
    """One training run per out_dir: an exclusive lock on out_dir/train.lock, which holds the process id. The
    operating system releases it when the process ends, however it ends (kill -9 too). Not on Windows."""
    with disk_errors(f"cannot write to --out_dir={out_dir}"):  # Run calls it before prepare_out_dir, too
        f = open(out_dir / "train.lock", "a+")  # kept open: closing it releases the lock
        try:
            if fcntl:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            other = f.read().strip() or "unknown"
            f.close()
            in_use = f"--out_dir={out_dir} is in use by another training run (process {other})"
            advice = "wait for it to end or stop it, or train into another --out_dir"
            raise UserError(f"{in_use}; {advice}") from None
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
    instead = "use --device=cpu (or leave it auto)"
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device=cuda, but this machine has no CUDA GPU; {instead}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():  # cuda:N, N too large
        raise UserError(f"--device={name}, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device=mps, but Apple's MPS is not available here; {instead}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device={name} is not supported; use auto, cpu, cuda or mps")
    return device


def precision(cfg, device, seconds_per_step, world_size=1):
    """The training dtype, an autocast context, float16's gradient scaler, and why auto chose the dtype: bfloat16 on
    CUDA from compute capability 8.0, else float16; float32 on Apple's MPS; on a CPU, cpu_dtype's choice."""
    if cfg.dtype in ("bfloat16", "float16") and device.type == "mps":
        instead = "use --dtype=float32 (or leave it auto)"
        raise UserError(f"--dtype={cfg.dtype} is not supported on mps here; {instead}")
    dtype, why = torch.float32 if cfg.dtype in ("auto", "float32") else getattr(torch, cfg.dtype), ""
    if cfg.dtype == "auto" and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if cfg.dtype == "auto" and device.type == "cpu":
        dtype, why = from_rank_0(lambda: cpu_dtype(seconds_per_step), world_size)  # all processes alike
    # float32 matrix products on CUDA in TF32 (several times faster, precise enough to train) unless float32 is named
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.dtype != "float32"
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return dtype, autocast_to(device, dtype), scaler, why


CLEARLY_FASTER = 1.2  # bfloat16 changes the numerics: on a CPU auto takes it only for at least this speed-up


def cpu_dtype(seconds_per_step):
    """precision's choice on a CPU (the gain depends on the model's size too), and why, for the header line.
    float32 is timed first, so that a long run's note comes before bfloat16's trial (as long again)."""
    if not cpu_has_bfloat16():
        return torch.float32, " (this CPU has no bfloat16 instructions)"
    float32 = seconds_per_step(torch.float32)
    bfloat16 = seconds_per_step(torch.bfloat16)
    float32 = min(float32, seconds_per_step(torch.float32))  # again: the first window may still be warming up
    speedup = float32 / bfloat16
    if speedup >= CLEARLY_FASTER:
        return torch.bfloat16, f" ({speedup:.1f}x faster than float32 here)"
    if speedup > 1 / CLEARLY_FASTER:
        return torch.float32, f" (bfloat16 about as fast here: {speedup:.2f}x)"
    return torch.float32, f" (bfloat16 {1 / speedup:.1f}x slower here)"


def cpu_has_bfloat16():
    """Whether this CPU multiplies bfloat16 in hardware (x86's AVX512-BF16 or AMX); elsewhere it is emulated, slow."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast_to(device, dtype):
    return torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()


def synchronize(device):
    """Wait for the device to finish its queued work, so that a clock measures work, not its launch."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def seconds_per_batch(model, cfg, run, autocast, train=True, timed=3):
    """Seconds of a micro-batch's forward and backward (train=False: an evaluation batch's forward), the least of
    `timed` passes after one that warms up and compiles; like seconds_per_step, it leaves training as it was."""
    state, seconds = run.batches.get_state(), []
    x, y = get_batch(run.splits["train"], cfg, run)
    run.batches.set_state(state)
    model.train(train)
    try:
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            for _ in range(1 + timed):  # each pass ends synchronized, so the next one's clock starts clean
                t = time.perf_counter()
                with autocast, torch.set_grad_enabled(train):
                    _, loss = model(x, y)
                if train:
                    loss.backward()
                synchronize(run.device)
                seconds.append(time.perf_counter() - t)
        return min(seconds[1:])
    finally:
        model.zero_grad(set_to_none=True)
        model.train()


class Trial(Machine):
    """The machine of a timed training step: one process's batch, in autocast's precision, no loss scaling."""

    def __init__(self, batches, autocast):
        super().__init__(batches)
        self.autocast = autocast

    def forward(self, last=True):
        return self.autocast


def seconds_per_step(model, optimizer, cfg, run, autocast, steps=10, window=1.0):
    """Seconds of a train_step, after one that warms up (AdamW makes its moments, the allocator its pools): the mean
    of `steps`, as bench.py times them, or of fewer that fill `window` seconds (at least one). Training goes on as
    if they had not been: the weights, AdamW's state, the random numbers and the batch generator are put back."""
    weights = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(optimizer.state_dict())
    batches = run.batches.get_state()
    trial = Trial(run.batches, autocast)
    try:
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            train_step(model, optimizer, run.splits["train"], cfg.learning_rate, cfg, trial)  # the warm-up
            synchronize(run.device)
            t = time.perf_counter()
            timed = 0
            while timed < steps and time.perf_counter() - t < window:
                train_step(model, optimizer, run.splits["train"], cfg.learning_rate, cfg, trial)
                timed += 1
            synchronize(run.device)
            return (time.perf_counter() - t) / timed
    finally:
        model.load_state_dict(weights)
        optimizer.load_state_dict(moments)
        run.batches.set_state(batches)


def compile_model(model, cfg, run):
    """model compiled if cfg says so (unset: on CUDA under Linux), and a micro-batch's seconds, or None. Every process
    tries it here, so that step 0 finds it done; where any fails (no C compiler, no Triton), all train without it.
    In DDP, Dynamo cuts the graph where the gradient buckets end, so that their all-reduce overlaps the backward."""
    default = run.device.type == "cuda" and sys.platform == "linux"
    if not (default if cfg.compile is None else cfg.compile):
        return model, None
    compiled = None
    failed = None
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    try:
        compiled = torch.compile(model)  # fused kernels from the model's Python; raises on a Python too new
        with model.no_sync() if ddp else contextlib.nullcontext():  # no gradient travels: none left waiting
            seconds = seconds_per_batch(compiled, cfg, run, run.autocast)
    except Exception as e:
        inner = getattr(e, "inner_exception", None)  # what failed inside the compiler, where Dynamo wraps it
        if any(isinstance(x, torch.OutOfMemoryError) for x in (e, e.__cause__, inner)):
            raise torch.OutOfMemoryError(str(e)) from None  # not compiling's fault: main() gives the advice
        if compiled is not None and not compiler_failure(e):
            raise  # a CUDA or NCCL error, say: training without compiling would meet it too
        failed = f"{type(inner or e).__name__}: {str(inner or e).strip().partition(chr(10))[0][:120]}"
    if dist.is_initialized():  # one verdict for all processes, so that none goes on alone
        anywhere = torch.tensor(float(failed is not None), device=run.device)
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
        failed = failed or ("in another process" if anywhere.item() else None)
    if failed is not None:
        run.log(f"warning: torch.compile failed ({failed}); training without it")
        return model, None
    return compiled, seconds


def compiler_failure(e):
    """Whether e is torch.compile's own failure (no C compiler, no Triton, a model it cannot trace): Dynamo raises
    its errors, or wraps the compiler's; Inductor's and Triton's own may come from a backward pass compiled late."""
    mine = type(e).__module__.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "triton"))
    return mine or isinstance(e, torch._dynamo.exc.TorchDynamoException)


def setup_distributed(device_name):
    """Under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK) join the process group, one GPU each; else rank 0 of 1."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return device, 0, 1
    needed = ["LOCAL_RANK", "LOCAL_WORLD_SIZE"] if device.type == "cuda" else []  # which GPU, of how many
    missing = [name for name in needed if name not in os.environ]
    if missing:
        launcher = "start the processes with torchrun, which sets them all"
        raise UserError(f"RANK is set, as torchrun sets it, but not {', '.join(missing)}: {launcher}")
    if device.type == "cuda" and int(os.environ["LOCAL_WORLD_SIZE"]) > torch.cuda.device_count():
        started = f"torchrun started {os.environ['LOCAL_WORLD_SIZE']} processes on this machine"
        gpus = f"this machine has {torch.cuda.device_count()} CUDA GPU(s)"
        raise UserError(f"{started}, but {gpus}; give torchrun --nproc_per_node at most that")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device, dist.get_rank(), dist.get_world_size()


def from_rank_0(load, world_size):
    """load() run by rank 0 alone, its result sent to the other processes (its UserError raised by all): with
    several machines, --resume needs out_dir on the first one's disk only."""
    if world_size == 1:
        return load()
    box = [None]
    with all_or_none(world_size):
        if dist.get_rank() == 0:
            box[0] = load()
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def all_or_none(world_size):
    """Around what rank 0 alone does (lock out_dir, write a file): a UserError raised within by any process is raised by
    all of them at its end, so that none is left waiting in a collective for one that has stopped."""
    error = None
    try:
        yield
    except UserError as e:
        error = e
    if world_size > 1:
        errors = [None] * world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error


def leave_process_group(stop=None):
    if dist.is_initialized():  # under torchrun, even with one process
        if stop is not None and stop.pending is not None:
            stop.pending.wait()  # the last signal numbers that all processes sent each other (StopRequest)
            stop.pending = None
        dist.destroy_process_group()


def out_of_memory(cfg, began=True):
    """What to do when the device runs out of memory; began=False: before Run.prepare fitted the model to it."""
    if not began:
        whole = "is put on the device whole, and with the model it does not fit"
        text = f"the text ({cfg.data or DEFAULT_DATA}) {whole}"
        advice = "train on a shorter text, or on a device with more memory"
        return f"out of memory on the device before training began: {text}; {advice}"
    keep = f"lower --batch_size ({cfg.batch_size}) and raise --gradient_accumulation_steps by the same factor"
    smaller = f"lower --block_size ({cfg.block_size}) or --n_embd ({cfg.n_embd}); the checkpoints are kept"
    return f"out of memory on the device: {keep} to keep the effective batch, or {smaller}"


# ---- A run: the machine around the lesson's train(), for gpt.py and bench.py alike.
class Run(Machine):
    """A training run on a real machine, used as `with Run(...) as run:`: the settings (a checkpoint's when resuming),
    device, precision and processes, out_dir and its checkpoints, Ctrl-C, and the reports. `model` is what training
    calls: `raw_model` (whose weights are saved) in DDP and compiled."""

    def __init__(self, overrides, defaults=None, files=True):
        device = overrides.get("device", starting_point(overrides, defaults).device)  # never a checkpoint's
        self.device, self.rank, self.world_size = setup_distributed(device)
        self.cfg, self.ckpt, self.init = settings(overrides, defaults, self.world_size)
        self.master = self.rank == 0  # rank 0 alone prints and writes
        self.files = files
        self.overrides = overrides
        self.out_dir = Path(self.cfg.out_dir)
        self.lock = None
        self.stop = None
        self.noted = False  # whether the note on a long run was given
        self.best_val = float("inf")  # restore() puts back a checkpoint's
        self.losses = None  # the last evaluation's, for the final line
        self.ms_per_iter = None  # none until some training steps are timed
        self.text = None  # the line of text written at the last evaluation
        self.vocab = (self.ckpt or self.init or {}).get("vocab")  # a trained model keeps its own vocabulary
        self.t_start = time.time() - (self.ckpt["elapsed_s"] if self.ckpt else 0.0)  # the runs it continues
        if self.ckpt and self.master:
            say_what_changed(self.ckpt, self.cfg, overrides, self.world_size)
        with all_or_none(self.world_size):  # out_dir in use? say so now in every process, not after compiling
            if self.master and files and self.out_dir.is_dir():
                self.lock = lock_out_dir(self.out_dir)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if self.stop is not None:
            self.stop.restore()
        leave_process_group(self.stop)
        if self.lock:
            (self.out_dir / "train.lock").unlink(missing_ok=True)
            self.lock.close()  # the lock goes with it
        if isinstance(error, torch.OutOfMemoryError):
            began = getattr(self, "splits", None) is not None  # without splits: the text or the model's
            raise UserError(out_of_memory(self.cfg, began=began)) from None

    def read_text(self, path):
        chars, data = read_corpus(path, self.vocab)
        return CharTokenizer(chars), data

    def prepare(self, model, optimizer, tokenizer, splits, cfg):
        """The model fitted to this machine; then out_dir, the Ctrl-C handler, the header and a long run's note."""
        device, master = self.device, self.master
        self.raw_model = model
        self.optimizer = optimizer
        self.tokenizer = tokenizer
        self.splits = splits
        self.prompt = self.check_text_and_prompt()
        if self.init:  # fine-tuning: the weights of a trained model, and from here on a new run
            load_weights(model, self.init, cfg.init_from)
        if self.files:  # at once: what follows may time steps of the model for a minute
            self.log(self.plan(), flush=True)
        self.batches = torch.Generator(device).manual_seed(cfg.seed)  # alike everywhere: one global batch
        self.dtype, self.autocast, self.scaler, why = precision(cfg, device, self.time_step, self.world_size)
        if self.ckpt:
            self.restore(self.ckpt)
        if not self.ckpt or self.rank > 0:  # dropout masks differ per process (a checkpoint holds rank 0's)
            torch.manual_seed(cfg.seed + self.rank)
        self.model = nn.parallel.DistributedDataParallel(model) if self.world_size > 1 else model
        self.model, compiled_s = compile_model(self.model, cfg, self)  # a micro-batch's seconds, or None
        self.compiled = compiled_s is not None
        with all_or_none(self.world_size):
            if master and self.files:
                self.lock = prepare_out_dir(self.out_dir, self.ckpt["step"] if self.ckpt else None, self.lock)
        self.stop = StopRequest(self.world_size, quiet=not master)  # Ctrl-C or SIGTERM: stop after a step
        self.tokens_per_iter, self.flops_per_gpu = throughput(model, cfg, self.world_size)
        self.peak = peak_flops(device, self.dtype) if self.flops_per_gpu else None
        self.first_bad = torch.tensor(NONE, device=device)  # the first step whose loss was not finite
        if self.files:  # a run, not bench.py's measurement: the header, and a note if it will take long
            self.announce(why, compiled_s)
        self.t_last, self.step_last = time.time(), self.start_step
        return self.model

    def plan(self):
        """The first line: what is about to be trained, on what, and on which text."""
        cfg, n = self.cfg, self.world_size
        steps = f"{cfg.max_iters:,} steps"
        if self.ckpt:
            steps = f"steps {self.ckpt['step']:,} to {cfg.max_iters:,}"
        where = f"{n} processes on {self.device.type}" if n > 1 else f"{self.device}"
        characters = sum(len(split) for split in self.splits.values())
        text = f"{cfg.data or DEFAULT_DATA.name} ({characters:,} characters)"
        return f"training {self.size()} parameters on {where}: {steps} on {text}"

    def size(self):
        size = sum(p.numel() for p in self.raw_model.parameters())
        return f"{size / 1e6:.2f}M" if size >= 100_000 else f"{size:,}"  # the bigram's table: 4,225

    def announce(self, why, compiled_s):
        """The header lines; then a long run's note, unless auto's trial on a CPU gave it: from compiled_s, or a step
        timed now by rank 0 alone (the plain model, outside DDP)."""
        cfg, n = self.cfg, self.world_size
        dtype = str(self.dtype).removeprefix("torch.")
        compiled = "on" if self.compiled else "off"
        device = str(self.device)
        if self.device.type == "cuda":  # the card by name: the speed and the MFU depend on it
            device += f" ({torch.cuda.get_device_name(self.device)})"
        header = f"{self.size()} parameters | device {device} | {dtype}{why} | compile {compiled}"
        self.log(f"{header} | {n} process(es)")
        per_iter = f"{self.tokens_per_iter // cfg.block_size} sequences of {cfg.block_size}"
        batch = f"{cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation x {n} process(es)"
        self.log(f"batch {batch} = {per_iter} = {self.tokens_per_iter:,} tokens per iteration")
        if compiled_s:
            self.note(cfg.gradient_accumulation_steps * compiled_s, self.model, self.dtype)
        elif self.master and not self.ckpt and not self.noted:
            self.time_step(self.dtype, steps=2)  # gives the note: for it alone, a rough figure will do

    def time_step(self, dtype, steps=10):
        """A training step's seconds in dtype, timed by rank 0 alone; the first one timed gives a long run's note."""
        autocast = autocast_to(self.device, dtype)
        seconds = seconds_per_step(self.raw_model, self.optimizer, self.cfg, self, autocast, steps)
        self.note(seconds, self.raw_model, dtype)
        return seconds

    def note(self, step_s, model, dtype):
        """Once, before a new run of over half an hour: its steps at step_s each, its evaluations timed here."""
        cfg = self.cfg
        if self.noted or self.ckpt or not (self.master and self.files):
            return
        self.noted = True
        autocast = autocast_to(self.device, dtype)
        eval_s = seconds_per_batch(model, cfg, self, autocast, train=False, timed=1)  # no gradients: no wait
        evaluations = 2 * cfg.eval_iters * count_evaluations(cfg)  # batches of train and val
        projected = cfg.max_iters * step_s + cfg.gradient_accumulation_steps * evaluations * eval_s
        if projected > 1800:
            dtype = str(dtype).removeprefix("torch.")
            recipe = f"for a run of minutes on a CPU try: {command_line(CPU_RECIPE)}"
            note = f"note: this run will take about {format_duration(projected)} on {self.device} in {dtype}"
            self.log(f"{note}; {recipe}", flush=True)

    def check_text_and_prompt(self):
        """Refuse a text too short for a window of validation, or a prompt with characters the model does not know,
        now rather than after training. The samples' prompt: where the text has no newline, its first character."""
        cfg = self.cfg
        train = self.splits["train"]
        val = self.splits["val"]
        if len(val) <= cfg.block_size:
            n = len(train) + len(val)
            why = f"{cfg.block_size}, since its last 10% (validation) needs at least {cfg.block_size + 1}"
            too_few = f"{cfg.data or DEFAULT_DATA} has {n} characters: too few for block_size {why}"
            raise UserError(f"{too_few}; use a longer text or a smaller --block_size")
        if "prompt" in self.overrides:  # one the user gave: refused if the text lacks any of its characters
            encode_prompt(self.tokenizer, cfg.prompt)
        if set(cfg.prompt) <= self.tokenizer.stoi.keys():
            return cfg.prompt
        return self.tokenizer.chars[int(train[0])]  # the default, a newline, in a text that has none

    def restore(self, ckpt):
        """Go on from a checkpoint: its weights, AdamW's moments, the loss scale, the random states and the step."""
        load_weights(self.raw_model, ckpt, f"the checkpoint in {self.cfg.out_dir}/")
        # AdamW's moments only: load_state_dict would otherwise put back the saved settings (weight decay, betas, fused)
        this_run = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": ckpt["optimizer"]["state"], "param_groups": this_run})
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        here = self.device.type
        if rng.get("device", here) == here and rng["batches"].numel() == self.batches.get_state().numel():
            self.batches.set_state(rng["batches"])
        else:  # each kind of device has a generator of its own kind
            self.batches.manual_seed(self.cfg.seed + ckpt["step"])
            there = rng.get("device", "another device")
            afresh = "the batches are drawn afresh and will not replay exactly those of an unbroken run"
            self.log(f"warning: the checkpoint was saved on {there} and resumes on {here}: {afresh}")
        torch.set_rng_state(rng["torch"])
        if here == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.start_step, self.best_val = ckpt["step"], ckpt["best_val"]
        self.evaluated_step = ckpt.get("evaluated_step", ckpt["step"])  # behind if a Ctrl-C cut it short

    @contextlib.contextmanager
    def forward(self, last=True):
        """An evaluation that a Ctrl-C asked to give up stops here, before its next batch."""
        self.stop.check()
        waits = not last and self.world_size > 1  # DDP averages the gradients after the last micro-batch only
        with self.autocast, self.model.no_sync() if waits else contextlib.nullcontext():
            yield

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)

    def save(self, name, step):
        """Everything needed to go on from `step`, saved as out_dir/name by rank 0."""
        if not (self.master and self.files):
            return
        here = self.device.type
        rng = {"torch": torch.get_rng_state(), "batches": self.batches.get_state(), "device": here}
        if here == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": rng}
        state |= {"scaler": self.scaler.state_dict()}  # float16's loss scale: a resumed run goes on with it
        state |= {"config": asdict(self.cfg), "vocab": self.tokenizer.chars}
        state |= {"step": step, "best_val": self.best_val, "evaluated_step": self.evaluated_step}
        state |= {"elapsed_s": time.time() - self.t_start}
        state |= {"world_size": self.world_size}  # a resume with another number says so (the batch changes)
        save_checkpoint(self.out_dir / name, state)

    def evaluate(self, step, estimate):
        """With the steps' clock stopped, and a NaN in any process stopping all; a Ctrl-C gives up within a batch."""
        synchronize(self.device)  # so that the clock measures the steps, not just their launch
        if step > self.step_last:
            self.ms_per_iter = 1000 * (time.time() - self.t_last) / (step - self.step_last)
        self.check_finite()
        self.t_eval, state = time.time(), self.batches.get_state()
        try:
            with self.stop.abandons():
                self.text = sample_line(self) if self.master and self.cfg.eval_sample else None
                means = torch.tensor([*estimate().values(), 0.0], device=self.device)  # 0: not abandoned here
        except Abandoned:
            means = torch.tensor([0.0, 0.0, 1.0], device=self.device)
            self.model.train()
        if self.world_size > 1:
            dist.all_reduce(means)  # summed over the processes
            means /= self.world_size
        if means[-1] > 0:
            self.batches.set_state(state)  # as if it had not begun: --resume draws the same batches
            return None
        self.evaluated_step = step
        return dict(zip(("train", "val"), means[:2].tolist(), strict=True))

    def report(self, step, losses, lr):
        """Then the clock of the training steps goes on: ms/it leaves out the evaluation and the save."""
        cfg, ms = self.cfg, self.ms_per_iter
        self.losses = losses
        eval_s = time.time() - self.t_eval
        both = f"train {losses['train']:.4f} | val {losses['val']:.4f}"
        line = f"step {step}/{cfg.max_iters} | {both} | lr {lr:.1e}"
        if ms:
            tokens_per_s = self.tokens_per_iter / (ms / 1000)
            speed = f"{tokens_per_s / 1000:.0f}k" if tokens_per_s >= 1000 else f"{tokens_per_s:.0f}"  # not "0k"
            line += f" | {ms:.1f} ms/it | {speed} tok/s"
            if self.peak:
                line += f" | mfu {100 * self.flops_per_gpu / (ms / 1000) / self.peak:.0f}%"
            left = cfg.max_iters - step
            line += f" | eta {format_duration(left * ms / 1000 + left // cfg.eval_interval * eval_s)}"
        self.log(line, flush=True)
        if self.text is not None:  # as a JSON string: newlines show as \n, and it stays on one line
            self.log(f"  {json.dumps(self.text, ensure_ascii=False)}", flush=True)
        row = dict(step=step, train_loss=round(losses["train"], 4), val_loss=round(losses["val"], 4))
        row |= dict(lr=float(f"{lr:.6g}"), elapsed_s=round(time.time() - self.t_start, 2))
        row |= dict(ms_per_iter=ms and round(ms, 2), sample=self.text)
        with all_or_none(self.world_size):  # rank 0 writes; an error there stops every process
            if self.master and self.files:  # one line of JSON per evaluation, for plots and scripts
                metrics = self.out_dir / "metrics.jsonl"
                kept = "the checkpoints beside it are kept"
                with disk_errors(f"could not write {metrics}", kept), open(metrics, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if losses["val"] < self.best_val:
                self.best_val = losses["val"]
                self.save("ckpt.pt", step)
        self.t_last, self.step_last = time.time(), step

    def stop_requested(self):
        return self.stop.requested()

    def watch(self, step, loss):
        """On the device: the loop does not wait for the GPU."""
        self.first_bad = torch.where(torch.isfinite(loss), self.first_bad, self.first_bad.clamp(max=step))

    def check_finite(self):
        if self.world_size > 1:  # a loss gone NaN in one process stops all of them, at the same step
            dist.all_reduce(self.first_bad, op=dist.ReduceOp.MIN)
        step = self.first_bad.item()  # waits for the GPU: called only where the loop stops anyway
        if step < NONE:
            stopped = f"the loss was not finite at step {step}: training stopped"
            too_high = "a learning rate too high (lower --learning_rate, keep --grad_clip on)"
            too_coarse = "too little precision (try --dtype=float32)"
            kept = f"the last good checkpoint in {self.out_dir}/ is kept"
            raise UserError(f"{stopped}. Likely causes: {too_high} or {too_coarse}; {kept}")

    def interrupted(self, step):
        self.check_finite()  # never save a model that has already blown up
        with all_or_none(self.world_size):
            self.save("last.pt", step)
        saved = f"saved {self.out_dir / 'last.pt'}; continue with --resume"
        self.log(f"interrupted at step {step}: {saved}", flush=True)
        # the signal this process got, else the one another process got, else (its number unknown here) SIGTERM
        return 128 + (self.stop.signum or self.stop.agreed or signal.SIGTERM)

    def best_model(self):
        """A Ctrl-C from here on stops at once: nothing is left to save."""
        leave_process_group(self.stop)
        if not self.master:
            return None
        (self.out_dir / "last.pt").unlink(missing_ok=True)  # the run got past the interrupt it resumed from
        if self.losses is None:  # resumed a finished run: nothing was evaluated in this one
            self.losses = estimate_loss(self.raw_model, self.splits, self.cfg, self)
        self.wall = time.time() - self.t_start
        self.stop.at_once = True
        best = load_checkpoint(self.out_dir / "ckpt.pt")
        print(f"\nsample from the best model (step {best['step']}, val {best['best_val']:.4f}):")
        torch.manual_seed(self.cfg.seed)
        return load_weights(self.raw_model, best, self.out_dir / "ckpt.pt")

    def finish(self):
        if self.master:
            both = f"train {self.losses['train']:.4f} | val {self.losses['val']:.4f}"
            summary = f"{both} | best val {self.best_val:.4f}"
            wall = f"wall {format_duration(self.wall)} ({self.wall:.1f}s)"
            print(f"\nfinal: {summary} | {wall} | checkpoint {self.out_dir}/ckpt.pt")
        return 0


# ---- Interrupts: Ctrl-C or SIGTERM stops the run after the current step (or within an evaluation), and it saves.
class Abandoned(Exception):
    """Raised by StopRequest.check after the first Ctrl-C within abandons(): Run.evaluate gives the evaluation up."""


class StopRequest:
    """The first Ctrl-C (SIGINT) or SIGTERM asks the run to stop: training saves last.pt after the current step, an
    evaluation is abandoned. A second, or one while nothing is left to save (at_once), raises KeyboardInterrupt."""

    def __init__(self, world_size=1, quiet=False):
        self.signum = 0  # written by the handler alone
        self.quiet = quiet
        self.at_once = False
        self.abandon = False
        self.agreed, self.pending = 0, None  # with several processes (requested)
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self.group = stop_group() if world_size > 1 else None

    def handle(self, signum, frame):
        if self.signum or self.at_once:
            raise KeyboardInterrupt(signum)
        self.signum = signum
        if not self.quiet:  # os.write, not print: the signal may have come in the middle of a print
            ack = "stopping: last.pt is saved after this step (an evaluation is cut short)"
            os.write(2, f"\n{ack}; Ctrl-C again stops at once\n".encode())

    @contextlib.contextmanager
    def abandons(self):
        """Within it, the first Ctrl-C raises Abandoned at the next check, instead of waiting for the end of a step."""
        self.abandon = True
        try:
            self.check()  # it came before: give up before beginning
            yield
        finally:
            self.abandon = False

    def check(self):
        """Raise Abandoned if a Ctrl-C came within abandons(), where giving up is safe (before a batch, between
        characters): the handler might interrupt torch.compile's work, which would wrap it in an error of its own."""
        if self.abandon and self.signum:
            raise Abandoned

    def requested(self):
        """The number of the signal that asked us to stop, or 0. With several processes, of one that any of them got:
        each step sends its number without waiting and reads what all sent a step before: all stop at the same step."""
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
        fix = "set GLOO_SOCKET_IFNAME to the network interface the machines reach each other on (e.g. eth0)"
        raise UserError(f"the processes could not connect over gloo ({first}): {fix}") from None


# ---- Progress reports: step | train | val | lr | ms/it | tok/s | mfu | eta, and a row of metrics.jsonl.
# A card's peak dense matrix throughput in TFLOP/s (bfloat16/float16, float32 as TF32, plain float32), for MFU; by the
# card's name as the driver gives it, less the maker, memory and form factor words: "NVIDIA H100 80GB HBM3" is the H100.
PEAK_TFLOPS = {"H100": (989, 494, 67), "H200": (989, 494, 67), "GH200": (989, 494, 67)}
PEAK_TFLOPS |= {"H100 PCIE": (756, 378, 51), "H100 NVL": (835, 418, 60), "H200 NVL": (835, 418, 60)}
PEAK_TFLOPS |= {"A100": (312, 156, 19.5), "A100 PCIE": (312, 156, 19.5), "A10": (125, 62.5, 31.2)}
PEAK_TFLOPS |= {"L40S": (362, 183, 91.6), "L40": (181, 90.5, 90.5), "L4": (121, 60, 30.3)}
PEAK_TFLOPS |= {"RTX 4090": (165, 83, 82.6), "RTX 3090": (71, 36, 35.6)}
# no TF32 before the A100: the middle figure is plain float32's
PEAK_TFLOPS |= {"V100": (125, 15.7, 15.7), "V100 PCIE": (112, 14, 14), "T4": (65, 8.1, 8.1)}


def peak_flops(device, dtype):
    """The peak FLOP/s of this card in this precision (TF32 unless --dtype=float32), or None (CPUs, other cards)."""
    if device.type != "cuda":
        return None
    words = torch.cuda.get_device_name(device).upper().replace("-", " ").split()
    card = " ".join(w for w in words if not re.fullmatch(r"NVIDIA|TESLA|GEFORCE|\d+GB|HBM\w*|SXM\d*", w))
    column = 0 if dtype != torch.float32 else 1 if torch.backends.cuda.matmul.allow_tf32 else 2
    return 1e12 * PEAK_TFLOPS[card][column] if card in PEAK_TFLOPS else None


def flops_per_token(model, cfg):
    """Training FLOPs per token: 6 per weight of a matrix product (forward 2, backward 4; the embeddings are lookups,
    not products) plus attention's QK^T and AV. 0 for a model without Linear layers: nothing to report an MFU of."""
    weights = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    return 6 * weights + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size if weights else 0


def count_evaluations(cfg):
    """A whole run's evaluations, as train() makes them: at step 0, every eval_interval steps, and at max_iters."""
    return cfg.max_iters // cfg.eval_interval + 1 + (cfg.max_iters % cfg.eval_interval > 0)


def format_duration(seconds):
    s = int(seconds)
    if s >= 3600:
        return f"{s // 86400}d{s % 86400 // 3600}h" if s >= 86400 else f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def throughput(model, cfg, world_size):
    """Tokens per optimizer step (all processes), and the FLOPs each GPU does for them: its own share of the batch."""
    tokens = cfg.batch_size * cfg.gradient_accumulation_steps * world_size * cfg.block_size
    return tokens, flops_per_token(model, cfg) * tokens / world_size


NONE = 2**62  # no step: the first step whose loss was not finite, while there is none


# ---- Sampling with a KV cache, the line of text at each evaluation, and the --sample command.
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
            assert k.size(2) == 1, "a KV cache takes one new character at a time (attention's mask)"
            k, v = torch.cat([self.kv[layer][0], k], dim=2), torch.cat([self.kv[layer][1], v], dim=2)
        self.kv[layer] = (k, v)
        return k, v


def sample_line(run):
    """A line of the model's own writing at each evaluation: eval_sample characters after the prompt, from a generator
    of its own seeded alike every time, so that training's random numbers are left alone."""
    cfg = run.cfg
    generator = torch.Generator().manual_seed(cfg.seed)  # on the CPU, where sample_next draws
    idx = torch.tensor([encode_prompt(run.tokenizer, run.prompt)], device=run.device)
    new = stream(run.raw_model, idx, cfg.eval_sample, cfg.temperature, cfg.top_k, generator=generator)
    written = []
    for idx_next in new:
        written.append(int(idx_next))
        run.stop.check()  # a Ctrl-C gives the line (and its evaluation) up after this character
    return run.prompt + run.tokenizer.decode(written)


def encode_prompt(tokenizer, prompt):
    """The prompt as integers; the model knows only the characters of the text it was trained on."""
    try:
        return tokenizer.encode(prompt)
    except UserError as e:
        raise UserError(f"the prompt has {e}; use only characters of the training text") from None


def sample(overrides, defaults=None, make_model=None):
    """--sample: num_samples texts from out_dir/ckpt.pt, each starting with the prompt."""
    cfg, ckpt = settings(overrides, defaults)[:2]
    tokenizer, device = CharTokenizer(ckpt["vocab"]), resolve_device(cfg.device)
    model = (make_model or GPT)(tokenizer.vocab_size, cfg)
    model = load_weights(model, ckpt, Path(cfg.out_dir) / "ckpt.pt").to(device)
    torch.manual_seed(cfg.seed)
    for i in range(cfg.num_samples):
        print("---" if i else "", end="\n" if i else "")
        print_sample(model, tokenizer, cfg.prompt, cfg)
    return 0


# ---- main(): every side effect starts here, so that tests, notebooks, bigram.py and bench.py import freely.
def main(argv=None, defaults=None, make_model=None):
    """python gpt.py [--name=value ...]: train, or with --sample write text. Returns the exit status."""
    first = os.environ.get("RANK", "0") == "0"  # under torchrun all processes stop alike: rank 0 says why
    try:
        overrides = parse_overrides(sys.argv[1:] if argv is None else argv, defaults)
        if overrides.get("sample"):
            return sample(overrides, defaults, make_model)
        with Run(overrides, defaults) as run:
            return train(run.cfg, run, make_model)
    except UserError as e:
        if first:
            print(f"error: {e}", file=sys.stderr)
        leave_process_group()
        return 1
    except torch.OutOfMemoryError:  # while setting up or sampling (training says it with its own settings)
        cfg = replace(starting_point(overrides, defaults), **overrides)
        if first:
            print(f"error: {out_of_memory(cfg)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one while nothing was left to save
        saved = "nothing new was saved, the checkpoints on disk are whole"
        if first:
            print(f"\ninterrupted: stopped at once; {saved}", file=sys.stderr)
        return 128 + (e.args[0] if e.args else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
