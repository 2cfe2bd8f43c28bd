"""Resumed settings and GPU errors, what a CPU can show of them: a resumed run steps with this run's optimizer and its
own settings, out of memory inside the compiler is named as such, errors say what to do in one line, and the FLOPs
counted for MFU are those of matrix products. (Several processes: tests/test_distributed.py.)"""

import json

import pytest
import torch
from conftest import TINY, interrupt_during_step

import gpt

pytestmark = pytest.mark.usefixtures("one_thread")


def fused_on_the_cpu(monkeypatch):
    """make_optimizer as on a CUDA card, where AdamW is fused (PyTorch fuses it on the CPU too)."""
    make_optimizer = gpt.make_optimizer
    monkeypatch.setattr(gpt, "make_optimizer", lambda model, cfg, device_type: make_optimizer(model, cfg, "cuda"))


def optimizer_of_each_step(monkeypatch):
    """The settings of the param groups that each optimizer step is taken with (the learning rate is the step's)."""
    seen, train_step = [], gpt.train_step

    def spy(model, optimizer, *args):
        if not isinstance(args[-1], gpt.Trial):  # a step timed before step 0 is not one of the run's
            seen.append([{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups])
        return train_step(model, optimizer, *args)

    monkeypatch.setattr(gpt, "train_step", spy)
    return seen


def test_a_checkpoint_of_plain_adamw_resumes_into_fused_adamw_in_float16(corpus, tmp_path, monkeypatch):
    """A CPU or Mac checkpoint resumed on a T4 (auto: float16, with the scaler; AdamW fused on CUDA): the checkpoint's
    param groups said fused=False, and the scaler then handed found_inf to a plain AdamW, which asserts. Now only the
    state comes from the checkpoint; the optimizer is the one this run builds."""
    args = [*TINY, f"--data={corpus}", "--dtype=float16", "--max_iters=12", f"--out_dir={tmp_path}"]
    with monkeypatch.context() as m:
        interrupt_during_step(m, 6)
        assert gpt.main(args) == 130
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]
    assert not saved["param_groups"][0]["fused"]
    fused_on_the_cpu(monkeypatch)
    seen = optimizer_of_each_step(monkeypatch)
    assert gpt.main([*args, "--resume"]) == 0
    assert len(seen) == 6 and all(group["fused"] for groups in seen for group in groups)
    assert gpt.load_checkpoint(tmp_path / "ckpt.pt")["optimizer"]["param_groups"][0]["fused"]  # and it stays so


def test_a_resume_steps_with_the_settings_it_is_given_and_says_so(corpus, tmp_path, monkeypatch, capsys):
    args = [*TINY, f"--data={corpus}", "--max_iters=12", f"--out_dir={tmp_path}"]
    with monkeypatch.context() as m:
        interrupt_during_step(m, 6)
        assert gpt.main(args) == 130
    state = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["state"]
    seen = optimizer_of_each_step(monkeypatch)
    capsys.readouterr()
    assert gpt.main([*args, "--resume", "--weight_decay=0.5", "--beta2=0.95", "--max_iters=14"]) == 0
    out = capsys.readouterr().out
    said = "note: resuming with settings of its own: max_iters 14 (was 12), weight_decay 0.5 (was 0.1), beta2 0.95 (was"
    assert [line for line in out.splitlines() if line.startswith("note:")] == [f"{said} 0.99)"]
    decayed, not_decayed = seen[0]
    assert (decayed["weight_decay"], decayed["betas"], not_decayed["weight_decay"]) == (0.5, (0.9, 0.95), 0.0)
    assert len(seen) == 8 and all(groups == seen[0] for groups in seen)
    assert all(int(s["step"]) == 6 for s in state.values())  # the moments it went on from were the checkpoint's


def test_a_resume_with_nothing_changed_says_nothing(corpus, tmp_path, monkeypatch, capsys):
    args = [*TINY, f"--data={corpus}", "--max_iters=12", f"--out_dir={tmp_path}"]
    with monkeypatch.context() as m:
        interrupt_during_step(m, 6)
        assert gpt.main(args) == 130
    capsys.readouterr()
    assert gpt.main([*args, "--resume"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_a_resume_with_another_number_of_processes_says_what_that_does_to_the_batch(
    corpus, tmp_path, monkeypatch, capsys
):
    args = [*TINY, f"--data={corpus}", "--max_iters=12", f"--out_dir={tmp_path}"]
    with monkeypatch.context() as m:
        interrupt_during_step(m, 6)
        assert gpt.main(args) == 130
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 1
    ckpt["world_size"] = 4  # as if trained under torchrun with 4 processes
    torch.save(ckpt, tmp_path / "last.pt")
    capsys.readouterr()
    assert gpt.main([*args, "--resume"]) == 0
    note = "note: resuming with settings of its own: 1 process(es) (was 4): 8 sequences a step, same learning rate"
    assert note in capsys.readouterr().out.splitlines()


def test_out_of_memory_inside_the_compiler_gets_the_out_of_memory_advice(corpus, tmp_path, monkeypatch, capsys):
    """Dynamo raises its own error `from None`, with the out-of-memory error as inner_exception, not as __cause__."""

    class BackendCompilerFailed(Exception):
        def __init__(self, inner):
            super().__init__(f"backend='inductor' raised:\n{type(inner).__name__}: {inner}")
            self.inner_exception = inner

    class FailsInTheCompiler(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise BackendCompilerFailed(
                torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            ) from None

    monkeypatch.setattr(torch, "compile", lambda model: FailsInTheCompiler())
    argv = [*TINY, f"--data={corpus}", f"--out_dir={tmp_path / 'out'}", "--compile=true"]
    assert gpt.main(argv) == 1
    out, err = capsys.readouterr()
    assert err == f"error: {gpt.out_of_memory(gpt.replace(gpt.Config(), **gpt.parse_overrides(argv)))}\n"
    assert "torch.compile failed" not in out + err


def test_more_processes_than_gpus_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(gpt, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="4").items():
        monkeypatch.setenv(k, v)
    assert gpt.main(["--max_iters=1"]) == 1
    expected = "torchrun started 4 processes on this machine, but this machine has 2 CUDA GPU(s); give torchrun "
    assert capsys.readouterr().err == f"error: {expected}--nproc_per_node at most that\n"


def test_a_stop_group_that_cannot_connect_names_the_variable_that_fixes_it(monkeypatch):
    """Between machines, gloo binds to the address the machine's name resolves to (127.0.1.1 on Debian and Ubuntu)."""

    def refused(backend):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:144] connectFullMesh failed\nmore")

    monkeypatch.setattr(torch.distributed, "new_group", refused)
    with pytest.raises(gpt.UserError) as e:
        gpt.stop_group()
    assert "connectFullMesh failed" in str(e.value) and "set GLOO_SOCKET_IFNAME to the network interface" in str(
        e.value
    )


def test_the_flops_per_token_count_matrix_products_not_embedding_lookups():
    cfg = gpt.Config(n_layer=2, n_head=2, n_embd=32, block_size=16)
    model = gpt.GPT(65, cfg)
    embeddings = model.token_embedding_table.weight.numel() + model.position_embedding_table.weight.numel()
    norms = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters())
    products = sum(p.numel() for p in model.parameters()) - embeddings - norms
    assert gpt.flops_per_token(model, cfg) == 6 * products + 12 * 2 * 32 * 16
    # counted by hand: each block's qkv 32 x 96, proj 32 x 32 + 32, fc 32 x 128 + 128, proj 128 x 32 + 32 (12,480),
    # two of them, and the head 32 x 65 + 65 (2,145): 27,105 weights of matrix products; attention 12 x 2 x 32 x 16
    assert gpt.flops_per_token(model, cfg) == 6 * 27_105 + 12_288 == 174_918
    bigram = __import__("bigram").BigramLanguageModel(65, cfg)
    assert gpt.flops_per_token(bigram, cfg) == 0  # a table: no MFU to speak of


def test_a_checkpoint_records_its_number_of_processes(corpus, tmp_path):
    assert gpt.main([*TINY, f"--data={corpus}", "--max_iters=2", f"--out_dir={tmp_path}"]) == 0
    assert gpt.load_checkpoint(tmp_path / "ckpt.pt")["world_size"] == 1
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 0


def test_sampling_with_the_kv_cache_builds_no_mask_for_the_fused_kernel(monkeypatch):
    """A new character after the cached ones may look at all of them: the fused kernel needs no mask for it, and the
    only masked call is the first, on the whole window, where is_causal masks without a (T,T) matrix."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((q.size(2), k.size(2), attn_mask, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention", spy)
    cfg = gpt.Config(n_layer=2, n_head=2, n_embd=32, block_size=8, dropout=0.0)
    torch.manual_seed(0)
    model = gpt.GPT(65, cfg)
    gpt.generate(model, torch.zeros((1, 3), dtype=torch.long), 20)  # past block_size: the cache is rebuilt twice
    assert all(mask is None for _, _, mask, _ in calls)
    assert {(T == Tk and T > 1) for T, Tk, _, causal in calls if causal} == {True}  # is_causal on whole windows only
    assert all(T == 1 for T, Tk, _, causal in calls if not causal) and any(Tk > 1 for T, Tk, _, c in calls if not c)
