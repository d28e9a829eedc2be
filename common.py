"""
Pieces every stage of the pipeline shares, each defined once:
command-line overrides, seeding, datasets on disk, checkpoints, evaluation. (The losses are in
objective.py.)
"""
import ast
import atexit
import contextlib
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from objective import kl_loss, ntp_loss

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


class UserError(Exception):
    """Bad input from the user: reported as one line with the fix, never as a traceback."""


def fail(message):
    """Exit with a one-line error and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(main, config):
    """A script's entry point: apply the --key=value overrides to its constants (its globals()),
    run main(), and turn bad input (UserError) into one line on stderr instead of a traceback."""
    try:
        apply_overrides(config, sys.argv[1:])
        main()
    except UserError as e:
        fail(e)
    finish_distributed()


# ----------------------------------------------------------------------------------------------
# configuration: constants at the top of a script, overridden by --key=value on the command line

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


def run_end(total_steps, cooldown_from, cooldown_steps):
    """The step a run ends at: total_steps, or cooldown_steps after the target reached at cooldown_from
    (cooldown_from = total_steps while none is)."""
    return min(total_steps, cooldown_from + cooldown_steps)


def lr_at(step, total_steps, peak_lr, warmup_steps, schedule="constant", min_lr=0.0, cooldown_from=None,
          cooldown_steps=0):
    """Linear warmup to peak_lr, then constant or cosine decay to min_lr at total_steps. A run that
    reached its target at step cooldown_from cools down: from there the rate falls linearly from
    where the schedule had it to 0 over cooldown_steps steps (the run ends at the last of them)."""
    if schedule not in ("constant", "cosine"):
        raise UserError(f"--schedule={schedule!r} must be constant or cosine")
    if cooldown_from is not None and step >= cooldown_from:
        return (lr_at(cooldown_from, total_steps, peak_lr, warmup_steps, schedule, min_lr)
                * (run_end(total_steps, cooldown_from, cooldown_steps) - step) / (cooldown_steps + 1))
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


def check_training_settings(config):
    """Settings the training scripts share (config: a script's globals()): refuse the values that
    would fail later with a traceback or train silently otherwise than asked."""
    checks = [
        (config["learning_rate"] > 0, "--learning_rate must be positive"),
        (0 <= config.get("min_lr", 0.0) <= config["learning_rate"], "--min_lr must be between 0 and --learning_rate"),
        (config["warmup_steps"] >= 0, "--warmup_steps must be >= 0"),
        (0 <= config["beta1"] < 1 and 0 <= config["beta2"] < 1, "--beta1 and --beta2 must be in [0, 1)"),
        (config["weight_decay"] >= 0, "--weight_decay must be >= 0"),
        (config["schedule"] in ("constant", "cosine"), f"--schedule={config['schedule']!r} must be constant or cosine"),
        (config["dtype"] in ("float32", "bfloat16"), f"--dtype={config['dtype']!r} must be float32 or bfloat16 "
                                                     f"(float16 would need loss scaling, which these scripts do not do)"),
        (config["batch_size"] > 0 and config["eval_interval"] > 0 and config["eval_sequences"] > 0,
         "--batch_size, --eval_interval and --eval_sequences must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def set_seed(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    return np.random.default_rng(seed)


def pick_device(device):
    """--device: auto (a CUDA GPU if there is one), cpu, cuda or cuda:N, mps."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"--device={device}: this machine has no CUDA GPU that torch can use; use --device=cpu")
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device=mps: this machine has no Apple GPU that torch can use; use --device=cpu")
        return device
    raise UserError(f"--device={device!r} must be auto, cpu, cuda, cuda:N or mps")


class _LinesEvery:
    """A file for tqdm when stderr is not a terminal (a log file, a pipe): instead of a carriage-return
    redraw per step (hundreds of KB of them in a log), one plain line every `seconds`, and the final
    state when the bar closes."""

    def __init__(self, stream, seconds):
        self.stream, self.seconds = stream, seconds
        self.pending, self.last = "", 0.0

    def write(self, text):
        shown = text.replace("\r", "").replace("\x1b[A", "").strip()
        if shown:  # (tqdm also writes blanks to clear its line: nothing to show)
            self.pending = shown
        if self.pending and ("\n" in text or time.time() - self.last >= self.seconds):
            self.stream.write(self.pending + "\n")
            self.stream.flush()
            self.pending, self.last = "", time.time()

    def flush(self):
        self.stream.flush()


def progress_bar(iterable, desc, disable=False, seconds=10.0):
    """tqdm over iterable: a live bar on a terminal, a line every few seconds in a file."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, dynamic_ncols=True, disable=disable)
    return tqdm(iterable, desc=desc, file=_LinesEvery(sys.stderr, seconds), ncols=100, ascii=True)


# ----------------------------------------------------------------------------------------------
# several processes: `torchrun --nproc_per_node=N script.py` sets RANK / WORLD_SIZE / LOCAL_RANK.
# Every rank draws the same global batch from the same seeded generator and trains on its own
# slice; DistributedDataParallel averages the gradients, so N processes follow the same trajectory
# as one process with the same global batch. Rank 0 alone evaluates and writes files.

def setup_distributed(device):
    """Returns (rank, world_size, device); joins the process group when run under torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, device
    on_cuda = device.startswith("cuda")
    if on_cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    elif os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE"):
        # Every process is on this machine, so gloo can talk over loopback, which is always there,
        # rather than over whatever interface the hostname happens to resolve to.
        loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
        if loopback:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
    dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def finish_distributed():
    """Leave the process group together, then exit at once. Every output is already written (and
    atomically), and a normal interpreter exit would run C++ destructors of torch's background
    threads: on a loaded machine one of them now and then aborts the process ("terminate called
    without an active exception", exit code -6) after the run has succeeded."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        release_locks()  # os._exit skips atexit
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def shard(batch, rank, world_size):
    """This rank's contiguous slice of a global batch."""
    if len(batch) % world_size:
        raise UserError(f"batch of {len(batch)} does not split evenly over {world_size} processes: "
                        f"choose a batch size divisible by --nproc_per_node")
    n = len(batch) // world_size
    return batch[rank * n:(rank + 1) * n]


def global_mean(value, world_size):
    """Average a scalar tensor over ranks (for logging the same number a single process would)."""
    if world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world_size
    return value


def max_weight(model):
    return max(p.detach().abs().max().item() for p in model.parameters())


def check_diverged(record, model, start_weight, last_saved, hint):
    """Stop a diverging run before it writes anything: a loss that is not finite, or weights that are
    not finite or have grown a thousandfold (a learning rate far too high can keep the loss finite
    while the weights explode). Names the checkpoint this run saved last, if any."""
    bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    weight = max_weight(model) if model is not None else 0.0
    if not math.isfinite(weight) or weight > 1000 * max(1.0, start_weight):
        bad["max |weight|"] = weight
    if bad:
        last = (f"the last good checkpoint is {last_saved[0]} (step {last_saved[1]})" if last_saved
                else "this run wrote no checkpoint")
        raise UserError(f"training diverged at step {record['step']} ({', '.join(f'{k}={v:.3g}' for k, v in bad.items())}): "
                        f"{hint}; {last}")


def rank0_only(rank, world_size, action):
    """Run action() on rank 0 alone (the rank that writes files); if it refuses with a UserError,
    every rank stops, not only rank 0 (the others would wait for it forever)."""
    error, result = None, None
    if rank == 0:
        try:
            result = action()
        except UserError as e:
            error = e
    if from_rank0(error is not None, world_size):
        raise error or UserError("rank 0 refused to start the run: see its message")
    return result


def from_rank0(value, world_size):
    """Rank 0's decision (a flag, "target reached, stop", or a step number), shared with every rank
    so that all act together."""
    if world_size == 1:
        return int(value)
    t = torch.tensor([int(value)])
    dist.broadcast(t, 0)
    return t.item()


# ----------------------------------------------------------------------------------------------
# guarding outputs: one run per output at a time, never over another run's files or its own inputs

def _start_time(pid):
    """A process' start time (Linux), so that a recycled process id is not taken for the lock holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Lock:
    """An exclusive lock on an output (a run's folder, or a corpus file): a file created with O_EXCL
    that names its process. A lock whose process is gone (killed with -9) is stale and taken over."""

    def __init__(self, path, what):
        self.path, self.what, self.held = path, what, False
        check_writable(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self.holder()
                if holder is None:  # stale: its process is gone
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                    continue
                raise UserError(f"{what} is in use by process {holder.get('pid')} on {holder.get('host')}: wait for "
                                f"it to finish or choose another output; if no such run is going, delete {path}")
            except OSError as e:
                raise UserError(f"cannot write to {what} ({e.strerror}): choose a writable output location") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            HELD_LOCKS.append(self)
            return
        raise UserError(f"could not lock {what}: delete {path} if no run is using it")

    def holder(self):
        """The process holding the lock, or None if the lock is stale."""
        try:
            with open(self.path) as f:
                holder = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written this instant, or torn by a crash long ago
            return None if time.time() - os.path.getmtime(self.path) > 60 else {"pid": "?", "host": "?"}
        if holder.get("host") != socket.gethostname():
            return holder  # another machine's process: cannot tell, so respect it
        pid = holder.get("pid")
        if pid == os.getpid():
            return None  # left by an earlier run in this same process (scripts run one at a time in it)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except (PermissionError, TypeError):
            return holder
        started = holder.get("started")
        return None if started is not None and _start_time(pid) != started else holder

    def release(self):
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


HELD_LOCKS = []


@atexit.register
def release_locks():
    """Give back every lock this process holds: at exit, or after a script's main() run in-process."""
    while HELD_LOCKS:
        HELD_LOCKS.pop().release()


def remove_stale_temporaries(path):
    """Temporary files of atomic writes (<path>.tmp<pid>, or <path><suffix>.tmp<pid>) left by a killed
    process. Called while holding the output's lock, so none of them can belong to a live writer."""
    folder, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        if entry.startswith(name) and ".tmp" in entry[len(name):]:
            os.remove(os.path.join(folder, entry))


def claim_out_dir(out_dir, resume, overwrite, inputs):
    """Lock a run's output folder, after checking that the run may write there: never where one of
    its inputs lives (inputs: paths of files the run reads), and a fresh run never over another run's
    outputs unless --overwrite=True (which then removes them). Returns the lock."""
    if not out_dir or out_dir == "None":
        raise UserError("--out_dir is empty: name the folder the run writes to, e.g. --out_dir=out/run1")
    here = os.path.abspath(out_dir)
    for path in inputs:
        if path and os.path.abspath(os.path.dirname(path)) == here:
            raise UserError(f"--out_dir={out_dir} holds the input {path}, which this run would overwrite or mix "
                            f"with: choose another --out_dir")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir={out_dir} is a file: choose a folder")
    lock = Lock(os.path.join(out_dir, ".lock"), f"--out_dir={out_dir}")
    for name in ("ckpt.pt", "log.jsonl"):
        remove_stale_temporaries(os.path.join(out_dir, name))
    found = [f for f in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    if found and not resume:
        if not overwrite:
            lock.release()
            raise UserError(f"{out_dir} already holds a run ({', '.join(found)}): continue it with --resume=True, "
                            f"choose another --out_dir, or replace it with --overwrite=True")
        for f in found:
            os.remove(os.path.join(out_dir, f))
    return lock


def check_writable(path):
    """Fail before the work, not after it, when an output cannot be written: try it (permission bits
    say little when running as root, or on a read-only mount)."""
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        if not os.path.isdir(probe):
            raise NotADirectoryError
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError:
        raise UserError(f"cannot write {path}: {probe} is not a writable folder; choose another output path") from None


def fingerprint(path):
    """Size and SHA-256 of a file: what a resumed run checks its inputs against (content, not path,
    so moving identical files elsewhere is fine)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def dataset_files(name):
    """The files a dataset (or corpus:<path>) is read from."""
    if name.startswith("corpus:"):
        return [name[len("corpus:"):]]
    folder = name if os.path.isabs(name) else os.path.join(DATA_DIR, name)
    return [os.path.join(folder, f) for f in ("meta.json", "train.bin", "val.bin")]


def input_fingerprints(inputs):
    """{role: [fingerprint of each file]} for the files a run reads (role: e.g. init_from, dataset)."""
    return {role: [fingerprint(p) for p in paths] for role, paths in inputs.items()}


# ----------------------------------------------------------------------------------------------
# resuming: a checkpoint also carries what is needed to continue bit for bit (optimizer state, the
# random generators, the step). `--resume=True` continues from out_dir/ckpt.pt.

RESUME_MAY_CHANGE = {"resume", "overwrite", "device", "compile", "eval_interval", "eval_sequences", "out_dir"}


def rng_state(rng):
    return {"numpy": json.dumps(rng.bit_generator.state), "torch": torch.get_rng_state()}


def restore_rng(rng, state):
    rng.bit_generator.state = json.loads(state["numpy"])
    torch.set_rng_state(state["torch"])


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
        raise UserError(f"cannot resume {path}: it was run with {old}; pass the same settings or use a new --out_dir")
    for role, prints in (inputs or {}).items():
        if "inputs" in ckpt and ckpt["inputs"].get(role) != prints:
            raise UserError(f"cannot resume {path}: its input {role} ({run_config.get(role, role)}) is not the file "
                            f"the run started from (other size or content): restore that file, or start over with "
                            f"a new --out_dir")
    return ckpt


def prepare_log(path, start_step):
    """A fresh run starts a fresh log; a resumed run keeps the records up to its checkpoint and
    drops those the interrupted run wrote after it. Returns the last record kept (None if none), from
    which a resumed run continues its running totals."""
    if not os.path.exists(path):
        return None
    if start_step == 0:
        os.remove(path)
        return None
    kept = [r for r in read_jsonl(path) if r["step"] <= start_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept[-1] if kept else None


# ----------------------------------------------------------------------------------------------
# atomic file writes: write a temporary file next to the target, then rename over it. A crash
# leaves either the old file or the new one, never half of one.

def atomic_write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def download(url, path, offline_hint, headers=None):
    """Fetch url to path, atomically (a temporary file renamed at the end); a failure removes the
    temporary file and becomes one ConnectionError line ending in offline_hint. An existing path is
    kept: downloads resume file by file."""
    if os.path.exists(path):
        return path
    tmp = path + ".tmp"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response, \
                open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ConnectionError(f"could not download {url} ({getattr(e, 'reason', e)}): {offline_hint}") from None
    os.replace(tmp, path)
    return path


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """The records of a log. A torn last line (a crash or a full disk mid-write) is dropped; a bad
    line anywhere else means the file is not a log."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                print(f"warning: dropped the torn last line of {path}", file=sys.stderr)
                break
            raise UserError(f"{path} line {i + 1} is not JSON: it is not a log written by these scripts") from None
    return records


def time_split(paths):
    """Where an experiment's time went, from its run folders (and any below them) and replay corpus
    files: training (each log's train_seconds), sampling (the corpora's meta["seconds"], and fresh
    replay drawn during finetuning) and evaluation (each log's eval_seconds)."""
    split = {"sampling": 0.0, "training": 0.0, "evaluation": 0.0}
    files = [p for p in paths if os.path.isfile(p)]
    files += [os.path.join(folder, name) for p in paths if os.path.isdir(p)
              for folder, _, names in sorted(os.walk(p)) for name in sorted(names)]
    for path in files:
        name = os.path.basename(path)
        if name == "log.jsonl":
            last = read_jsonl(path)[-1]
            split["training"] += last.get("train_seconds", 0.0)
            split["sampling"] += last.get("replay_sample_seconds", 0.0)
            split["evaluation"] += last.get("eval_seconds", 0.0)
        elif name.endswith(".pt") and name != "ckpt.pt":
            corpus = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(corpus, dict) and "seconds" in corpus.get("meta", {}):
                split["sampling"] += corpus["meta"]["seconds"]
    return {k: round(v, 1) for k, v in split.items()}


# ----------------------------------------------------------------------------------------------
# datasets on disk: data/<name>/{train,val}.bin (uint16 token ids) + meta.json
#
# Two layouts, told apart by meta["row_len"]:
# - rows (toy tasks): the file is a stack of fixed-length sequences, each starting with its task's
#   BOS token; a training sequence is one row.
# - stream (text): one long token stream; a training sequence is a window of block_size tokens
#   whose first token is overwritten by the dataset id token (paper convention: English 0,
#   Spanish 1). The same token is the prompt for self-generated replay.

class Dataset:
    def __init__(self, name):
        # a name is a folder under data/ ("arithmetic/add") or any folder path holding meta.json
        self.name = name
        self.dir = name if os.path.isabs(name) else os.path.join(DATA_DIR, name)
        meta_path = os.path.join(self.dir, "meta.json")
        if not os.path.exists(meta_path):
            raise UserError(f"{meta_path} not found: run the prepare.py script of that dataset first "
                            f"(e.g. python data/arithmetic/prepare.py)")
        redo = f"re-run the prepare.py script of {name}"
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            self.row_len = self.meta.get("row_len")
            self.dataset_token, vocab_size = int(self.meta["dataset_token"]), int(self.meta["vocab_size"])
            dtype = np.dtype(self.meta.get("token_dtype", "uint16"))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            problem = f"has no {e}" if isinstance(e, KeyError) else f"is not a valid meta.json ({type(e).__name__})"
            raise UserError(f"{meta_path} {problem}: {redo}") from None
        self.splits = {}
        for split in ("train", "val"):
            path = os.path.join(self.dir, f"{split}.bin")
            if not os.path.exists(path) or os.path.getsize(path) == 0:
                raise UserError(f"{path} is missing or empty: {redo}")
            if os.path.getsize(path) % dtype.itemsize:
                raise UserError(f"{path} is truncated (not a whole number of {dtype} token ids): {redo}")
            # uint16 ids unless the vocabulary is larger (a released model's, e.g. Llama 3's 128k)
            tokens = np.fromfile(path, dtype=dtype)
            if tokens.min() < 0 or tokens.max() >= vocab_size:
                raise UserError(f"{path} holds token ids outside 0..{vocab_size - 1} (its meta.json's vocab_size): "
                                f"{redo}")
            if self.row_len:
                if len(tokens) % self.row_len:
                    raise UserError(f"{path} is truncated (not a whole number of {self.row_len}-token rows): "
                                    f"re-run the prepare.py script of {name}")
                tokens = tokens.reshape(-1, self.row_len)
            self.splits[split] = tokens

    @property
    def short_name(self):
        return self.name.rstrip("/").split("/")[-1]

    def check_length(self, block_size):
        """A text dataset must hold at least one window of block_size tokens in each split."""
        for split, tokens in self.splits.items():
            if not self.row_len and len(tokens) < block_size:
                raise UserError(f"{self.dir}/{split}.bin holds {len(tokens)} tokens, fewer than one window of "
                                f"{block_size}: use a smaller --block_size or more data")

    def seq_len(self, block_size):
        return self.row_len or block_size

    def sample(self, split, batch_size, block_size, rng):
        """A random batch of training sequences, (batch_size, T) int64."""
        data = self.splits[split]
        if self.row_len:
            return torch.from_numpy(data[rng.integers(0, len(data), batch_size)].astype(np.int64))
        starts = rng.integers(0, len(data) - block_size + 1, batch_size)
        x = np.stack([data[s:s + block_size] for s in starts]).astype(np.int64)
        x[:, 0] = self.dataset_token
        return torch.from_numpy(x)

    def eval_batches(self, split, batch_size, block_size, max_sequences):
        """The same fixed sequences every call (the first max_sequences rows / windows), so
        validation numbers are comparable across steps and runs."""
        data = self.splits[split]
        if self.row_len:
            rows = data[:max_sequences].astype(np.int64)
        else:
            n = min(max_sequences, len(data) // block_size)
            rows = data[:n * block_size].astype(np.int64).reshape(n, block_size)
            rows[:, 0] = self.dataset_token
        for i in range(0, len(rows), batch_size):
            yield torch.from_numpy(rows[i:i + batch_size])


class CorpusSet:
    """A replay corpus (sample_replay.py) used as an evaluation set, e.g. held-out self-generated
    sequences: named corpus:<path>, it offers what evaluation needs of a Dataset."""

    def __init__(self, name):
        self.name, path = name, name[len("corpus:"):]
        self.tokens, self.meta = load_corpus(path)
        self.meta = {**self.meta, "row_len": self.tokens.size(1), "path": path}
        self.dir = path
        self.short_name = os.path.basename(path).removesuffix(".pt")

    def check_length(self, block_size):
        pass  # a corpus' rows have a fixed length, checked against the model by check_compatible

    def eval_batches(self, split, batch_size, block_size, max_sequences):
        rows = self.tokens[:max_sequences]
        for i in range(0, len(rows), batch_size):
            yield rows[i:i + batch_size]


def open_eval_set(name):
    """A dataset under data/, or corpus:<path> for a sampled corpus."""
    return CorpusSet(name) if name.startswith("corpus:") else Dataset(name)


def load_corpus(path):
    """Read a replay corpus written by sample_replay.py: (N, T) int64 tokens and its metadata."""
    if not os.path.exists(path):
        raise UserError(f"replay corpus {path} not found: run sample_replay.py --out={path} first")
    try:
        corpus = torch.load(path, map_location="cpu", weights_only=True)
        tokens, meta = corpus["tokens"], corpus["meta"]
    except Exception:
        raise UserError(f"{path} is not a replay corpus written by sample_replay.py: re-sample it") from None
    if tokens.ndim != 2 or len(tokens) == 0:
        raise UserError(f"replay corpus {path} holds no sequences: re-sample it")
    if tokens.size(1) < 2:
        raise UserError(f"replay corpus {path} holds sequences of {tokens.size(1)} token: training needs at least 2 "
                        f"(a prompt and a next token); re-sample it with --length=2 or more")
    vocab_size = meta.get("vocab_size") if isinstance(meta, dict) else None
    if vocab_size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise UserError(f"replay corpus {path} holds token ids outside 0..{vocab_size - 1}: re-sample it")
    return tokens.long(), meta


def check_short_names(sets):
    """Results and log keys name a dataset by its last part (val_loss/en): two datasets with one
    short name would overwrite each other, so refuse them."""
    seen = {}
    for d in sets:
        if seen.get(d.short_name, d.name) != d.name:
            raise UserError(f"{seen[d.short_name]} and {d.name} share the short name {d.short_name!r}, under which "
                            f"results are reported: evaluate them in separate runs, or rename one folder")
        seen[d.short_name] = d.name


def sample_mixture(datasets, fractions, batch_size, block_size, rng, split="train"):
    """One batch drawn from several datasets at fixed fractions (rows per dataset are rounded,
    the remainder goes to the first dataset so the batch size is exact)."""
    counts = [int(round(f * batch_size)) for f in fractions]
    counts[0] += batch_size - sum(counts)
    parts = [d.sample(split, n, block_size, rng) for d, n in zip(datasets, counts) if n > 0]
    return torch.cat(parts)[torch.from_numpy(rng.permutation(batch_size))]


def known_tokenizers(ckpt):
    """The tokenizers a checkpoint's model reads: those of the data it was trained on, and a
    released model's own (convert.py stores it as ckpt["tokenizer"])."""
    known = {m.get("tokenizer") for m in (ckpt or {}).get("data", {}).values()}
    known.add((ckpt or {}).get("tokenizer", {}).get("tokenizer"))
    return known - {None}


def check_compatible(dataset_meta, model_config, where, ckpt=None):
    """Refuse to train or evaluate a model on data from another tokenizer or with longer rows.
    ckpt: the model's checkpoint, which names its tokenizer(s)."""
    if dataset_meta["vocab_size"] > model_config["vocab_size"]:
        raise UserError(f"{where}: vocab_size {dataset_meta['vocab_size']} of the data exceeds the "
                        f"model's {model_config['vocab_size']}: use a checkpoint trained with this tokenizer")
    known = known_tokenizers(ckpt)
    if known and dataset_meta.get("tokenizer") not in known:
        raise UserError(f"{where}: tokenized by {dataset_meta.get('tokenizer')!r} but the checkpoint was trained on "
                        f"{sorted(map(str, known))}: use data prepared with the checkpoint's tokenizer")
    row_len = dataset_meta.get("row_len")
    if row_len and row_len > model_config["block_size"]:
        raise UserError(f"{where}: rows of {row_len} tokens exceed the model's block_size "
                        f"{model_config['block_size']}: pretrain with --block_size={row_len} or more")


# ----------------------------------------------------------------------------------------------
# checkpoints: {"model": state_dict, "model_config": dict, "data": {dataset: meta}, "config": dict,
# "step": int, ...}. Plain tensors and Python literals only, so they load with weights_only=True:
# a checkpoint is data and can never run code.

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
    from model import GPT, GPTConfig
    ckpt = load_checkpoint_dict(path, device)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


# ----------------------------------------------------------------------------------------------
# evaluation helpers

# how evaluate_on's numbers are named in training logs, e.g. "val_loss/add"
LOG_NAMES = {"loss": "val_loss", "kl": "val_kl", "accuracy": "accuracy"}


@torch.no_grad()
def evaluate_on(model, dataset, block_size, max_sequences=2048, device="cpu", reference=None,
                reference_cache=None, batch_size=256):
    """Validation numbers on the fixed validation sequences, from one forward pass of the model:
    "loss", the mean next-token loss; "kl", the mean KL(reference || model), when a frozen reference
    is given (its logits can be kept between calls: pass a dict as reference_cache, one per dataset);
    and on a toy task's rows "accuracy", the exact-match accuracy of greedy decoding. That needs no
    decoding: greedy decoding writes a row's whole answer exactly when, fed the true answer so far,
    the model's most likely next token is the true one at every answer position (where decoding
    would first go wrong, so does that argmax), and the loss's logits hold those argmaxes."""
    answers = (dataset.meta["answer_start"], dataset.meta["answer_end"]) if "answer_start" in dataset.meta else None
    cache = {} if reference_cache is None else reference_cache
    totals, count = {"loss": 0.0}, 0
    if reference is not None:
        totals["kl"] = 0.0
    if answers:
        totals["accuracy"] = 0.0
    for i, x in enumerate(dataset.eval_batches("val", batch_size, block_size, max_sequences)):
        x = x.to(device)
        logits = model(x)
        totals["loss"] += ntp_loss(logits, x).item() * len(x)
        if reference is not None:
            if i not in cache:
                cache[i] = reference(x)
            totals["kl"] += kl_loss(logits, cache[i]).item() * len(x)
        if answers:
            start, end = answers
            guess = logits[:, start - 1:end - 1].argmax(dim=-1)   # position p - 1 predicts token p
            totals["accuracy"] += (guess == x[:, start:end]).all(dim=1).sum().item()
        count += len(x)
    return {k: v / count for k, v in totals.items()}
