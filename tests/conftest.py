"""Shared fixtures: small toy datasets in a temporary folder and a way to run a pipeline script
in-process with overridden constants (as `python script.py --key=value` would)."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from data.arithmetic import prepare
from support.files import release_locks

torch.set_num_threads(min(2, torch.get_num_threads()))


def run_script(name, **overrides):
    """Import a fresh copy of a pipeline script, override its constants, run its main()."""
    module = importlib.reload(importlib.import_module(name))
    for key, value in overrides.items():
        assert key in vars(module), f"{name}.py has no setting {key}"
        setattr(module, key, value)
    try:
        module.main()
    finally:
        release_locks()  # as the script's process would at its exit
    return module


def run_argv(argv):
    """Run `python argv[0] argv[1:]` as the interpreter would, but in this process: the script file
    executed afresh as __main__ (runpy), sys.argv set, so its settings, its checks and its exit code
    are the real ones, without starting Python and importing torch again (a second or two per case:
    most of what the tables of bad inputs took). Returns (exit code, stderr)."""
    import contextlib
    import io
    import runpy
    import traceback
    err, code, argv_before, cwd_before = io.StringIO(), 0, sys.argv, os.getcwd()
    os.chdir(REPO)
    sys.argv = [argv[0], *map(str, argv[1:])]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(os.path.join(REPO, argv[0]), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:   # what the interpreter would print as a traceback, with exit code 1
        err.write(traceback.format_exc())
        code = 1
    finally:
        release_locks()   # as the script's process would at its exit
        sys.argv = argv_before
        os.chdir(cwd_before)
    return code, err.getvalue()


def script_in_process(*argv):
    """run_argv, answered as subprocess.run answers (returncode, stdout, stderr)."""
    code, stderr = run_argv(argv)
    return subprocess.CompletedProcess(argv, code, "", stderr)


def run_command(line):
    """Run a command line as the README writes it ("python data/text/prepare.py --key=value ..."):
    the script's module in-process, its constants overridden by the --key=value arguments."""
    from support.config import apply_overrides
    words = line.split()
    assert words[0] == "python" and words[1].endswith(".py"), line
    module = importlib.reload(importlib.import_module(words[1][:-3].replace("/", ".")))
    apply_overrides(vars(module), words[2:])
    try:
        module.main()
    finally:
        release_locks()
    return module


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """The four toy tasks, small: returns {task: absolute dataset path}."""
    root = tmp_path_factory.mktemp("arithmetic")
    prepare.write_tasks(str(root), n_train=4000, n_val=64)
    return {task: str(root / task) for task in prepare.TASKS}


TINY_MODEL = dict(width=32, depth=1, head_dim=8)


@pytest.fixture(scope="session")
def tiny_checkpoint(toy_data, tmp_path_factory):
    """A tiny model pretrained for a few steps on reversal and sort (so two dataset tokens)."""
    out = tmp_path_factory.mktemp("pretrain")
    run_script("pretrain", datasets=f"{toy_data['reversal']},{toy_data['sort']}", out_dir=str(out),
               max_steps=30, eval_interval=30, eval_sequences=32, batch_size=32, warmup_steps=5,
               device="cpu", **TINY_MODEL)
    return os.path.join(out, "ckpt.pt")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_two_processes_match_one(argv, out_dir):
    """Run a training script once as one process and once under torchrun with two (gloo on CPU):
    the logged losses must agree step for step (every rank trains on its slice of the same global
    batch, so two processes follow the single-process trajectory)."""
    one = subprocess.run([sys.executable, *argv, f"--out_dir={out_dir}/one"], cwd=REPO, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    # --standalone: a free local port for every run, so back-to-back runs never collide
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run([*torchrun, *argv, f"--out_dir={out_dir}/two"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    # the workers' own messages come first; torchrun's summary at the end says only who died
    assert two.returncode == 0, "\n".join(l for l in two.stderr.splitlines() if "it/s" not in l)[:4000]
    logs = [[json.loads(l) for l in open(os.path.join(out_dir, d, "log.jsonl"))] for d in ("one", "two")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] and len(logs[0]) > 1
    for a, b in zip(*logs):
        for key in a:
            if key.startswith(("train_loss", "loss_", "val_loss")) and a[key] is not None:
                assert abs(a[key] - b[key]) < 1e-4, (argv[0], a["step"], key, a[key], b[key])
    return logs[0]


def greedy_by_recomputing(model, prompt, new_tokens):
    """Greedy decoding the slow, obvious way: run the whole prefix again for every new token."""
    out = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out
