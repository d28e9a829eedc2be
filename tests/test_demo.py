"""The main job, `bash toy_continual.sh`, end to end at a tiny size: every stage through the real
scripts, as a user runs it (the numbers of the real run are in the README)."""
import json
import os
import subprocess

from support.files import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_toy_demo_runs_end_to_end_and_writes_its_results(tmp_path):
    tiny = {"OUT": str(tmp_path / "toy"), "RESULTS": str(tmp_path / "toy_continual"), "WIDTH": "32",
            "PRETRAIN_STEPS": "20", "STEPS": "10", "EVAL_INTERVAL": "10", "BATCH": "16", "REPLAY_BATCH": "16"}
    result = subprocess.run(["bash", "toy_continual.sh"], cwd=ROOT, env={**os.environ, **tiny},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.load(open(tmp_path / "toy_continual.json"))
    tasks = ["add", "reversal", "sort", "modadd"]
    assert sorted(report["arms"]) == ["no_replay", "replay"] and all(sorted(a) == sorted(tasks)
                                                                      for a in report["arms"].values())
    assert report["seconds"] > 0 and report["time_split"]["training"] > 0 and report["time_split"]["sampling"] > 0
    assert (tmp_path / "toy_continual.md").exists() and (tmp_path / "toy_continual.png").exists()
    # each replay run read a corpus kept outside its own folder, and never saw a sequence twice
    for task in tasks[1:]:
        assert (tmp_path / "toy" / "replay_corpora" / f"{task}.pt").exists()
        log = read_jsonl(tmp_path / "toy" / "replay" / task / "log.jsonl")
        assert log[-1]["replay_passes"] == 1
        assert read_jsonl(tmp_path / "toy" / "no_replay" / task / "log.jsonl")[-1]["replay_passes"] == 0


def test_the_studys_own_toy_profile_runs_end_to_end_at_a_tiny_size(tmp_path):
    """PROFILE=study (a GPU job at full size) keeps the study's protocol, shrunk only in size and
    steps here: NTP replay x10 at LR 1e-4, as many replay rows as new ones, every task trained for
    the same fixed number of steps (no accuracy target), a fresh corpus per task never reused."""
    from support.checkpoint import load_checkpoint_dict
    tiny = {"PROFILE": "study", "OUT": str(tmp_path / "toy"), "RESULTS": str(tmp_path / "study"), "WIDTH": "32",
            "BATCH": "16", "PRETRAIN_STEPS": "6", "PRETRAIN_WARMUP": "2", "STEPS": "6", "WARMUP": "2",
            "EVAL_INTERVAL": "3"}
    result = subprocess.run(["bash", "toy_continual.sh"], cwd=ROOT, env={**os.environ, **tiny},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.load(open(tmp_path / "study.json"))
    assert sorted(report["arms"]) == ["no_replay", "replay"]
    for task in ["reversal", "sort", "modadd"]:
        config = load_checkpoint_dict(str(tmp_path / "toy" / "replay" / task / "ckpt.pt"))["config"]
        assert (config["replay"], config["replay_coeff"], config["learning_rate"]) == ("ntp", 10, 1e-4)
        assert config["replay_batch_size"] == config["batch_size"] == 16 and config["target_accuracy"] == 0
        for arm in ("replay", "no_replay"):
            log = read_jsonl(tmp_path / "toy" / arm / task / "log.jsonl")
            assert log[-1]["step"] == 6 and log[-1]["replay_passes"] == (1 if arm == "replay" else 0)
