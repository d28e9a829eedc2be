"""
The toy continual-learning tasks of the paper: add, reversal, sort, modadd.

Every example is one fixed-length row (14 tokens for 3 digits):

    BOS_task  a a a  SEP  b b b  =  answer(n+1 tokens)  EOS

- add:      b is a second number, answer = a + b           (n+1 digits, zero padded)
- modadd:   b is a second number, answer = (a + b) % modulus (zero padded to n+1 digits)
- reversal: b is n NULL tokens,   answer = 0 followed by a's digits reversed
- sort:     b is n NULL tokens,   answer = 0 followed by a's digits sorted ascending

Each task has its own BOS token, which is both the task label and the prompt for self-generated
replay. Vocabulary (19 for 4 tasks): pad, one BOS per task, SEP, '=', NULL, EOS, digits 0-9.

Splits are disjoint and deterministic: all possible inputs are enumerated, shuffled with a fixed
seed, the first n_val go to val and the next n_train to train.

Writes data/arithmetic/<task>/{train,val}.bin (uint16) and meta.json, which every later script
reads instead of hard-coding token ids or answer positions.

    python data/arithmetic/prepare.py [--digits=3] [--modulus=1000] [--n_train=200000] [--n_val=2000]
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from support.config import fail
from support.files import atomic_path, atomic_write_text

TASKS = ["add", "reversal", "sort", "modadd"]
SPECIALS = ["pad"] + [f"bos_{t}" for t in TASKS] + ["sep", "eq", "null", "eos"]
DIGIT0 = len(SPECIALS)  # token id of the digit 0
VOCAB_SIZE = DIGIT0 + 10
TOKEN = {name: i for i, name in enumerate(SPECIALS)}
ITOS = SPECIALS + [str(d) for d in range(10)]
DISPLAY = {"pad": "_", "sep": "|", "eq": "=", "null": ".", "eos": "$"}


def layout(digits):
    """Positions of the parts of a row, for numbers of `digits` digits."""
    a = slice(1, 1 + digits)
    sep = a.stop
    b = slice(sep + 1, sep + 1 + digits)
    eq = b.stop
    answer = slice(eq + 1, eq + 1 + digits + 1)
    eos = answer.stop
    return dict(a=a, sep=sep, b=b, eq=eq, answer=answer, eos=eos, row_len=eos + 1)


def to_digits(values, width):
    """(N,) ints -> (N, width) digits, most significant first."""
    powers = 10 ** np.arange(width - 1, -1, -1)
    return (values[:, None] // powers) % 10


def from_digits(digits):
    powers = 10 ** np.arange(digits.shape[1] - 1, -1, -1)
    return (digits.astype(np.int64) * powers).sum(1)


def task_answer(task, a_digits, b_digits, modulus):
    """The answer digits (N, digits+1) of a task, from operand digits (N, digits)."""
    width = a_digits.shape[1] + 1
    a, b = from_digits(a_digits), from_digits(b_digits)
    if task == "add":
        return to_digits(a + b, width)
    if task == "modadd":
        return to_digits((a + b) % modulus, width)
    zero = np.zeros((len(a_digits), 1), dtype=a_digits.dtype)
    if task == "reversal":
        return np.concatenate([zero, a_digits[:, ::-1]], axis=1)
    if task == "sort":
        return np.concatenate([zero, np.sort(a_digits, axis=1)], axis=1)
    raise ValueError(f"unknown task {task!r}")


def make_rows(task, a_values, b_values, digits, modulus):
    """Encode examples as token rows. b_values is ignored by the one-operand tasks."""
    L = layout(digits)
    n = len(a_values)
    rows = np.full((n, L["row_len"]), TOKEN["pad"], dtype=np.uint16)
    a_digits = to_digits(a_values, digits)
    two_operands = task in ("add", "modadd")
    b_digits = to_digits(b_values, digits) if two_operands else np.zeros_like(a_digits)
    rows[:, 0] = TOKEN[f"bos_{task}"]
    rows[:, L["a"]] = DIGIT0 + a_digits
    rows[:, L["sep"]] = TOKEN["sep"]
    rows[:, L["b"]] = DIGIT0 + b_digits if two_operands else TOKEN["null"]
    rows[:, L["eq"]] = TOKEN["eq"]
    rows[:, L["answer"]] = DIGIT0 + task_answer(task, a_digits, b_digits, modulus)
    rows[:, L["eos"]] = TOKEN["eos"]
    return rows


def make_splits(task, digits=3, modulus=1000, n_train=200_000, n_val=2000, seed=1337):
    """Deterministic, disjoint train/val rows for one task."""
    rng = np.random.default_rng(seed + TASKS.index(task))
    numbers = 10 ** digits
    if task in ("add", "modadd"):
        inputs = rng.permutation(numbers * numbers)
        a_values, b_values = inputs // numbers, inputs % numbers
    else:
        a_values = rng.permutation(numbers)
        b_values = np.zeros_like(a_values)
    n_val = min(n_val, len(a_values) // 5)  # one-operand tasks have only 10^digits inputs
    val = make_rows(task, a_values[:n_val], b_values[:n_val], digits, modulus)
    train = make_rows(task, a_values[n_val:n_val + n_train], b_values[n_val:n_val + n_train], digits, modulus)
    return train, val


def task_meta(task, digits, modulus, n_train, n_val):
    L = layout(digits)
    return {
        "kind": "arithmetic",
        "tokenizer": f"arithmetic-{'-'.join(TASKS)}",
        "task": task,
        "vocab_size": VOCAB_SIZE,
        "itos": ITOS,
        "tokens": TOKEN,
        "digit0": DIGIT0,
        "dataset_token": TOKEN[f"bos_{task}"],
        "row_len": L["row_len"],
        "answer_start": L["answer"].start,
        "answer_end": L["eos"] + 1,  # the answer span includes EOS: the model must also stop
        "digits": digits,
        "modulus": modulus,
        "n_train": n_train,
        "n_val": n_val,
    }


def decode_row(row):
    """Human-readable form of one row, e.g. '<add>123|456=0579$'."""
    out = []
    for t in row:
        name = ITOS[t] if t < len(ITOS) else "?"
        out.append(f"<{name[4:]}>" if name.startswith("bos_") else DISPLAY.get(name, name))
    return "".join(out)


def score_rows(rows, digits=3, modulus=1000):
    """For sampled rows (N, row_len): per row, is it well formed (right tokens in the right places
    for the task named by its first token), and is its answer correct?"""
    rows = np.asarray(rows)
    L = layout(digits)
    well_formed = np.zeros(len(rows), dtype=bool)
    correct = np.zeros(len(rows), dtype=bool)
    if rows.ndim != 2 or rows.shape[1] != L["row_len"]:
        return well_formed, correct
    is_digit = (rows >= DIGIT0) & (rows < DIGIT0 + 10)
    for task in TASKS:
        mine = rows[:, 0] == TOKEN[f"bos_{task}"]
        ok = mine & is_digit[:, L["a"]].all(1) & is_digit[:, L["answer"]].all(1)
        for part in ("sep", "eq", "eos"):
            ok &= rows[:, L[part]] == TOKEN[part]
        if task in ("add", "modadd"):
            ok &= is_digit[:, L["b"]].all(1)
        else:
            ok &= (rows[:, L["b"]] == TOKEN["null"]).all(1)
        well_formed |= ok
        if ok.any():
            r = rows[ok].astype(np.int64) - DIGIT0
            expected = task_answer(task, r[:, L["a"]], r[:, L["b"]], modulus)
            correct[np.flatnonzero(ok)] = (r[:, L["answer"]] == expected).all(1)
    return well_formed, correct


def write_tasks(out_root, digits=3, modulus=1000, n_train=200_000, n_val=2000, seed=1337):
    """Write every task's splits and meta.json under out_root/<task>/, each file atomically."""
    for task in TASKS:
        train, val = make_splits(task, digits, modulus, n_train, n_val, seed)
        out = os.path.join(out_root, task)
        for split, rows in (("train", train), ("val", val)):
            with atomic_path(os.path.join(out, f"{split}.bin")) as tmp:
                rows.tofile(tmp)
        meta = task_meta(task, digits, modulus, len(train), len(val))
        atomic_write_text(os.path.join(out, "meta.json"), json.dumps(meta, indent=2))
        print(f"{task:9s} train {len(train):7d} val {len(val):5d}  e.g. {decode_row(val[0])}")


def main(argv):
    settings = dict(digits=3, modulus=1000, n_train=200_000, n_val=2000, seed=1337)
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in settings or not value.isdigit():
            fail(f"cannot parse {arg!r}: use --digits=3 --modulus=1000 "
                     "--n_train=N --n_val=N --seed=N")
        settings[key] = int(value)
    write_tasks(os.path.dirname(os.path.abspath(__file__)), **settings)


if __name__ == "__main__":
    main(sys.argv[1:])
