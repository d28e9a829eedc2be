"""The capacity / learning-rate sweeps: a study runs the pipeline scripts end to end, writes its
numbers and figure, and a second invocation finds every run finished and launches nothing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import sweep
import tokenizer as bpe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def two_languages(tmp_path_factory):
    """Two made-up languages with different alphabets, in the layout data/bible/prepare.py writes."""
    rng = np.random.default_rng(0)

    def language(letters):
        words = ["".join(rng.choice(list(letters), rng.integers(2, 6))) for _ in range(60)]
        return {split: " ".join(rng.choice(words, n)) for split, n in (("train", 6000), ("val", 600))}

    root = tmp_path_factory.mktemp("text") / "two"
    bpe.build_text_datasets(str(root), {"en": language("abcdefghij"), "es": language("klmnopqrst")}, 300, "test")
    return str(root)


def test_compute_study_end_to_end_then_nothing_left_to_run(two_languages, tmp_path):
    tiny = [f"--data_name={two_languages}", f"--out_root={tmp_path / 'out'}", f"--results_dir={tmp_path}",
            "--depth=1", "--head_dim=8", "--base_width=16", "--block_size=32", "--batch_size=8", "--base_tpp=2.0",
            "--replay_samples=16", "--eval_sequences=8", "--compute_reference_steps=5", "--compute_cap_steps=20",
            "--low_lrs=1e-4", "--replay_fractions=0.5", "--study=compute"]
    first = subprocess.run([sys.executable, "sweep.py", *tiny], cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    launched = [line for line in first.stdout.splitlines() if line.startswith("+ ")]
    assert len(launched) == 6   # pretrain, reference, two learning rates, replay corpus, replay run

    result = json.load(open(tmp_path / "sweep_compute.json"))
    assert [a["arm"] for a in result["arms"]] == ["lr 0.003", "lr 0.0001", "lr 0.003 + replay 0.5"]
    high = result["arms"][0]
    assert high["reached"] and high["steps"] <= 10   # the reference run reached the target within 5 steps
    assert not result["arms"][1]["reached"]          # 20 steps at 1e-4 cannot get there
    assert result["runs"] == {"total": 6, "timed": 6} and result["seconds"] > 0
    assert os.path.getsize(tmp_path / "sweep_compute.png") > 10_000

    again = subprocess.run([sys.executable, "sweep.py", *tiny], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [line for line in again.stdout.splitlines() if line.startswith("+ ")]
    assert json.load(open(tmp_path / "sweep_compute.json"))["arms"] == result["arms"]


def arm(name, lr, fraction, english, seconds, steps=100, reached=True):
    return {"arm": name, "learning_rate": lr, "replay_fraction": fraction, "en_after": english,
            "train_seconds": seconds, "steps": steps, "reached": reached}


def test_compute_ratio_is_against_the_slowest_lr_and_needs_a_matching_replay_run():
    arms = [arm("fast", 3e-3, 0, 3.5, 5), arm("slow", 1e-4, 0, 3.0, 100, steps=3000),
            arm("replay a little", 3e-3, 0.25, 3.1, 6),          # faster, but forgets more: no match
            arm("replay more", 3e-3, 0.5, 2.95, 10, steps=200),  # matches: 10x less time
            arm("replay most", 3e-3, 0.75, 2.9, 20),             # matches too, but slower
            arm("never got there", 3e-3, 0.9, 2.8, 1, reached=False)]
    summary = sweep.match_old_loss(arms)
    assert summary["slow_arm"] == "slow" and summary["matched_arm"] == "replay more"
    assert summary["time_ratio"] == pytest.approx(10.0) and summary["step_ratio"] == pytest.approx(15.0)
    assert sweep.match_old_loss(arms[:3])["time_ratio"] is None
