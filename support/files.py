"""
Files a run reads and writes, handled so that nothing is lost: one run per output at a time
(a lock), never over another run's files or its own inputs, every output written atomically
(a temporary file renamed over the target: a crash leaves the old file or the new one, never
half of one), and inputs fingerprinted by content so a resumed run can check them.
"""
import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import resource
import socket
import sys
import tempfile
import urllib.error
import urllib.request

import torch

from support.config import UserError


def _start_time(pid):
    """A process' start time (Linux), so that a recycled process id is not taken for the lock holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Lock:
    """An exclusive lock on an output (a run's folder, or a corpus file): a file that names its
    process, held with the kernel's flock. The kernel lets go when the process ends, however it
    ends, so a lock left by a killed process is free to take, and two processes can never both
    take it (no check-then-remove race). Taking it also checks that the file locked is still the
    one at `path` (a releasing holder removes it)."""

    def __init__(self, path, what):
        self.path, self.what, self.held, self.fd = path, what, False, None
        check_writable(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}
        for _ in range(10):
            try:
                fd = os.open(path, os.O_CREAT | os.O_RDWR)
            except OSError as e:
                raise UserError(f"cannot write to {what} ({e.strerror}): choose a "
                                "writable output location") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self.holder() or {"pid": "?", "host": "?"}
                raise UserError(f"{what} is in use by process {holder.get('pid')} on {holder.get('host')}: "
                                "wait for it to finish or choose another output; if no such run is going, "
                                f"delete {path}")
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed by the holder releasing it after we opened it: take the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
            self.fd, self.held = fd, True
            HELD_LOCKS.append(self)
            return
        raise UserError(f"could not lock {what}: delete {path} if no run is using it")

    def holder(self):
        """The process the lock file names (for the message: the kernel decides who holds it)."""
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):  # gone, or being written this instant
            return None

    def release(self):
        if self.held:  # removed while still held, so a process that opened it sees it go (above)
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            os.close(self.fd)


HELD_LOCKS = []


@atexit.register
def release_locks():
    """Give back every lock this process holds: at exit, or after a script's main() run in-process."""
    while HELD_LOCKS:
        HELD_LOCKS.pop().release()


def remove_stale_temporaries(path):
    """Temporary files of atomic writes (<path>.tmp<pid>, or <path><suffix>.tmp<pid>) left by a killed
    process: only those whose process is gone (another output's name can start with this one's, and
    its writer may be alive)."""
    folder, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        found = re.fullmatch(re.escape(name) + r"(\.[\w-]+)?\.tmp(\d+)(\.\w+)?", entry)
        if found and not process_alive(int(found.group(2))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, entry))


def process_alive(pid):
    if pid == os.getpid():
        return False  # left by an earlier write in this same process (scripts run one at a time in it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def same_path(a, b):
    """Whether two paths name one file or folder: through symlinks, relative parts and hard links
    (compared as files where both exist, else by their resolved paths)."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def refuse_inputs(output, inputs, setting):
    """An output path that is one of the run's input files would destroy it: refuse, before any
    work, naming the input (never with an offer to overwrite)."""
    for path in inputs:
        if path and output and same_path(output, path):
            raise UserError(f"{setting}={output} is the input {path}, which this run reads: choose another "
                            f"{setting}")


def claim_out_dir(out_dir, resume, overwrite, inputs):
    """Lock a run's output folder, after checking that the run may write there: never where one of
    its inputs lives (inputs: paths of files the run reads), and a fresh run never over another run's
    outputs unless --overwrite=True (which then removes them). Returns the lock."""
    if not out_dir or out_dir == "None":
        raise UserError("--out_dir is empty: name the folder the run writes to, e.g. --out_dir=out/run1")
    for path in inputs:
        if path and same_path(os.path.dirname(os.path.abspath(path)), out_dir):
            raise UserError(f"--out_dir={out_dir} holds the input {path}, which this run would overwrite or "
                            "mix with: choose another --out_dir")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir={out_dir} is a file: choose a folder")
    lock = Lock(os.path.join(out_dir, ".lock"), f"--out_dir={out_dir}")
    for name in ("ckpt.pt", "log.jsonl"):
        remove_stale_temporaries(os.path.join(out_dir, name))
    found = [f for f in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    if found and not resume:
        if not overwrite:
            lock.release()
            raise UserError(f"{out_dir} already holds a run ({', '.join(found)}): continue it with "
                            "--resume=True, choose another --out_dir, or replace it with --overwrite=True")
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
        raise UserError(f"cannot write {path}: {probe} is not a writable folder; choose "
                        "another output path") from None


def fingerprint(path):
    """Size and SHA-256 of a file: what a resumed run checks its inputs against (content, not path,
    so moving identical files elsewhere is fine)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def input_fingerprints(inputs):
    """{role: [fingerprint of each file]} for the files a run reads (role: e.g. init_from, dataset)."""
    return {role: [fingerprint(p) for p in paths] for role, paths in inputs.items()}


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """A temporary name next to `path` to write to (<path>.tmp<pid><suffix>: two processes never
    share one), renamed over `path` when the block succeeds and removed when it fails. suffix:
    for writers that pick the format by the file's ending (matplotlib's savefig)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise UserError(no_room(path, e.errno)) from None
        raise
    except RuntimeError:
        # torch.save's zip writer reports a failed write without its cause: look for one
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if written >= file_size_limit():
            raise UserError(no_room(path, errno.EFBIG)) from None
        if free_bytes(path) < 64 << 20:
            raise UserError(no_room(path, errno.ENOSPC)) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def free_bytes(path):
    stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
    return stat.f_bavail * stat.f_frsize


def file_size_limit():
    """The largest file this process may write (ulimit -f), in bytes; infinite when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return float("inf") if soft == resource.RLIM_INFINITY else soft


def no_room(path, code):
    if code == errno.EFBIG:
        return (f"{path} would be larger than this process may write (ulimit -f {file_size_limit() // 1024:.0f} "
                "KiB; the earlier file, if any, is intact): raise the limit and run again")
    return f"the disk is full writing {path} (the earlier file, if any, is intact): free space and run again"


def atomic_write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def atomic_torch_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def download(url, path, offline_hint, headers=None):
    """Fetch url to path, atomically; a failure becomes one ConnectionError line ending in
    offline_hint. An existing path is kept: downloads resume file by file."""
    if os.path.exists(path):
        return path
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with atomic_path(path) as tmp, open(tmp, "wb") as f, urllib.request.urlopen(request, timeout=30) as page:
            while chunk := page.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"could not download {url} "
                              f"({getattr(e, 'reason', e)}): {offline_hint}") from None
    return path


def write_json(path, obj):
    """Strict JSON (what any parser reads): a number that is not finite (NaN, inf) is written as null."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value
    atomic_write_text(path, json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path, warn=True):
    """The records of a log. A torn last line (a crash or a full disk mid-write) is dropped (said on
    stderr, if warn); a bad line anywhere else means the file is not a log."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                if warn:
                    print(f"warning: dropped the torn last line of {path}", file=sys.stderr)
                break
            raise UserError(f"{path} line {i + 1} is not JSON: it is not a log "
                            "written by these scripts") from None
    return records
