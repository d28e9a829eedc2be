"""
Checkpoints: {"model": state_dict, "model_config": dict, "data": {dataset: meta}, "config": dict,
"step": int, ...}. Plain tensors and Python literals only, so they load with weights_only=True:
a checkpoint is data and can never run code.

A training checkpoint also carries what is needed to continue bit for bit (optimizer state, the
random generators, the step): `--resume=True` continues from out_dir/ckpt.pt.
"""
import json
import os

import torch

from model import GPT, GPTConfig
from support.config import UserError
from support.files import atomic_torch_save
from support.tokenizer import fingerprint as tokenizer_fingerprint


def save_checkpoint(path, model, state_dict=None, **fields):
    """state_dict: the plain GPT weights when they differ from model.state_dict() (LoRA)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {k: v.detach().cpu() for k, v in (state_dict or model.state_dict()).items()}
    atomic_torch_save({"model": state, "model_config": model.config.to_dict(), **fields}, path)


def load_checkpoint_dict(path, device="cpu"):
    """The raw checkpoint dict, loaded as data only: a pickle that would run code is refused."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} not found: run pretrain.py (or the stage before) first")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} could not be loaded safely ({type(e).__name__}): "
                        f"it is corrupt or not a nanoreplay checkpoint; re-create it") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a nanoreplay checkpoint (no model / model_config): re-create it")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """Returns (model, checkpoint dict)."""
    ckpt = load_checkpoint_dict(path, device)
    bad = [k for k, v in ckpt["model"].items() if torch.is_tensor(v) and v.is_floating_point()
           and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"checkpoint {path} holds NaN or infinite weights ({bad[0]}): it comes from a diverged or "
                        "damaged run; use an earlier checkpoint or re-create it")
    # a converted model's weights and tokenizer are two files written together; a convert.py killed
    # between its two renames, or run again into the same folder, leaves weights beside another
    # model's tokenizer: they carry the tokenizer's fingerprint to tell
    tokenizer = ckpt.get("tokenizer")
    if isinstance(tokenizer, dict) and os.path.isfile(tokenizer.get("tokenizer_path") or ""):
        found = tokenizer_fingerprint(tokenizer["tokenizer_path"])
        if found != tokenizer.get("tokenizer"):
            raise UserError(f"checkpoint {path} was made with tokenizer {tokenizer.get('tokenizer')}, but "
                            f"{tokenizer['tokenizer_path']} is now {found} (a convert.py into that folder was "
                            "interrupted or replaced it): run convert.py again")
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:160]
        raise UserError(f"checkpoint {path}: its weights do not fit its model_config ({reason}): it is damaged; "
                        "re-create it") from None
    return model.to(device), ckpt


RESUME_MAY_CHANGE = {"resume", "overwrite", "device", "compile", "eval_interval", "eval_sequences", "out_dir",
                     "bench_interval", "save_interval", "eval_dtype"}


def rng_state(rng, with_torch=True):
    """Where a numpy generator (and torch's global one) stands, to continue it exactly."""
    state = {"numpy": json.dumps(rng.bit_generator.state)}
    if with_torch:
        state["torch"] = torch.get_rng_state()
    return state


def restore_rng(rng, state):
    rng.bit_generator.state = json.loads(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])


def train_state(optimizer_state, rng, target_reached_at, **more):
    """What a checkpoint holds beyond the weights to continue its run bit for bit (target_reached_at:
    the step its target was reached at, from which it cools down; None: not yet)."""
    return {"optimizer": optimizer_state, "rng": rng_state(rng), "target_reached_at": target_reached_at, **more}


def load_for_resume(path, run_config, inputs=None, input_settings=()):
    """The checkpoint to continue from, or None to start fresh. Refuses to continue a run whose
    settings differ (other than those in RESUME_MAY_CHANGE), or whose input files (inputs: from
    input_fingerprints) are not the ones it started with: that would not be the same run. Settings
    that name input files (input_settings) are compared by the files' content, not their path."""
    if not os.path.exists(path):
        print(f"--resume: no checkpoint at {path}, starting from scratch")
        return None
    ckpt = load_checkpoint_dict(path)
    if "train_state" not in ckpt and not ckpt.get("finished"):
        raise UserError(f"{path} has no training state to resume from: delete it or drop --resume")
    by_content = set(input_settings) if "inputs" in ckpt else set()
    changed = sorted(k for k in run_config if k not in RESUME_MAY_CHANGE | by_content
                     and ckpt["config"].get(k) != run_config[k])
    if changed:
        old = ", ".join(f"{k}={ckpt['config'].get(k)!r}" for k in changed)
        raise UserError(f"cannot resume {path}: it was run with {old}; pass the same settings or "
                        "use a new --out_dir")
    for role, prints in (inputs or {}).items():
        if "inputs" in ckpt and ckpt["inputs"].get(role) != prints:
            raise UserError(f"cannot resume {path}: its input {role} ({run_config.get(role, role)}) is not "
                            "the file the run started from (other size or content): restore that file, or "
                            "start over with a new --out_dir")
    return ckpt


def resume_run(path, run_config, inputs, model, optimizer, rng, input_settings=(), load=None):
    """--resume: the run saved at `path` (checked by load_for_resume), loaded into the model, the
    optimizer and the random generators. None: nothing saved yet, start from scratch; a finished
    run comes back untouched. load(model, optimizer, weights, optimizer_state): another way to load
    (a sharded model's)."""
    saved = load_for_resume(path, run_config, inputs, input_settings)
    if saved is None or saved.get("finished"):
        return saved
    state = saved["train_state"]
    # finetune keeps the trained model's own weights here: with LoRA they are not the plain ones
    if load:
        load(model, optimizer, state.get("model", saved["model"]), state["optimizer"])
    else:
        model.load_state_dict(state.get("model", saved["model"]))
        optimizer.load_state_dict(state["optimizer"])
    restore_rng(rng, state["rng"])
    print(f"resuming {path} at step {saved['step']}")
    return saved
