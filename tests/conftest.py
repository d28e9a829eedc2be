"""Shared fixtures: small toy datasets in a temporary folder and a way to run a pipeline script
in-process with overridden constants (as `python script.py --key=value` would)."""
import importlib
import os

import pytest
import torch

from data.arithmetic import prepare

torch.set_num_threads(min(2, torch.get_num_threads()))


def run_script(name, **overrides):
    """Import a fresh copy of a pipeline script, override its constants, run its main()."""
    module = importlib.reload(importlib.import_module(name))
    for key, value in overrides.items():
        assert key in vars(module), f"{name}.py has no setting {key}"
        setattr(module, key, value)
    module.main()
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
