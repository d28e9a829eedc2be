"""Toy task data, the two dataset layouts, and the loss conventions of paper-notes."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.arithmetic import prepare
from objective import ntp_loss
from support.config import UserError
from support.dataset import Dataset, sample_mixture


def operands(row, meta):
    digits = [int(prepare.ITOS[t]) for t in row[1:4]], [prepare.ITOS[t] for t in row[5:8]]
    a = int("".join(map(str, digits[0])))
    b = int("".join(digits[1])) if all(c.isdigit() for c in digits[1]) else None
    answer = "".join(prepare.ITOS[t] for t in row[meta["answer_start"]:meta["answer_end"] - 1])
    return a, b, answer


def test_every_task_answer_matches_python_arithmetic(toy_data):
    for task, path in toy_data.items():
        meta = json.load(open(os.path.join(path, "meta.json")))
        rows = Dataset(path).splits["train"][:500]
        for row in rows:
            a, b, answer = operands(row, meta)
            assert row[0] == meta["dataset_token"] == prepare.TOKEN[f"bos_{task}"]
            assert row[-1] == prepare.TOKEN["eos"]
            digits = f"{a:03d}"
            if task == "add":
                expected = f"{a + b:04d}"
            elif task == "modadd":
                expected = f"{(a + b) % 1000:04d}"
            elif task == "reversal":
                expected = "0" + digits[::-1]
            else:
                expected = "0" + "".join(sorted(digits))
            assert answer == expected, (task, prepare.decode_row(row))


def test_row_layout_and_vocabulary_are_as_in_the_paper():
    L = prepare.layout(3)
    assert L["row_len"] == 14
    assert prepare.VOCAB_SIZE == 19  # pad, 4 BOS, sep, '=', null, eos, 10 digits
    row = prepare.make_rows("add", np.array([959]), np.array([542]), 3, 1000)[0]
    assert prepare.decode_row(row) == "<add>959|542=1501$"
    assert prepare.decode_row(prepare.make_rows("sort", np.array([373]), None, 3, 1000)[0]) == "<sort>373|...=0337$"


def test_prepared_files_are_deterministic(tmp_path):
    prepare.write_tasks(str(tmp_path / "a"), n_train=300, n_val=50)
    prepare.write_tasks(str(tmp_path / "b"), n_train=300, n_val=50)
    for task in prepare.TASKS:
        for name in ("train.bin", "val.bin", "meta.json"):
            assert (tmp_path / "a" / task / name).read_bytes() == (tmp_path / "b" / task / name).read_bytes()


def test_train_and_val_splits_are_disjoint(toy_data):
    for task, path in toy_data.items():
        d = Dataset(path)
        train = {r.tobytes() for r in d.splits["train"]}
        assert not any(r.tobytes() in train for r in d.splits["val"]), task


def test_score_rows_tells_well_formed_and_correct_apart(toy_data):
    rows = Dataset(toy_data["add"]).splits["val"][:4].copy()
    rows[1, 10] = prepare.DIGIT0 + (rows[1, 10] - prepare.DIGIT0 + 1) % 10   # wrong answer digit
    rows[2, 4] = prepare.TOKEN["eq"]                                            # broken structure
    well_formed, correct = prepare.score_rows(rows)
    assert well_formed.tolist() == [True, True, False, True]
    assert correct.tolist() == [True, False, False, True]


def write_stream(path, tokens, dataset_token=0):
    os.makedirs(path)
    for split in ("train", "val"):
        np.asarray(tokens, dtype=np.uint16).tofile(os.path.join(path, f"{split}.bin"))
    meta = {"vocab_size": 50, "row_len": None, "dataset_token": dataset_token, "tokenizer": "t"}
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))


def test_stream_windows_start_with_the_dataset_token(tmp_path):
    write_stream(str(tmp_path / "text"), np.arange(2, 42), dataset_token=1)
    d = Dataset(str(tmp_path / "text"))
    x = d.sample("train", 16, 8, np.random.default_rng(0))
    assert x.shape == (16, 8)
    assert (x[:, 0] == 1).all()                            # first token overwritten by the dataset id
    assert ((x[:, 2:] - x[:, 1:-1]) == 1).all()            # the rest is a contiguous window
    batches = list(d.eval_batches("val", 3, 8, 100))
    assert sum(len(b) for b in batches) == 40 // 8 and all((b[:, 0] == 1).all() for b in batches)


def test_rows_layout_keeps_each_row_whole(toy_data):
    d = Dataset(toy_data["sort"])
    x = d.sample("train", 32, 14, np.random.default_rng(0))
    assert x.shape == (32, 14) and (x[:, 0] == d.dataset_token).all()


def test_mixture_draws_the_requested_fractions(toy_data):
    data = [Dataset(toy_data["add"]), Dataset(toy_data["sort"])]
    x = sample_mixture(data, [0.25, 0.75], 64, 14, np.random.default_rng(0))
    assert (x[:, 0] == data[0].dataset_token).sum() == 16 and (x[:, 0] == data[1].dataset_token).sum() == 48


def test_missing_or_truncated_data_gives_a_clear_error(tmp_path, toy_data):
    with pytest.raises(UserError, match="prepare.py"):
        Dataset(str(tmp_path / "nothing"))
    broken = tmp_path / "broken"
    os.makedirs(broken)
    for name in ("meta.json", "val.bin"):
        (broken / name).write_bytes(open(os.path.join(toy_data["add"], name), "rb").read())
    (broken / "train.bin").write_bytes(b"\x01\x00" * 15)  # not a whole 14-token row
    with pytest.raises(UserError, match="truncated"):
        Dataset(str(broken))


def test_ntp_loss_predicts_the_next_token_and_masks_the_last_position():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    tokens = torch.randint(0, 7, (2, 5))
    expected = F.cross_entropy(logits[:, :4].reshape(-1, 7), tokens[:, 1:].reshape(-1))
    assert torch.allclose(ntp_loss(logits, tokens), expected)
    changed = logits.clone()
    changed[:, -1] = 100 * torch.randn(2, 7)  # the last position has no target: it must not matter
    assert torch.equal(ntp_loss(changed, tokens), ntp_loss(logits, tokens))
    tokens2 = tokens.clone()
    tokens2[:, 0] = (tokens[:, 0] + 1) % 7   # the first token is only ever an input, never a target
    assert torch.equal(ntp_loss(logits, tokens2), ntp_loss(logits, tokens))
