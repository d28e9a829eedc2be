"""Nothing is lost and nothing runs on wrong inputs: kill-and-resume gives the same weights, bad
inputs stop with one line and no output, a checkpoint cannot run code, and torchrun with two
processes follows the single-process trajectory."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, assert_two_processes_match_one, run_script, script_in_process



def script(*argv, **kwargs):
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, **kwargs)


def one_error_line(result):
    """The single 'error: ...' line a failed script printed last (progress bars aside)."""
    lines = result.stderr.strip().splitlines()
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    return errors[0]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def kill_after(argv, log_path, min_step, timeout=120):
    """Start a script, SIGKILL it once its log shows min_step; returns the last logged step."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    step = -1
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log_path):
            lines = [l for l in open(log_path).read().splitlines() if l.strip()]
            try:
                step = json.loads(lines[-1])["step"] if lines else -1
            except json.JSONDecodeError:
                pass
        if step >= min_step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return step
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{argv[0]} finished or stalled before step {min_step}: make the run longer")


PRETRAIN = ["pretrain.py", "--width=32", "--depth=1", "--head_dim=8", "--batch_size=32", "--max_steps=300",
            "--eval_interval=20", "--eval_sequences=16", "--schedule=cosine", "--device=cpu"]


# a plain cosine run, or one that reaches its target at the first evaluation and is killed in the cooldown
@pytest.mark.parametrize("stop", [[], ["--target_val_loss=100", "--cooldown_steps=260"]], ids=["cosine", "cooldown"])
def test_pretrain_killed_and_resumed_ends_with_the_same_weights(toy_data, tmp_path, stop):
    args = PRETRAIN + [f"--datasets={toy_data['sort']}"] + stop
    last = 280 if stop else 300
    assert script(*args, f"--out_dir={tmp_path / 'straight'}").returncode == 0
    killed_at = kill_after(args + [f"--out_dir={tmp_path / 'killed'}"], str(tmp_path / "killed" / "log.jsonl"), 80)
    assert killed_at < last
    ckpt = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)
    assert not ckpt["finished"] and ckpt["step"] < last   # the kill really was mid-run
    assert ckpt["train_state"]["target_reached_at"] == (20 if stop else None)
    result = script(*args, f"--out_dir={tmp_path / 'killed'}", "--resume=True")
    assert result.returncode == 0, result.stderr
    a, b = weights(tmp_path / "straight" / "ckpt.pt"), weights(tmp_path / "killed" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "killed" / "log.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == last  # no duplicated log lines after resuming


@pytest.mark.parametrize("reuse", [True, False])  # cycled corpus, or fresh samples drawn mid-run
def test_finetune_with_replay_corpus_killed_and_resumed_ends_with_the_same_weights(tiny_checkpoint, toy_data, tmp_path,
                                                                                   reuse):
    corpus = str(tmp_path / "replay.pt")
    run_script("sample_replay", init_from=tiny_checkpoint, out=corpus, num_samples=100, prompts=toy_data["sort"],
               device="cpu")
    args = ["finetune.py", f"--init_from={tiny_checkpoint}", f"--dataset={toy_data['add']}", "--replay=kl",
            f"--replay_source={corpus}", f"--replay_reuse={reuse}", "--lora_rank=2", "--batch_size=16", "--max_steps=240",
            "--eval_interval=20",
            "--eval_sequences=16", "--device=cpu"]
    assert script(*args, f"--out_dir={tmp_path / 'straight'}").returncode == 0
    kill_after(args + [f"--out_dir={tmp_path / 'killed'}"], str(tmp_path / "killed" / "log.jsonl"), 80)
    assert not torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)["finished"]
    result = script(*args, f"--out_dir={tmp_path / 'killed'}", "--resume=True")
    assert result.returncode == 0, result.stderr
    a, b = weights(tmp_path / "straight" / "ckpt.pt"), weights(tmp_path / "killed" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_finished_run_does_nothing_and_changed_settings_are_refused(tiny_checkpoint, toy_data, tmp_path):
    args = ["finetune.py", f"--init_from={tiny_checkpoint}", f"--dataset={toy_data['add']}", "--batch_size=16",
            "--max_steps=4", "--eval_interval=2", "--eval_sequences=16", "--device=cpu", f"--out_dir={tmp_path}"]
    assert script(*args).returncode == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    again = script(*args, "--resume=True")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    changed = script(*args, "--resume=True", "--learning_rate=0.5")
    assert changed.returncode == 2 and "cannot resume" in changed.stderr
    assert (tmp_path / "ckpt.pt").read_bytes() == before


# --- bad input: one line naming the problem and the fix, exit code 2, no output written ---------

def make_variants(toy_data, tiny_checkpoint, tmp_path):
    """Broken inputs built from good ones."""
    def dataset_copy(name, edit):
        path = tmp_path / name
        path.mkdir()
        for f in ("train.bin", "val.bin", "meta.json"):
            (path / f).write_bytes(open(os.path.join(toy_data["add"], f), "rb").read())
        edit(path)
        return str(path)

    def set_meta(**changes):
        def edit(path):
            meta = json.load(open(path / "meta.json"))
            meta.update(changes)
            json.dump(meta, open(path / "meta.json", "w"))
        return edit

    empty = dataset_copy("empty", lambda p: (p / "train.bin").write_bytes(b""))
    truncated = dataset_copy("truncated", lambda p: (p / "train.bin").write_bytes((p / "train.bin").read_bytes()[:-6]))
    big_vocab = dataset_copy("big_vocab", set_meta(vocab_size=50000))
    other_tok = dataset_copy("other_tok", set_meta(tokenizer="bpe-0123456789ab"))
    long_corpus = str(tmp_path / "long.pt")
    torch.save({"tokens": torch.zeros(4, 40, dtype=torch.int32),
                "meta": {"vocab_size": 19, "tokenizer": json.load(open(os.path.join(toy_data["add"], "meta.json")))["tokenizer"]}},
               long_corpus)
    not_corpus = str(tmp_path / "not_corpus.pt")
    torch.save({"weights": torch.zeros(2)}, not_corpus)
    return empty, truncated, big_vocab, other_tok, long_corpus, not_corpus


def test_bad_inputs_stop_with_one_line_and_write_nothing(tiny_checkpoint, toy_data, tmp_path):
    empty, truncated, big_vocab, other_tok, long_corpus, not_corpus = make_variants(toy_data, tiny_checkpoint, tmp_path)
    ft = ["finetune.py", f"--init_from={tiny_checkpoint}", "--max_steps=2", "--device=cpu"]
    add = f"--dataset={toy_data['add']}"
    pre = ["pretrain.py", "--width=32", "--depth=1", "--head_dim=8", "--max_steps=2", "--device=cpu"]
    cases = [
        (pre + [f"--datasets={tmp_path / 'missing'}"], "meta.json not found"),
        (pre + [f"--datasets={empty}"], "missing or empty"),
        (pre + [f"--datasets={truncated}"], "truncated"),
        (pre + [f"--datasets={toy_data['add']}", "--block_size=8"], "exceed the model's block_size"),
        (pre + [f"--datasets={toy_data['add']}", "--max_steps=0"], "no stopping rule"),
        (pre + [f"--datasets={toy_data['add']}", "--batch_size=0"], "must be positive"),
        (pre + [f"--datasets={toy_data['add']}", "--schedule=linear"], "constant or cosine"),
        (pre + [f"--datasets={toy_data['add']}", "--mixture=0.5"], "--mixture"),
        (pre + [f"--datasets={toy_data['add']}", "--learning_rate=fast"], "expects a float"),
        (ft + [f"--dataset={big_vocab}"], "exceeds the model's"),
        (ft + [f"--dataset={other_tok}"], "tokenized by"),
        (ft + [add, "--replay=kl", f"--replay_source={long_corpus}"], "block_size"),
        (ft + [add, "--replay=kl", f"--replay_source={not_corpus}"], "not a replay corpus"),
        (ft + [add, "--replay=kl", f"--replay_source={tmp_path / 'nope.pt'}"], "run sample_replay.py"),
        (ft + [add, "--replay=kl", f"--replay_source=data:{other_tok}"], "tokenized by"),
        (ft + [add, "--replay=kl"], "needs --replay_source"),
        (ft + [add, "--replay=klx", "--replay_source=x"], "must be none, kl or ntp"),
        (ft + [add, "--replay_coeff=-1"], ">= 0"),
        (ft + [add, "--max_steps=0"], "must be positive"),
        (ft + [add, "--mix_fraction=0.5", f"--mix_dataset={other_tok}"], "tokenized by"),
        (["finetune.py", f"--init_from={tmp_path / 'none.pt'}", add], "not found"),
        (["sample_replay.py", f"--init_from={tiny_checkpoint}", "--prompts=english"], "neither a token id"),
        (["sample_replay.py", f"--init_from={tiny_checkpoint}", f"--prompts={toy_data['sort']}", "--length=99"],
         "--length"),
        (["evaluate.py", f"--checkpoints=a={tiny_checkpoint}", f"--reference_checkpoint={tiny_checkpoint}",
          f"--datasets={other_tok}"], "tokenized by"),
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        target = [f"--out={out}/c.pt"] if argv[0] == "sample_replay.py" else \
            [f"--out_json={out}/e.json"] if argv[0] == "evaluate.py" else [f"--out_dir={out}"]
        result = script_in_process(*argv, *target)   # (the script as python runs it, in this process)
        assert result.returncode == 2, (argv, result.stderr[-2000:])
        assert message in one_error_line(result), (argv, result.stderr[-2000:])
        assert not out.exists(), argv


def test_nan_loss_stops_the_run_without_writing_a_bad_checkpoint(toy_data, tmp_path):
    result = script("pretrain.py", f"--datasets={toy_data['add']}", "--width=32", "--depth=1", "--head_dim=8",
                    "--max_steps=50", "--eval_interval=1", "--warmup_steps=0", "--learning_rate=1e30",
                    "--device=cpu", f"--out_dir={tmp_path}")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "diverged" in line and "lower --learning_rate" in line
    if (tmp_path / "ckpt.pt").exists():   # any checkpoint left is a good one
        assert "the last good checkpoint is" in line
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    else:
        assert "this run wrote no checkpoint" in line


class RunsCode:
    """Unpickling this calls os.system: exactly what weights_only=True must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tiny_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    evil = torch.load(tiny_checkpoint, weights_only=True)
    evil["config"] = RunsCode(str(marker))
    torch.save(evil, tmp_path / "evil.pt")
    result = script("evaluate.py", f"--checkpoints=evil={tmp_path / 'evil.pt'}", "--reference_checkpoint=", "--datasets=x",
                    f"--out_json={tmp_path / 'e.json'}")
    assert result.returncode == 2 and "could not be loaded safely" in result.stderr
    assert not marker.exists()


# --- several processes --------------------------------------------------------------------------

def test_torchrun_two_processes_match_one_process(tiny_checkpoint, toy_data, tmp_path):
    common = ["--batch_size=32", "--max_steps=5", "--eval_interval=1", "--eval_sequences=16", "--warmup_steps=2",
              "--device=cpu"]
    pretrain = assert_two_processes_match_one(["pretrain.py", f"--datasets={toy_data['sort']}", "--width=32",
                                               "--depth=1", "--head_dim=8", *common], tmp_path / "pretrain")
    finetune = assert_two_processes_match_one(["finetune.py", f"--init_from={tiny_checkpoint}",
                                               f"--dataset={toy_data['add']}", "--replay=kl",
                                               f"--replay_source=data:{toy_data['sort']}", *common], tmp_path / "finetune")
    assert [r["step"] for r in pretrain] == [r["step"] for r in finetune] == [0, 1, 2, 3, 4, 5]

    # a second two-process run into the finished run's folder is refused by every rank, not only by
    # rank 0 (the other would wait for it forever), and the finished run is left as it was
    out_dir = tmp_path / "pretrain" / "two"
    before = (out_dir / "log.jsonl").read_bytes(), (out_dir / "ckpt.pt").read_bytes()
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "pretrain.py", f"--datasets={toy_data['sort']}", "--width=32", "--depth=1", "--head_dim=8",
                            *common, f"--out_dir={out_dir}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite=True" in again.stderr
    assert ((out_dir / "log.jsonl").read_bytes(), (out_dir / "ckpt.pt").read_bytes()) == before


def test_sharded_finetuning_follows_one_process_and_resumes_bit_for_bit(tiny_checkpoint, toy_data, tmp_path):
    """finetune.py --fsdp=True under torchrun (FSDP2's fully_shard, gloo on CPU): each process holds
    half of every weight, gradient and AdamW moment, and the run follows the single-process one
    step for step, to the same checkpoint. Killed after a checkpoint and resumed, it ends with the
    weights of a run never stopped."""
    common = ["finetune.py", f"--init_from={tiny_checkpoint}", f"--dataset={toy_data['add']}", "--replay=kl",
              f"--replay_source=data:{toy_data['sort']}", "--batch_size=32", "--eval_sequences=16",
              "--warmup_steps=2", "--device=cpu", "--fsdp=True"]
    assert_two_processes_match_one([*common, "--max_steps=5", "--eval_interval=1"], tmp_path / "match")
    one, two = (torch.load(tmp_path / "match" / d / "ckpt.pt", weights_only=True)["model"] for d in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    long = [*common, "--max_steps=40", "--eval_interval=3", "--replay_batch_size=16"]
    straight = subprocess.run([*torchrun, *long, f"--out_dir={tmp_path}/straight"], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = subprocess.Popen([*torchrun, *long, f"--out_dir={tmp_path}/resumed"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "resumed" / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    for pid in filter(str.isdigit, os.listdir("/proc")):   # torchrun and its workers, wherever they are
        try:
            if f"--out_dir={tmp_path}/resumed".encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    killed.wait()
    stopped_at = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"]
    resumed = subprocess.run([*torchrun, *long, f"--out_dir={tmp_path}/resumed", "--resume=True"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"at step {stopped_at}" in resumed.stdout, resumed.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 40 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_sampling_under_torchrun_is_the_corpus_one_process_samples(tiny_checkpoint, toy_data, tmp_path):
    """Chunks of --batch_size sequences from one random stream: two processes, each sampling every
    other chunk and passing over the other's draws (7 chunks here, the last one short), write the
    very corpus one process writes. finetune.py's fresh replay, drawn mid-run when its corpus runs out,
    is shared the same way, and two processes still follow one."""
    from replay import load_corpus
    argv = ["sample_replay.py", f"--init_from={tiny_checkpoint}", f"--prompts={toy_data['sort']}", "--num_samples=100",
            "--batch_size=16", "--device=cpu"]
    one = subprocess.run([sys.executable, *argv, f"--out={tmp_path}/one.pt"], cwd=REPO, capture_output=True, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv,
                          f"--out={tmp_path}/two.pt"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-1500:], two.stderr[-3000:])
    (a, meta_a), (b, meta_b) = load_corpus(str(tmp_path / "one.pt")), load_corpus(str(tmp_path / "two.pt"))
    assert a.shape == (100, 14) and torch.equal(a, b) and len(set(map(tuple, a.tolist()))) > 50
    assert {k: v for k, v in meta_a.items() if k != "seconds"} == {k: v for k, v in meta_b.items() if k != "seconds"}
    assert sorted(os.listdir(tmp_path)) == ["one.pt", "two.pt"]   # no partial file or lock left

    run_script("sample_replay", init_from=tiny_checkpoint, prompts=toy_data["sort"], num_samples=32, device="cpu",
               out=str(tmp_path / "small.pt"))
    logs = assert_two_processes_match_one(["finetune.py", f"--init_from={tiny_checkpoint}", f"--dataset={toy_data['add']}",
                                           "--replay=kl", f"--replay_source={tmp_path}/small.pt", "--replay_batch_size=16",
                                           "--batch_size=16", "--max_steps=6", "--eval_interval=3",
                                           "--eval_sequences=16", "--warmup_steps=2", "--device=cpu"],
                                          tmp_path / "finetune")
    assert logs[-1]["replay_sample_seconds"] > 0   # it ran out and sampled more


def test_interrupted_sampling_resumes_to_the_same_corpus(tiny_checkpoint, toy_data, tmp_path, monkeypatch):
    from replay import load_corpus
    from model import GPT
    args = dict(init_from=tiny_checkpoint, prompts=f"{toy_data['sort']},{toy_data['reversal']}", num_samples=64,
                batch_size=16, device="cpu")
    run_script("sample_replay", out=str(tmp_path / "straight.pt"), **args)

    real_generate, calls = GPT.generate, []

    def dies_on_third_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if the process were stopped mid-run
        return real_generate(self, *a, **k)

    monkeypatch.setattr(GPT, "generate", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_script("sample_replay", out=str(tmp_path / "resumed.pt"), **args)
    assert not (tmp_path / "resumed.pt").exists() and (tmp_path / "resumed.pt.partial").exists()
    monkeypatch.setattr(GPT, "generate", real_generate)
    run_script("sample_replay", out=str(tmp_path / "resumed.pt"), resume=True, **args)
    straight, _ = load_corpus(str(tmp_path / "straight.pt"))
    resumed, _ = load_corpus(str(tmp_path / "resumed.pt"))
    assert torch.equal(straight, resumed) and not (tmp_path / "resumed.pt.partial").exists()
