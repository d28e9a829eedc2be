"""
A script's settings: the constants at its top, overridden by --key=value on the command line,
checked before any work starts; the device and seed they name. Bad input is a UserError, reported
as one line with its fix and exit code 2, never as a traceback.
"""
import ast
import os
import sys

import numpy as np
import torch


class UserError(Exception):
    """Bad input from the user: reported as one line with the fix, never as a traceback."""


def fail(message):
    """Exit with a one-line error and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# what a script that runs out of memory undoes before it stops: e.g. the log of a fresh run that no
# checkpoint followed (training.TrainingLog registers it), so that nothing of the run is left behind
ON_OUT_OF_MEMORY = []


def out_of_memory(error):
    text = str(error)
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()))


def run(main, config):
    """A script's entry point: apply the --key=value overrides to its constants (its globals()),
    run main(), and turn bad input (UserError) into one line on stderr instead of a traceback; so
    too running out of memory, which the size estimates before the work did not foresee."""
    try:
        apply_overrides(config, sys.argv[1:])
        main()
    except UserError as e:
        fail(e)
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        undone = [undo() for undo in ON_OUT_OF_MEMORY]
        fail(f"out of memory ({text_of(e)}): use a smaller --batch_size (or --block_size, --num_samples, "
             f"--eval_sequences){'; ' + ', '.join(u for u in undone if u) if any(undone) else ''}")


def text_of(error):
    return str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__


def apply_overrides(config, argv):
    """nanoGPT-style overrides. `config` is a script's globals(); every --key=value must name an
    existing constant, and the value is parsed as a Python literal of the same type
    (strings may be given bare: --out_dir=out/run1)."""
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"cannot parse argument {arg!r}: use --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in config or key.startswith("_"):
            raise UserError(f"unknown setting --{key}: see the constants at the top of the script")
        old = config[key]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string
        if isinstance(old, bool) and not isinstance(value, bool):
            raise UserError(f"--{key} expects True or False, got {text!r}")
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, str) and not isinstance(value, str):
            value = text  # e.g. --dataset=123 meant the string (and --out_dir=None the word)
        elif old is not None and type(value) is not type(old):
            raise UserError(f"--{key} expects a {type(old).__name__}, got {text!r}")
        config[key] = value


def config_snapshot(config, keys):
    """The settings a run used, as plain JSON-able values (stored in checkpoints and logs)."""
    return {k: config[k] for k in keys}


def check_training_settings(config):
    """Settings the training scripts share (config: a script's globals()): refuse the values that
    would fail later with a traceback or train silently otherwise than asked."""
    c = config
    checks = [  # (what must hold, what to do otherwise)
        (c["learning_rate"] > 0, "--learning_rate must be positive"),
        (0 <= c.get("min_lr", 0.0) <= c["learning_rate"], "--min_lr must be between 0 and --learning_rate"),
        (c["warmup_steps"] >= 0, "--warmup_steps must be >= 0"),
        (0 <= c["beta1"] < 1 and 0 <= c["beta2"] < 1, "--beta1 and --beta2 must be in [0, 1)"),
        (c["weight_decay"] >= 0, "--weight_decay must be >= 0"),
        (c["schedule"] in ("constant", "cosine"), f"--schedule={c['schedule']!r} must be constant or cosine"),
        (c["dtype"] in ("float32", "bfloat16", "auto"),
         f"--dtype={c['dtype']!r} must be float32, bfloat16 or auto (float16 would need loss scaling, which these "
         f"scripts do not do)"),
        (c["batch_size"] > 0 and c["eval_interval"] > 0 and c["eval_sequences"] > 0,
         "--batch_size, --eval_interval and --eval_sequences must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def set_seed(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    return np.random.default_rng(seed)


def memory_bytes():
    """This machine's physical memory (what a size estimate is checked against)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def pick_device(device):
    """--device: auto (a CUDA GPU if there is one), cpu, cuda or cuda:N, mps."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"--device={device}: this machine has no CUDA GPU that torch can use; "
                            f"use --device=cpu")
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device=mps: this machine has no Apple GPU that torch can use; "
                            "use --device=cpu")
        return device
    raise UserError(f"--device={device!r} must be auto, cpu, cuda, cuda:N or mps")


def pick_dtype(dtype, device):
    """--dtype=auto: bfloat16 where this machine multiplies in it fast, float32 elsewhere. A CPU
    with native bf16 (AVX-512 BF16, AMX) ran the matmuls of a SmolLM2-sized layer ~2x faster under
    bf16 autocast; one with AVX2 only ran them 6x *slower* (and plain bf16 products 200x slower).
    So on a CPU it is measured: one such layer both ways, a few times, the median; bf16 only if it
    is at least 1.3x faster. On CUDA: bf16 where the GPU supports it."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device != "cpu":
        return "float32"
    import time
    x, w = torch.randn(512, 576), torch.randn(1536, 576)

    def median_seconds(bf16):
        times = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for _ in range(7):
                started = time.perf_counter()
                for _ in range(4):
                    torch.nn.functional.linear(x, w)
                times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    median_seconds(True)  # (the first call sets up the kernels)
    return "bfloat16" if median_seconds(False) >= 1.3 * median_seconds(True) else "float32"
