"""Data-parallel training with real processes that talk gloo over 127.0.0.1.

Starting Python and importing torch costs a few CPU-seconds per process, far more than these tiny runs. So
one module fixture starts every run up front, side by side, and the tests only read what the runs left:

    a             torchrun, 2 processes, batch_size 4, 6 steps: the command a user types
    b             1 process, batch_size 8, 6 steps            b9   the same, 9 steps
    c             1 process, batch_size 4, accumulation 2, 6 steps
    a2            a copy of a's out_dir, resumed by 2 processes to step 9; rank 1 runs in a folder without it, as
                  on a second machine whose disk does not hold out_dir
    sig           2 processes training for long, dropout 0.5; SIGTERM to rank 1 alone, once rank 0 has printed step 0;
                  each process keeps the dropout mask of its first step on the embeddings, in mask0.pt and mask1.pt
    locked        2 processes, whose out_dir another run holds (here pytest): rank 0 alone finds it out
    torchrun_sig  torchrun, 2 processes training for long; SIGTERM to torchrun, once step 0 is printed

Runs other than torchrun's are started by one helper Python (the forker), each rank a fresh Python with the
environment torchrun gives a worker (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and each with
its own stdout and stderr. a, b and c take the same global batch of 8 windows at every step, split three
ways, so they must reach the same weights; so must a2 and b9. The learning rate is constant (no warm-up,
min_lr = learning_rate): resuming with a larger max_iters then keeps the schedule of the steps already taken.
"""

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SERIAL_ENV, TINY

import gpt

SETTINGS = [
    *(a for a in TINY if not a.startswith(("--batch_size", "--max_iters", "--eval_interval"))),
    "--eval_interval=3",
    "--warmup_iters=0",
    "--learning_rate=1e-3",
    "--min_lr=1e-3",
]
STEPS, MORE_STEPS = 6, 9
TIMEOUT = 120  # seconds for all the runs: a run that hangs fails the tests instead of hanging the suite
GRACE = 20  # seconds torchrun gives its workers to stop before it kills them (its default: 30)
INTERRUPTED = re.compile(r"^interrupted at step (\d+): saved (\S+); continue with --resume$", re.M)

# Reads a JSON line {job: {argv, env, stdout, stderr}} per group of runs, starts a process for each job that
# runs gpt.main(argv), prints their pids as a JSON line, then a line {job: exit status} as each one ends.
FORKER = r"""
import json, os, subprocess, sys, time

# each job is a fresh Python: forking one that has imported torch can leave a child stuck on a lock that
# another thread held at the fork (seen here: a gloo rank that never returned from its teardown)
CHILD = (
    "import faulthandler, json, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
    "sys.path.insert(0, sys.argv[1]); import gpt; exec(sys.argv[3]); sys.exit(gpt.main(json.loads(sys.argv[2])))"
)

def start(job):
    with open(job["stdout"], "w") as out, open(job["stderr"], "w") as err:
        argv = [sys.executable, "-c", CHILD, sys.argv[1], json.dumps(job["argv"]), job["prelude"]]
        return subprocess.Popen(argv,
                                stdout=out, stderr=err, env={**os.environ, **job["env"]}, cwd=job["cwd"])

for line in sys.stdin:
    running = {name: start(job) for name, job in json.loads(line).items()}
    print(json.dumps({name: child.pid for name, child in running.items()}), flush=True)
    while running:
        for name, child in list(running.items()):
            if child.poll() is not None:
                print(json.dumps({name: child.returncode}), flush=True)
                del running[name]
        time.sleep(0.05)
"""


# Each process counts the graphs that torch.compile hands its backend while DDP's forward runs, and outside it: Dynamo
# splits the graph at DDP's gradient buckets (so that their all-reduce overlaps the backward) only inside it.
COUNT_GRAPHS = """
import atexit, json, torch
from torch.nn.parallel import DistributedDataParallel
graphs = {"in DDP": 0, "outside": 0}
def counting(gm, example_inputs):
    graphs["in DDP" if DistributedDataParallel._get_active_ddp_module() is not None else "outside"] += 1
    return gm.forward
compile = torch.compile
torch.compile = lambda model: compile(model, backend=counting)
atexit.register(lambda: print("graphs " + json.dumps(graphs), flush=True))
"""

# Rank 1 alone sees its loss turn into NaN at its third step (step 2), just before the evaluation of step 3.
NAN_ON_RANK_1 = """
import os
if os.environ["RANK"] == "1":
    steps, train_step = [], gpt.train_step
    def train_step_gone_nan(*args):
        steps.append(1)
        loss = train_step(*args)
        return loss * float("nan") if len(steps) == 3 else loss
    gpt.train_step = train_step_gone_nan
"""


# Each process keeps the mask dropout drew on the embeddings (GPT.drop) at its first training step, in mask<RANK>.pt.
FIRST_MASK = """
import os, torch
steps, train_step = [], gpt.train_step
def keep_the_first_mask(model, *args):
    steps.append(1)
    if len(steps) > 1:
        return train_step(model, *args)
    keep = lambda module, args, out: torch.save(out == 0, f"mask{os.environ['RANK']}.pt")
    hook = getattr(model, "module", model).drop.register_forward_hook(keep)  # inside DDP: its module
    try:
        return train_step(model, *args)
    finally:
        hook.remove()
gpt.train_step = keep_the_first_mask
"""


def child_env():
    """One thread per process, unbuffered output, gloo on the loopback interface, no distributed settings
    inherited from whoever runs pytest, and a shorter grace period for torchrun's workers."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_", "TORCHELASTIC_", "GROUP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(SERIAL_ENV, PYTHONUNBUFFERED="1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(GRACE))
    if sys.platform == "linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One run of `gpt.py args` with world_size processes: its folder holds out/ (its out_dir) and the
    output of each rank, stdout0, stderr0, stdout1, ... (torchrun's runs: only stdout0 and stderr0)."""

    def __init__(self, folder, args, world_size=1, elsewhere=False, prelude=""):
        """elsewhere: rank 0 runs in folder, the others in folder/elsewhere, and out_dir is the relative path out.
        prelude: Python that each process runs after importing gpt, before gpt.main (a stand-in, a counter)."""
        self.folder, self.world_size, self.elsewhere, self.prelude = Path(folder), world_size, elsewhere, prelude
        self.out_dir = self.folder / "out"
        self.args = [*args, f"--out_dir={'out' if elsewhere else self.out_dir}"]
        self.folder.mkdir(parents=True)
        if elsewhere:
            (self.folder / "elsewhere").mkdir()
        self.returncodes = None  # one per process; torchrun's runs: torchrun's

    def stdout(self, rank=0):
        return (self.folder / f"stdout{rank}").read_text()

    def stderr(self, rank=0):
        return (self.folder / f"stderr{rank}").read_text()

    def jobs(self):
        """The forker's jobs for this run, by name/rank; each rank set up as torchrun sets up a worker."""
        port = free_port()
        jobs = {}
        for rank in range(self.world_size):
            env = dict(
                RANK=rank,
                LOCAL_RANK=rank,
                WORLD_SIZE=self.world_size,
                LOCAL_WORLD_SIZE=self.world_size,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
            jobs[f"{self.folder.name}/{rank}"] = {
                "argv": self.args,
                "env": {k: str(v) for k, v in env.items()} if self.world_size > 1 else {},
                "stdout": str(self.folder / f"stdout{rank}"),
                "stderr": str(self.folder / f"stderr{rank}"),
                "cwd": str(self.folder / "elsewhere" if self.elsewhere and rank > 0 else self.folder),
                "prelude": self.prelude,
            }
        return jobs

    def torchrun(self):
        """Start `torchrun gpt.py args` on this machine alone; the rendezvous takes a free port on 127.0.0.1.
        The workers write to torchrun's stdout and stderr, and those go to stdout0 and stderr0."""
        with open(self.folder / "stdout0", "w") as out, open(self.folder / "stderr0", "w") as err:
            torchrun = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=1",
                "--rdzv-backend=c10d",
                "--rdzv-endpoint=127.0.0.1:0",
                f"--nproc_per_node={self.world_size}",
            ]
            return subprocess.Popen(
                [*torchrun, str(ROOT / "gpt.py"), *self.args],
                stdout=out,
                stderr=err,
                text=True,
                env=child_env(),
                start_new_session=True,
            )


class Forker:
    """A Python that starts the processes of one group of runs at a time and reports their ends; see FORKER."""

    def __init__(self, folder):
        self.stderr = open(Path(folder) / "forker.stderr", "w")  # closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORKER, str(ROOT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=child_env(),
            start_new_session=True,
        )
        # its lines, read as they come (select() on the pipe would miss lines already read into a buffer)
        self.lines = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()

    def _read_lines(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # the forker has ended

    def start(self, runs, deadline):
        """Start the processes of `runs` (only once those started before have ended); returns their pids by
        name/rank."""
        self.status = {}
        self.proc.stdin.write(json.dumps({k: v for run in runs for k, v in run.jobs().items()}) + "\n")
        self.proc.stdin.flush()
        pids = self.read(deadline)
        assert pids is not None, f"the forker did not start {list(runs)} in time; see forker.stderr"
        return pids

    def wait(self, runs, deadline):
        """Wait until the processes of `runs` have ended, and set their returncodes; False if the deadline
        comes first."""
        jobs = [[f"{run.folder.name}/{rank}" for rank in range(run.world_size)] for run in runs]
        while not all(job in self.status for ranks in jobs for job in ranks):
            status = self.read(deadline)
            if status is None:
                return False
            self.status.update(status)
        for run, ranks in zip(runs, jobs, strict=True):
            run.returncodes = [self.status[job] for job in ranks]
        return True

    def read(self, deadline):
        try:
            line = self.lines.get(timeout=max(0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        assert line is not None, "the forker died; see forker.stderr"
        return json.loads(line)

    def kill(self):
        """Stop the forker and every process it started, after they have written where they are stuck."""
        os.killpg(self.proc.pid, signal.SIGUSR1)  # faulthandler: the stacks, into each process's stderr
        time.sleep(1)
        os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self):
        self.proc.stdin.close()  # the forker's loop ends
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stderr.close()


def interrupt_when_training(run, send_signal, deadline, after="step 0/"):
    """Once rank 0 of run has printed a line that starts with `after`, call send_signal(); note whether and when."""
    run.signalled = False
    while not run.signalled and time.monotonic() < deadline:
        time.sleep(0.05)
        run.signalled = any(line.startswith(after) for line in run.stdout().splitlines())
    send_signal()
    run.signalled_at = time.monotonic()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch has no gloo backend")
    root = tmp_path_factory.mktemp("ddp")
    common = [*SETTINGS, f"--data={corpus}"]
    long_run = [*common, "--batch_size=4", "--max_iters=100000", "--eval_interval=100000"]
    short = [*common, "--batch_size=4", f"--max_iters={STEPS}"]
    runs = {
        "a": Run(root / "a", [*common, "--batch_size=4", f"--max_iters={STEPS}"], world_size=2),
        "b": Run(root / "b", [*common, "--batch_size=8", f"--max_iters={STEPS}"]),
        "b9": Run(root / "b9", [*common, "--batch_size=8", f"--max_iters={MORE_STEPS}"]),
        "c": Run(root / "c", [*common, "--batch_size=4", "--gradient_accumulation_steps=2", f"--max_iters={STEPS}"]),
        "a2": Run(root / "a2", [*common, "--batch_size=4", f"--max_iters={MORE_STEPS}", "--resume"], 2, elsewhere=True),
        "sig": Run(root / "sig", [*long_run, "--dropout=0.5"], world_size=2, prelude=FIRST_MASK),
        "torchrun_sig": Run(root / "torchrun_sig", long_run, world_size=2),
        # an evaluation of 10^6 batches: Ctrl-C in a terminal sends SIGINT to every process
        "eval_sig": Run(root / "eval_sig", [*long_run, "--eval_iters=1000000"], world_size=2),
        # compiled, and rank 1's loss NaN at step 2: the graphs of the trial and of step 0's evaluation, then a stop
        "compiled_nan": Run(root / "compiled_nan", [*short, "--compile=true"], 2, prelude=COUNT_GRAPHS + NAN_ON_RANK_1),
        "nothing_to_resume": Run(root / "nothing_to_resume", [*short, "--resume"], world_size=2),  # under torchrun
        "locked": Run(root / "locked", short, world_size=2),
    }
    runs["locked"].out_dir.mkdir()
    holder = gpt.lock_out_dir(runs["locked"].out_dir)  # as another training run holds it: released in the end
    deadline = time.monotonic() + TIMEOUT
    launchers = {name: runs[name].torchrun() for name in ("a", "torchrun_sig", "nothing_to_resume")}
    forker = Forker(root)
    try:
        first = [runs[name] for name in ("b", "b9", "c", "sig", "eval_sig", "compiled_nan", "locked")]
        pids = forker.start(first, deadline)
        interrupt_when_training(runs["sig"], lambda: os.kill(pids["sig/1"], signal.SIGTERM), deadline)
        ctrl_c = lambda: [os.kill(pids[f"eval_sig/{rank}"], signal.SIGINT) for rank in range(2)]
        interrupt_when_training(runs["eval_sig"], ctrl_c, deadline, after="batch ")  # the evaluation of step 0 is next
        if not forker.wait([runs["eval_sig"]], min(deadline, runs["eval_sig"].signalled_at + GRACE)):
            for rank in range(2):
                os.kill(pids[f"eval_sig/{rank}"], signal.SIGKILL)
        runs["eval_sig"].seconds_to_stop = time.monotonic() - runs["eval_sig"].signalled_at
        interrupt_when_training(runs["torchrun_sig"], lambda: launchers["torchrun_sig"].terminate(), deadline)
        if not forker.wait([runs["sig"]], min(deadline, runs["sig"].signalled_at + GRACE)):
            for rank in range(2):  # they did not stop: the test says so, the others go on
                os.kill(pids[f"sig/{rank}"], signal.SIGKILL)
        runs["sig"].seconds_to_stop = time.monotonic() - runs["sig"].signalled_at
        if not forker.wait(first, deadline):
            forker.kill()
            pytest.fail(f"the runs took more than {TIMEOUT} s; their stacks are in their stderr files")
        for name, launcher in launchers.items():
            try:
                launcher.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} took more than {TIMEOUT} s")
            runs[name].returncodes = [launcher.returncode]
        runs["torchrun_sig"].seconds_to_stop = time.monotonic() - runs["torchrun_sig"].signalled_at  # at most

        if runs["a"].out_dir.exists():  # a copy, so that a's out_dir stays as a left it
            shutil.copytree(runs["a"].out_dir, runs["a2"].out_dir)
        forker.start([runs["a2"]], deadline)
        if not forker.wait([runs["a2"]], deadline):
            forker.kill()
            pytest.fail(f"the runs took more than {TIMEOUT} s; their stacks are in their stderr files")
    finally:
        holder.close()
        forker.close()
        for launcher in launchers.values():
            if launcher.poll() is None:
                launcher.terminate()  # torchrun passes it on to its workers, and kills them after GRACE
                launcher.wait(timeout=GRACE + 10)
    return runs


def finished(run):
    """run, after checking that all its processes ended well."""
    output = "".join(run.stdout(rank) + run.stderr(rank) for rank in range(len(run.returncodes)))
    assert run.returncodes == [0] * len(run.returncodes), output
    assert "Traceback" not in output
    return run


def weights(run, step):
    """The model tensors of run's ckpt.pt, after checking that it was saved at `step`."""
    ckpt = gpt.load_checkpoint(run.out_dir / "ckpt.pt")
    assert ckpt["step"] == step, f"{run.out_dir}/ckpt.pt is from step {ckpt['step']}, not {step}"
    return ckpt["model"]


def max_difference(w1, w2):
    assert w1.keys() == w2.keys()
    return max((w1[k] - w2[k]).abs().max().item() for k in w1)


def metrics(run):
    return [json.loads(line) for line in (run.out_dir / "metrics.jsonl").read_text().splitlines()]


def files(run):
    return sorted(p.name for p in run.out_dir.iterdir())


def progress_steps(run):
    return [line.split(" |")[0] for line in run.stdout().splitlines() if line.startswith("step ")]


# ---- the same global batch, split three ways ------------------------------------------------------------


def test_two_processes_one_process_and_accumulation_reach_the_same_weights(runs):
    a, b, c = (finished(runs[name]) for name in "abc")
    wa, wb, wc = (weights(run, STEPS) for run in (a, b, c))
    assert max_difference(wa, wb) < 1e-5
    assert max_difference(wc, wb) < 1e-5
    # and the weights moved: what agrees is the training, not only the shared initialisation
    ckpt = gpt.load_checkpoint(b.out_dir / "ckpt.pt")
    torch.manual_seed(ckpt["config"]["seed"])
    initial = gpt.GPT(len(ckpt["vocab"]), gpt.Config(**ckpt["config"])).state_dict()
    assert max_difference(initial, wb) > 1e-3


def test_the_evaluations_agree_too(runs):
    """Evaluation draws the same global batches in all three, so the losses logged agree, and the batch
    generator stays in step from one evaluation to the next (else the weights above would differ)."""
    rows = {name: metrics(finished(runs[name])) for name in "abc"}
    for name in "abc":
        assert [r["step"] for r in rows[name]] == [0, 3, 6]  # one row per evaluation, not one per process
    for name in "ac":
        for mine, single in zip(rows[name], rows["b"], strict=True):
            assert mine["train_loss"] == pytest.approx(single["train_loss"], abs=2e-4)
            assert mine["val_loss"] == pytest.approx(single["val_loss"], abs=2e-4)
    assert rows["b"][-1]["val_loss"] < rows["b"][0]["val_loss"] - 0.05  # it learned something


def test_the_effective_batch_is_printed_at_start(runs):
    expected = {
        "a": "batch 4 x 1 accumulation x 2 process(es) = 8 sequences of 16 = 128 tokens per iteration",
        "b": "batch 8 x 1 accumulation x 1 process(es) = 8 sequences of 16 = 128 tokens per iteration",
        "c": "batch 4 x 2 accumulation x 1 process(es) = 8 sequences of 16 = 128 tokens per iteration",
    }
    for name, line in expected.items():
        lines = finished(runs[name]).stdout().splitlines()
        assert lines[1].endswith(f"| {2 if name == 'a' else 1} process(es)")  # after what will be trained
        assert lines[2] == line


# ---- 2 processes end to end ------------------------------------------------------------------------------


def test_torchrun_prints_once_and_writes_one_checkpoint_and_one_metrics_file(runs):
    a = finished(runs["a"])
    assert files(a) == ["ckpt.pt", "metrics.jsonl"]
    lines = a.stdout().splitlines()  # both workers write to torchrun's stdout
    assert progress_steps(a) == ["step 0/6", "step 3/6", "step 6/6"]
    for start in ("batch ", "sample from the best model (step 6,", "final: "):
        assert sum(line.startswith(start) for line in lines) == 1, a.stdout()
    assert sum("parameters | device cpu" in line for line in lines) == 1
    assert sum(line.startswith('  "') for line in lines) == 3  # a line of text per evaluation, from rank 0 alone


def test_resume_with_two_processes_continues_exactly(runs):
    a2, b9 = finished(runs["a2"]), finished(runs["b9"])
    assert max_difference(weights(a2, MORE_STEPS), weights(b9, MORE_STEPS)) < 1e-5
    # the rows up to the checkpoint are kept and the new one is added once; step 6 is not evaluated again
    assert metrics(a2)[:3] == metrics(runs["a"])
    assert [r["step"] for r in metrics(a2)] == [0, 3, 6, 9]
    assert progress_steps(a2) == ["step 9/9"]
    assert files(a2) == ["ckpt.pt", "metrics.jsonl"]
    assert a2.stdout(rank=1) == ""  # rank 1 prints nothing at all
    assert list((a2.folder / "elsewhere").iterdir()) == []  # rank 0 sent it the checkpoint; it wrote nothing


# ---- signals --------------------------------------------------------------------------------------------


def test_a_signal_to_one_process_stops_all_at_the_same_step(runs):
    """Even when only one process gets SIGTERM (or SIGINT), all stop after the same step, rank 0 saves
    last.pt, and every process exits with 128 + the signal's number."""
    sig = runs["sig"]
    assert sig.signalled, sig.stdout() + sig.stderr()
    assert sig.returncodes == [128 + signal.SIGTERM] * 2, sig.stdout() + sig.stderr(0) + sig.stderr(1)
    stopped = INTERRUPTED.findall(sig.stdout())
    assert len(stopped) == 1, sig.stdout()
    assert Path(stopped[0][1]) == sig.out_dir / "last.pt"
    assert gpt.load_checkpoint(sig.out_dir / "last.pt")["step"] == int(stopped[0][0])
    assert files(sig) == ["ckpt.pt", "last.pt", "metrics.jsonl"]
    assert [r["step"] for r in metrics(sig)] == [0]
    assert sig.stdout(rank=1) == ""
    assert sig.seconds_to_stop < GRACE


def test_each_process_draws_dropout_masks_of_its_own(runs):
    """docs/multi-gpu.md: each process draws its own dropout masks. Seeded alike, the processes would drop the same
    units in their shares of the global batch. Here the masks on the embeddings at the first step."""
    sig = runs["sig"]
    masks = [torch.load(sig.folder / f"mask{rank}.pt", weights_only=True) for rank in range(2)]
    assert all(m.shape == (4, 16, 32) for m in masks)  # batch 4 of each process, context 16, 32 wide
    assert all(0.4 < m.float().mean().item() < 0.6 for m in masks)  # dropout 0.5 at work in each
    assert (masks[0] != masks[1]).float().mean().item() > 0.3  # two draws: about half the places differ


def test_ctrl_c_cuts_the_evaluation_short_in_every_process(runs):
    """Ctrl-C during an evaluation (here one of a million batches): every process gives it up, rank 0 saves
    last.pt at that step, marked as not evaluated, and all exit with 130, long before the evaluation would end."""
    run = runs["eval_sig"]
    assert run.signalled, run.stdout() + run.stderr()
    assert run.returncodes == [130, 130], run.stdout() + run.stderr(0) + run.stderr(1)
    assert INTERRUPTED.findall(run.stdout()) == [("0", str(run.out_dir / "last.pt"))]
    last = gpt.load_checkpoint(run.out_dir / "last.pt")
    assert (last["step"], last["evaluated_step"]) == (0, -1)  # --resume evaluates step 0 again
    assert files(run) == ["last.pt", "metrics.jsonl"] and metrics(run) == []
    assert run.stdout(rank=1) == "" and "stopping: " not in run.stderr(1)  # rank 0 alone answers
    assert "stopping: " in run.stderr(0)
    assert run.seconds_to_stop < GRACE


def test_sigterm_to_torchrun_stops_its_workers_and_saves_once(runs):
    """What a scheduler or `kill` does: torchrun passes the signal on to every worker and waits for them,
    killing them after a grace period. They stop well before it, and rank 0 saves last.pt."""
    run = runs["torchrun_sig"]
    assert run.signalled, run.stdout() + run.stderr()
    stopped = INTERRUPTED.findall(run.stdout())
    assert len(stopped) == 1, run.stdout() + run.stderr()
    assert gpt.load_checkpoint(run.out_dir / "last.pt")["step"] == int(stopped[0][0])
    assert files(run) == ["ckpt.pt", "last.pt", "metrics.jsonl"]
    assert [r["step"] for r in metrics(run)] == [0]
    assert "forcefully" not in run.stderr()  # torchrun had no worker to kill
    assert run.seconds_to_stop < GRACE


def test_the_processes_agree_on_a_stop_a_step_later_without_waiting(monkeypatch):
    """Each step sends this process's signal number to the others without waiting (on a gloo group of its own, on
    the CPU), and reads what all of them sent the step before: no step waits for the slowest process, and all stop
    at the same step. A signal handled while the numbers travel is sent at the next step, not overwritten with the
    others' 0; a signal that only another process got stops this one too."""
    sent, others = [], [0, 0, signal.SIGINT, 0]  # what the other process sends at each step

    class Work:
        def __init__(self, flag):
            self.flag, self.theirs = flag, others[len(sent) - 1]

        def wait(self):
            self.flag.fill_(max(int(self.flag), self.theirs))

    def all_reduce(flag, op, group, async_op):
        assert (op, group, async_op) == (torch.distributed.ReduceOp.MAX, "gloo group", True)
        sent.append(int(flag))
        return Work(flag)

    monkeypatch.setattr(torch.distributed, "new_group", lambda backend: "gloo group" if backend == "gloo" else None)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    stop = gpt.StopRequest(world_size=2, quiet=True)
    try:
        assert stop.requested() == 0  # nothing received yet
        stop.handle(signal.SIGTERM, None)  # this process's own signal, while the numbers travel
        assert stop.requested() == 0  # the step before, nobody had one
        assert stop.requested() == signal.SIGTERM  # now everybody knows
        assert sent == [0, signal.SIGTERM, signal.SIGTERM]
    finally:
        stop.restore()
    sent.clear()
    stop = gpt.StopRequest(world_size=2, quiet=True)
    try:
        assert [stop.requested() for _ in range(4)] == [0, 0, 0, signal.SIGINT]  # the other's, a step after it sent it
        assert sent == [0, 0, 0, 0]
    finally:
        stop.restore()


# ---- one verdict for all processes ----------------------------------------------------------------------


def test_under_torchrun_the_model_is_compiled_inside_ddp(runs):
    """DDP first, torch.compile after, and the compile trial before step 0 run through both: every graph is compiled
    while DDP's forward runs, where Dynamo cuts it at the gradient buckets. (When the trial compiled the model before
    DDP wrapped it, no graph was compiled inside DDP, and the gradients were all-reduced after the whole backward.)"""
    run = runs["compiled_nan"]
    assert "| compile on |" in run.stdout()
    for rank in range(2):
        graphs = json.loads(next(line for line in run.stdout(rank).splitlines() if line.startswith("graphs "))[7:])
        assert graphs["in DDP"] >= 2 and graphs["outside"] == 0, graphs  # training's graph and evaluation's


def test_a_loss_gone_nan_in_one_process_stops_all_of_them_with_one_error(runs):
    """Before, the process that saw it stopped while the other entered the evaluation's all-reduce, and died there
    (gloo) or hung (NCCL). Now all agree on the first bad step before the evaluation, and rank 0 alone says so."""
    run = runs["compiled_nan"]
    assert run.returncodes == [1, 1], run.stdout() + run.stderr(0) + run.stderr(1)
    errors = [line for rank in range(2) for line in run.stderr(rank).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: the loss was not finite at step 2: training stopped.")
    assert errors[0] in run.stderr(0).splitlines()
    assert "Traceback" not in run.stderr(0) + run.stderr(1)
    assert [r["step"] for r in metrics(run)] == [0]  # the broken model was never evaluated, nor saved


def test_a_mistake_under_torchrun_is_one_error_line(runs):
    run = runs["nothing_to_resume"]
    assert run.returncodes != [0]
    errors = [line for line in run.stderr().splitlines() if line.startswith("error:")]
    assert errors == [f"error: --resume, but there is no checkpoint in {run.out_dir}/; train without --resume first"]
    assert "destroy_process_group" not in run.stderr()  # each process left its process group before exiting


def test_an_error_in_rank_0_alone_stops_every_process_with_one_line(runs):
    """Only rank 0 touches out_dir (so it alone finds it in use, or not writable, or full): all processes stop there
    and rank 0 alone says why. Before, the others went on into their next collective and died there (gloo: a
    traceback, "Connection closed by peer") or waited until torchrun killed them (NCCL)."""
    run = runs["locked"]
    assert run.returncodes == [1, 1], run.stdout() + run.stderr(0) + run.stderr(1)
    advice = "wait for it to end or stop it, or train into another --out_dir"
    error = f"error: --out_dir={run.out_dir} is in use by another training run (process {os.getpid()}); {advice}"
    assert [line for line in run.stderr(0).splitlines() if "error" in line.lower()] == [error]
    assert "error" not in run.stderr(1).lower() and run.stdout(0) == run.stdout(1) == ""
    assert "Traceback" not in run.stderr(0) + run.stderr(1)
    assert files(run) == ["train.lock"]  # nothing written there
