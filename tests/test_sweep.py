"""The capacity / learning-rate sweeps: a study runs the pipeline scripts end to end, writes its
numbers and figure, and a second invocation finds every run finished and launches nothing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from experiments import sweep
from support import tokenizer as bpe



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
            "--eval_sequences=8", "--compute_target_steps=5", "--compute_cap_steps=20", "--seeds=1",
            "--low_lrs=1e-4", "--replay_fractions=0.5", "--replace_fractions=0.5",
            "--study=compute"]
    first = subprocess.run([sys.executable, "experiments/sweep.py", *tiny], cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    launched = [line for line in first.stdout.splitlines() if line.startswith("+ ")]
    assert len(launched) == 7   # pretrain, reference, replay corpus, two learning rates, two replay runs

    result = json.load(open(tmp_path / "sweep_compute.json"))
    arms = result["seeds"][0]["arms"]
    assert [a["arm"] for a in arms] == ["lr 0.003", "lr 0.0001", "lr 0.003 + self-generated 0.5",
                                        "lr 0.003 + real rows 0.5"]
    high = arms[0]
    assert high["reached"] and high["steps"] <= 10   # the target run reached the target within 5 steps
    assert not arms[1]["reached"]                    # 20 steps at 1e-4 cannot get there
    assert arms[2]["replay_passes"] == 1 and arms[2]["sample_seconds"] > 0  # fresh replay, its sampling counted
    assert result["runs"] == {"total": 7, "timed": 7} and result["seconds"] > 0
    assert os.path.getsize(tmp_path / "sweep_compute.png") > 10_000

    again = subprocess.run([sys.executable, "experiments/sweep.py", *tiny], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [line for line in again.stdout.splitlines() if line.startswith("+ ")]
    assert json.load(open(tmp_path / "sweep_compute.json"))["seeds"] == result["seeds"]


def arm(variant, lr, fraction, english, seconds, reached=True):
    return {"variant": variant, "learning_rate": lr, "replay_fraction": fraction, "en_after": english,
            "train_seconds": seconds, "reached": reached}


def test_compute_ratio_is_the_time_replay_needs_for_the_low_lr_runs_english_loss():
    arms = [arm("none", 3e-3, 0, 3.5, 5), arm("none", 1e-3, 0, 3.2, 40), arm("none", 1e-4, 0, 3.0, 100),
            arm("self", 3e-3, 0.25, 3.1, 6), arm("self", 3e-3, 0.5, 2.9, 10),   # 3.0 halfway: 8 s
            arm("replace", 3e-3, 0.25, 3.15, 4), arm("replace", 3e-3, 0.5, 3.05, 9, reached=False)]
    slow, mid = sweep.match_old_loss(arms)[::-1]
    assert slow["low_lr"] == 1e-4 and slow["self"]["seconds"] == pytest.approx(8.0)
    assert slow["self"]["ratio"] == pytest.approx(12.5) and not slow["self"]["at_least"]
    assert slow["replace"]["ratio"] is None          # no replace run that reached the target ends that low
    # 1e-3 ends at 3.2: even the smallest fraction ends lower, so its time only bounds the ratio
    assert mid["self"] == {"seconds": 6, "ratio": pytest.approx(40 / 6), "at_least": True}
    assert mid["replace"]["ratio"] == pytest.approx(10.0) and mid["replace"]["at_least"]


def test_methods_study_runs_every_method_at_every_seed_and_judges_the_orderings(two_languages, tmp_path):
    tiny = [f"--data_name={two_languages}", f"--out_root={tmp_path / 'out'}", f"--results_dir={tmp_path}",
            "--depth=1", "--head_dim=8", "--methods_width=16", "--block_size=32", "--batch_size=8",
            "--methods_tpp=2.0", "--eval_sequences=8", "--methods_target_steps=5",
            "--seeds=1,2", "--methods=standard,lora,kl_self", "--methods_lr=1e-3", "--corpus_steps=1",
            "--study=methods"]
    first = subprocess.run([sys.executable, "experiments/sweep.py", *tiny], cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    launched = [line for line in first.stdout.splitlines() if line.startswith("+ ")]
    # pretrain, the target run, a replay corpus per seed, 3 methods x 2 seeds
    assert len(launched) == 10
    assert "--mixture=0.95,0.05" in launched[0]                     # Spanish present but rare
    assert sum("--lora_rank=16" in line for line in launched) == 2   # LoRA on the blocks only
    assert not any("lora_embeddings" in line for line in launched)
    assert sum("replay_en_8_s2.pt" in line for line in launched) == 2  # seed 2's own corpus, and its run

    result = json.load(open(tmp_path / "sweep_methods.json"))
    assert [(r["method"], r["seed"]) for r in result["runs_table"]] == [
        ("standard", 1), ("standard", 2), ("lora", 1), ("lora", 2), ("kl_self", 1), ("kl_self", 2)]
    standard = result["summary"][0]
    assert standard["seeds"] == 2 and standard["min"] <= standard["forgetting"] <= standard["max"]
    assert [v["a"] + " vs " + v["b"] for v in result["verdicts"]] == ["kl_self vs standard", "kl_self vs lora",
                                                                      "lora vs standard"]
    assert os.path.getsize(tmp_path / "sweep_methods.png") > 10_000
    again = subprocess.run([sys.executable, "experiments/sweep.py", *tiny], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and not [line for line in again.stdout.splitlines() if line.startswith("+ ")]


def method(name, *forgetting):
    mean = sum(forgetting) / len(forgetting)
    return {"method": name, "forgetting": mean, "min": min(forgetting), "max": max(forgetting)}


def test_an_ordering_holds_only_when_the_seed_ranges_do_not_overlap():
    verdicts = {v["claim"]: v for v in sweep.methods_verdicts([
        method("standard", 0.20, 0.22, 0.25), method("lora", 0.18, 0.21, 0.30),
        method("kl_self", 0.010, 0.012, 0.015), method("kl_real", 0.011, 0.016, 0.02),
        method("ntp_self", 0.014, 0.03, 0.05), method("ntp_real", 0.03, 0.035, 0.04)])}
    first = verdicts["replay keeps English: KL self-replay forgets less than standard"]
    assert first["holds"] and first["beyond_spread"] and first["difference"] < 0
    assert verdicts["self-generated ~ real replay (KL)"]["holds"]            # ranges overlap: the same
    kl_ntp_self = verdicts["KL beats NTP on self-generated replay"]           # lower mean, but overlapping
    assert kl_ntp_self["difference"] < 0 and not kl_ntp_self["beyond_spread"] and not kl_ntp_self["holds"]
    assert verdicts["KL beats NTP on real replay"]["holds"]                   # 0.02 < 0.03: separated
    assert verdicts["LoRA forgets no less than standard"]["holds"]
    assert verdicts["self-generated ~ real replay (NTP)"]["holds"]            # 0.014..0.05 overlaps 0.03..0.04


def test_lr_study_pretrains_every_lr_to_one_english_loss_then_sweeps_the_finetuning_lr(two_languages, tmp_path):
    tiny = [f"--data_name={two_languages}", f"--out_root={tmp_path / 'out'}", f"--results_dir={tmp_path}",
            "--depth=1", "--head_dim=8", "--base_width=16", "--block_size=32", "--batch_size=8", "--lr_tpp=20",
            "--eval_sequences=8", "--target_steps=5", "--seeds=1", "--pretrain_lrs=3e-3,1e-2",
            "--lr_target_loss=4.5", "--finetune_lrs=1e-3,3e-3", "--study=lr"]
    done = subprocess.run([sys.executable, "experiments/sweep.py", *tiny], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    launched = [line for line in done.stdout.splitlines() if line.startswith("+ ")]
    assert len(launched) == 2 + 1 + 4                  # two pretrainings, the target run, 2 x 2 finetunings
    assert all("--target_val_loss=4.5" in line for line in launched[:2])
    result = json.load(open(tmp_path / "sweep_lr.json"))
    for model in result["models"]:                     # each stopped once its English loss was at or below 4.5
        assert model["reached"] and model["en_loss"] <= 4.5
    assert {(g["pretrain_lr"], g["finetune_lr"]) for g in result["summary"]} == {
        (3e-3, 1e-3), (3e-3, 3e-3), (1e-2, 1e-3), (1e-2, 3e-3)}
    for r in result["runs_table"]:                     # every curve starts at no forgetting
        assert r["curve"][0][1] == 0.0 and len(r["curve"]) >= 2
    assert os.path.getsize(tmp_path / "sweep_lr.png") > 10_000
