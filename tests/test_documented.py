"""What the README and docs/ say the code does, each held by a test that fails when it breaks: the learning
rate's schedule and a resume that stretches it, the clock across a resume, the loss estimate, weight decay, clipping,
gradient accumulation, the initialisation, temperature, dropout on the embeddings, and the choices auto makes on a
machine (device, dtype, compile) with the hardware queries stood in for. The expected values are written here, from
the formulas the docs give, not computed by the functions under test."""

import contextlib
import copy
import json
import math
import sys
import time
import types

import pytest
import torch
from conftest import TINY, interrupt_during_step, on_one_thread
from torch import nn
from torch.nn import functional as F

import gpt

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = gpt.Config(n_layer=2, n_head=2, n_embd=16, block_size=8, batch_size=4, dropout=0.0)
TEXT = torch.randint(65, (2000,), generator=torch.Generator().manual_seed(0))  # 65 "characters", at random


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ---- the learning rate, and a resume that stretches it -------------------------------------------------------------

PEAK, FLOOR, WARMUP = 1e-3, 1e-4, 4  # --learning_rate, --min_lr, --warmup_iters of the run below


def lr_by_the_docs(step, max_iters):
    """docs: a linear warm-up from 0 to learning_rate over warmup_iters steps, then half a cosine down to min_lr at
    max_iters."""
    if step < WARMUP:
        return PEAK * (step + 1) / WARMUP
    progress = (step - WARMUP) / (max_iters - WARMUP)
    return FLOOR + (PEAK - FLOOR) * (1 + math.cos(math.pi * progress)) / 2


@pytest.fixture(scope="module")
def stretched(corpus, tmp_path_factory):
    """A run of 12 steps stopped by Ctrl-C during its 7th step (last.pt at step 7), its clock set forward to 1,000 s
    in last.pt, then resumed with --resume --max_iters=20. Returns out_dir, and the seconds the resume took."""
    out_dir = tmp_path_factory.mktemp("stretched") / "out"
    schedule = [
        f"--learning_rate={PEAK}",
        f"--min_lr={FLOOR}",
        f"--warmup_iters={WARMUP}",
        "--eval_interval=2",
    ]
    argv = [*TINY, f"--data={corpus}", *schedule, f"--out_dir={out_dir}"]
    with on_one_thread(), pytest.MonkeyPatch.context() as m:
        interrupt_during_step(m, 7)
        assert gpt.main([*argv, "--max_iters=12"]) == 130
    last = torch.load(out_dir / "last.pt", weights_only=True)
    assert last["step"] == 7 and last["elapsed_s"] < 1000
    last["elapsed_s"] = 1000.0  # as if the first part had run for 1,000 s
    torch.save(last, out_dir / "last.pt")
    t = time.time()
    with on_one_thread():
        assert gpt.main([*argv, "--max_iters=20", "--resume"]) == 0
    return out_dir, time.time() - t


def test_the_learning_rate_follows_its_formula_and_a_resume_stretches_it_to_the_new_max_iters(stretched):
    out_dir, _ = stretched
    logged = {r["step"]: r["lr"] for r in rows(out_dir)}
    assert list(logged) == list(range(0, 21, 2))
    for step, lr in logged.items():  # up to the stop, the schedule of 12 steps; after it, of 20
        assert lr == pytest.approx(lr_by_the_docs(step, 12 if step < 7 else 20), rel=1e-5), step
    assert logged[2] == pytest.approx(PEAK * 3 / 4)  # in the warm-up
    assert logged[4] == pytest.approx(PEAK)  # the warm-up's end: the peak
    assert logged[12] == pytest.approx((PEAK + FLOOR) / 2)  # half way from the warm-up's end to max_iters 20
    assert logged[20] == pytest.approx(FLOOR)  # the end: min_lr, not 0
    quarter = FLOOR + (PEAK - FLOOR) * (1 + math.cos(math.pi / 4)) / 2  # a quarter of the way: a cosine
    assert logged[8] == pytest.approx(quarter)
    assert logged[8] != pytest.approx((PEAK + FLOOR) / 2)  # what step 8 had been under the old max_iters of 12


def test_elapsed_s_goes_on_from_the_runs_it_continues(stretched):
    """metrics.jsonl's elapsed_s counts the time of the whole run, the parts before a resume included."""
    out_dir, resume_s = stretched
    elapsed = {r["step"]: r["elapsed_s"] for r in rows(out_dir)}
    assert all(elapsed[step] < 1000 for step in (0, 2, 4, 6))  # before the stop
    after = [elapsed[step] for step in range(8, 21, 2)]
    assert all(1000 <= seconds <= 1000 + resume_s for seconds in after), elapsed  # on from 1,000 s
    assert list(elapsed.values()) == sorted(elapsed.values())


# ---- the loss estimate, weight decay, clipping, accumulation --------------------------------------------------------


def test_estimate_loss_scores_each_split_on_its_own_data_with_dropout_off():
    """A split of one repeated character has one window: its estimate is the loss of that window, exactly."""
    cfg = gpt.replace(SMALL, dropout=0.5, eval_iters=3)
    torch.manual_seed(0)
    model = gpt.GPT(65, cfg)
    splits = {"train": torch.full((100,), 3), "val": torch.full((100,), 7)}
    got = gpt.estimate_loss(model, splits, cfg)
    assert model.training  # put back as it was
    model.eval()
    for split, char in (("train", 3), ("val", 7)):
        window = torch.full((cfg.batch_size, cfg.block_size), char)
        assert got[split] == pytest.approx(model(window, window)[1].item(), rel=1e-6), split
    assert abs(got["train"] - got["val"]) > 0.01  # two different numbers, each on its own split


def test_weight_decay_falls_on_matrices_and_embeddings_not_on_biases_and_norms():
    model = gpt.GPT(65, SMALL)
    optimizer = gpt.make_optimizer(model, SMALL, "cpu")
    name = {id(p): n for n, p in model.named_parameters()}
    decay = {name[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert sorted(decay) == sorted(name.values())  # every parameter once
    kinds = (nn.Linear, nn.Embedding)
    matrices = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, kinds)}
    assert len(matrices) == 2 + 4 * SMALL.n_layer + 1  # two embeddings, four Linear a block, the head
    assert {n for n, d in decay.items() if d == 0.1} == matrices  # SMALL's weight_decay: the default, 0.1
    others = {n for n, d in decay.items() if d == 0.0}
    assert others == set(name.values()) - matrices
    assert all(n.endswith(".bias") or ".ln" in n or n.startswith("ln_f.") for n in others)


def gradients_at_each_step(model, optimizer):
    """The gradients (as one vector) that each optimizer step is taken with."""
    seen, step = [], optimizer.step

    def spy(*args, **kwargs):
        seen.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        return step(*args, **kwargs)

    optimizer.step = spy
    return seen


def one_step(cfg, seed=0):
    """One train_step of a fresh SMALL model on TEXT (torch's generator seeded): the gradient it stepped with."""
    torch.manual_seed(seed)
    model = gpt.GPT(65, cfg)
    optimizer = gpt.make_optimizer(model, cfg, "cpu")
    seen = gradients_at_each_step(model, optimizer)
    gpt.train_step(model, optimizer, TEXT, 1e-3, cfg)
    return seen[0]


def test_clipping_brings_the_gradients_global_norm_down_to_grad_clip_and_keeps_its_direction():
    raw = one_step(gpt.replace(SMALL, grad_clip=0.0))  # 0: no clipping
    norm = raw.norm().item()
    clipped = one_step(gpt.replace(SMALL, grad_clip=norm / 4))
    assert clipped.norm().item() == pytest.approx(norm / 4, rel=1e-4)
    torch.testing.assert_close(clipped, raw / 4, rtol=1e-4, atol=1e-9)
    assert torch.equal(one_step(gpt.replace(SMALL, grad_clip=2 * norm)), raw)  # below the bound: untouched


def test_gradient_accumulation_averages_its_micro_batches(monkeypatch):
    """Two micro-batches of 4 make the gradient of their 8 sequences' mean loss, as one batch of 8 would: the mean of
    the two gradients, not their sum."""
    cfg = gpt.replace(SMALL, gradient_accumulation_steps=2, grad_clip=0.0)
    drawn, get_batch = [], gpt.get_batch
    monkeypatch.setattr(gpt, "get_batch", lambda *args: drawn.append(get_batch(*args)) or drawn[-1])
    torch.manual_seed(0)
    model = gpt.GPT(65, cfg)
    before = copy.deepcopy(model)
    optimizer = gpt.make_optimizer(model, cfg, "cpu")
    seen = gradients_at_each_step(model, optimizer)
    gpt.train_step(model, optimizer, TEXT, 1e-3, cfg)
    assert len(drawn) == 2 and all(x.shape == (4, 8) for x, _ in drawn)
    x, y = torch.cat([x for x, _ in drawn]), torch.cat([y for _, y in drawn])  # the 8 sequences as one batch
    logits, _ = before(x)
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    torch.testing.assert_close(seen[0], torch.cat([p.grad.flatten() for p in before.parameters()]))


# ---- the model: its initialisation, dropout on the embeddings, temperature ------------------------------------------


def test_the_initial_weights_have_gpt2s_standard_deviations():
    """Normal weights of std 0.02, those that write into the residual stream 0.02 / sqrt(2 * n_layer) = 0.005 with 8
    layers; biases zero, norms one. A model of 8 x 256 has 16,000 to 262,000 numbers a matrix: each std within 3%."""
    cfg = gpt.Config(n_layer=8, n_head=4, n_embd=256, block_size=64)
    torch.manual_seed(0)
    model = gpt.GPT(65, cfg)
    into_the_stream = [f"blocks.{i}.{sub}.proj.weight" for i in range(8) for sub in ("sa", "ffwd")]
    found = []
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif p.dim() == 1:  # a LayerNorm's gain
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            std = 0.005 if name in into_the_stream else 0.02
            found += [name] if name in into_the_stream else []
            assert p.std().item() == pytest.approx(std, rel=0.03), name
            assert abs(p.mean().item()) < 5 * std / math.sqrt(p.numel()), name
    assert found == into_the_stream


def test_dropout_falls_on_the_embeddings_while_training():
    """What the first block gets is dropout(token embedding + position embedding): with dropout 0.5, about half its
    numbers zeroed and the rest doubled; in eval mode the sum itself."""
    cfg = gpt.replace(SMALL, dropout=0.5, n_embd=32)
    torch.manual_seed(0)
    model = gpt.GPT(65, cfg)
    got = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: got.append(args[0]))
    idx = TEXT[:32].view(4, 8)
    summed = model.token_embedding_table.weight[idx] + model.position_embedding_table.weight[:8]
    model(idx)
    zeroed = got[0] == 0
    assert 0.4 < zeroed.float().mean().item() < 0.6
    torch.testing.assert_close(got[0][~zeroed], 2 * summed[~zeroed])
    model.eval()
    model(idx)
    torch.testing.assert_close(got[1], summed)


def test_temperature_sharpens_below_1_and_flattens_above(monkeypatch):
    """sample_next draws from softmax(logits / temperature): the entropy of what it draws from grows with it."""
    given, multinomial = [], torch.multinomial

    def spy(probs, num_samples, generator=None):
        given.append(probs)
        return multinomial(probs, num_samples, generator=generator)

    monkeypatch.setattr(torch, "multinomial", spy)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(4000, 1)  # 4,000 draws from the same logits
    entropy = {}
    for temperature in (0.5, 1.0, 2.0):
        drawn = gpt.sample_next(logits, temperature, generator=torch.Generator().manual_seed(0))
        e = [math.exp(v / temperature) for v in (2.0, 1.0, 0.0, -1.0)]
        expected = torch.tensor([v / sum(e) for v in e])
        torch.testing.assert_close(given[-1][0], expected)
        frequencies = torch.bincount(drawn.flatten(), minlength=4) / 4000
        torch.testing.assert_close(frequencies, expected, atol=0.03, rtol=0)
        entropy[temperature] = -sum(p * math.log(p) for p in expected.tolist())
    assert entropy[0.5] < 0.9 < entropy[1.0] < 1.1 < entropy[2.0]  # 0.55, 0.99, 1.24 nats


# ---- what auto picks on a machine, the hardware queries stood in for ------------------------------------------------


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_picks_cuda_then_mps_then_the_cpu(cuda, mps, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert gpt.resolve_device("auto") == torch.device(expected)


@pytest.fixture
def tf32_flags():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# the autocast and scaler that precision makes for CUDA warn on a CPU build
@pytest.mark.filterwarnings("ignore:.*CUDA is not available")
@pytest.mark.parametrize(
    ("capability", "expected"),
    [((6, 1), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16)]
    + [((9, 0), torch.bfloat16), ((12, 0), torch.bfloat16)],
)
def test_auto_on_cuda_picks_bfloat16_from_compute_capability_8_and_float16_below(
    capability, expected, monkeypatch, tf32_flags
):
    asked = []

    def get_device_capability(device=None):
        asked.append(device)
        return capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    trial = lambda dtype: pytest.fail("nothing is timed on CUDA")
    dtype = gpt.precision(gpt.Config(), torch.device("cuda"), trial)[0]
    assert dtype == expected and asked


@pytest.mark.parametrize(
    ("device", "platform", "setting", "compiled"),
    [
        ("cuda", "linux", None, True),  # unset: on for CUDA under Linux ...
        ("cuda", "win32", None, False),  # ... and off elsewhere
        ("cuda", "darwin", None, False),
        ("cpu", "linux", None, False),
        ("mps", "darwin", None, False),
        ("cpu", "linux", True, True),  # named: obeyed
        ("cuda", "linux", False, False),
    ],
)
def test_compile_is_on_by_default_for_cuda_under_linux_and_off_elsewhere(
    device, platform, setting, compiled, monkeypatch
):
    """compile_model with torch.compile and the timed trial stood in for (this reaches inside Part 2: a run is
    given as an object with the device and a log)."""
    model, stand_in, calls = nn.Linear(2, 2), nn.Linear(2, 2), []
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(torch, "compile", lambda m, **kwargs: calls.append(m) or stand_in)
    monkeypatch.setattr(gpt, "seconds_per_batch", lambda *args, **kwargs: 0.25)
    run = types.SimpleNamespace(device=torch.device(device), autocast=contextlib.nullcontext(), log=print)
    got, seconds = gpt.compile_model(model, gpt.Config(compile=setting), run)
    assert (got is stand_in, seconds, calls) == ((True, 0.25, [model]) if compiled else (False, None, []))
