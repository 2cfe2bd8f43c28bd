"""The baseline: a bigram model, in which the current character alone predicts the next one.

The lecture's first model, from its script bigram.py. This file holds the model and its defaults (the lecture's
settings, and what differs); gpt.py's loop trains it. Its only parameters are a vocab_size x vocab_size table: row i
holds the logits (unnormalised log-probabilities) of the character that follows character i. The rest of the
lecture's script (reading the text, get_batch, estimate_loss, the training loop, generate) is gpt.py's Part 1, which
takes any model: this one trains and writes through it, with gpt.py's command line, checkpoints and Ctrl-C.

    python bigram.py                     train (under a minute on a CPU), then compare with counting
    python bigram.py --sample            write text with the model saved in out-bigram/ckpt.pt

At the end it compares its val loss with a count-based reference: the table of next-character frequencies
counted in the training text (add-one smoothed). Gradient descent on the table should find about the same.
"""

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

import gpt

# The lecture's bigram settings (its bigram.py: batch 32, block 8, lr 1e-2, 3000 iterations, evaluated every 300 over
# 200 batches). Not the lecture's: the learning rate decays (cosine) to gpt.py's min_lr 1e-4 where the lecture keeps
# 1e-2; no weight decay (the lecture: AdamW's 0.01, which pulls the table towards uniform); gpt.py's beta2 0.99 (the
# lecture: 0.999) and gradient clipping at 1.0 (none); and the table starts at zero (the lecture: random, below).
DEFAULTS = replace(
    gpt.Config(),
    block_size=8,
    batch_size=32,
    learning_rate=1e-2,
    warmup_iters=0,
    weight_decay=0.0,
    max_iters=3000,
    eval_interval=300,
    dropout=0.0,
    compile=False,  # nothing to fuse in a table
    out_dir="out-bigram",
)


class BigramLanguageModel(nn.Module):
    """Each character reads the logits for the next one straight from a table."""

    def __init__(self, vocab_size, cfg):
        super().__init__()
        self.block_size = cfg.block_size  # gpt.generate crops the context to it; a bigram reads only the last
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)
        # start from uniform predictions (loss ln(vocab_size)); the lecture keeps PyTorch's N(0,1) init, which
        # starts confidently wrong (4.88) and leaves rows of rare characters short of converged in 3000 steps
        nn.init.zeros_(self.token_embedding_table.weight)

    def forward(self, idx, targets=None):
        logits = self.token_embedding_table(idx)  # (B,T,vocab_size)
        if targets is None:
            return logits, None
        B, T, C = logits.shape
        return logits, F.cross_entropy(logits.view(B * T, C), targets.reshape(B * T))


def count_based_loss(train, val, vocab_size):
    """Val loss of the bigram table estimated from the train split's counts, with add-one smoothing
    (so that a pair never seen in training still gets a little probability). Exact, with numpy."""
    counts = np.ones((vocab_size, vocab_size))
    np.add.at(counts, (train[:-1], train[1:]), 1)
    log_probs = np.log(counts / counts.sum(axis=1, keepdims=True))
    return float(-log_probs[val[:-1], val[1:]].mean())


@torch.no_grad()
def whole_split_loss(model, data):
    """Mean loss over every next-character prediction in `data`, in one pass: a bigram needs no windows."""
    model.eval()
    return model(data[None, :-1], data[None, 1:])[1].item()


def compare_with_counts(cfg):
    """Print the trained table's val loss beside the count-based reference."""
    path = Path(cfg.out_dir) / "ckpt.pt"
    ckpt = gpt.load_checkpoint(path)
    _, ids = gpt.read_corpus(cfg.data, ckpt["vocab"])
    train, val = gpt.split_data(ids.long())
    model = gpt.load_weights(BigramLanguageModel(len(ckpt["vocab"]), cfg), ckpt, path)
    ours = whole_split_loss(model, val)
    reference = count_based_loss(train.numpy(), val.numpy(), len(ckpt["vocab"]))
    print(
        f"bigram val loss over the whole val split: {ours:.4f} | counted from the train split (add-one): "
        f"{reference:.4f} | gap {ours - reference:+.4f}"
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    status = gpt.main(argv, DEFAULTS, BigramLanguageModel)
    overrides = gpt.parse_overrides(argv, DEFAULTS) if status == 0 else {}
    if status == 0 and not overrides.get("sample") and os.environ.get("RANK", "0") == "0":
        compare_with_counts(replace(DEFAULTS, **overrides))
    return status


if __name__ == "__main__":
    sys.exit(main())
