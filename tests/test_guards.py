"""Nothing lost, nothing mixed: every bad input, clashing output or changed input is refused by the
real scripts with exit code 2 and one line that names the problem and the fix, and no file that
existed before (outputs, inputs, data) changes. One table, one row per guarded case."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_MODEL, run_argv, run_script

TINY = [f"--{k}={v}" for k, v in TINY_MODEL.items()]


def script(*argv, **kwargs):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True, **kwargs)


def snapshot(*folders):
    """A hash of every file under the folders (lock files and temporaries aside: they come and go)."""
    hashes = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                if not name.endswith(".lock") and ".tmp" not in name:
                    path = os.path.join(root, name)
                    hashes[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def world(toy_data, tmp_path_factory):
    """A finished pretraining run, a replay corpus from it, a finished finetuning run, and
    damaged copies of datasets, corpora and checkpoints to feed the scripts."""
    w = tmp_path_factory.mktemp("world")
    common = dict(device="cpu", eval_sequences=16, batch_size=16, warmup_steps=2)
    run_script("pretrain", datasets=toy_data["add"], out_dir=str(w / "pre"), max_steps=10, eval_interval=5,
               **common, **TINY_MODEL)
    run_script("sample_replay", init_from=str(w / "pre" / "ckpt.pt"), out=str(w / "replay.pt"), num_samples=64,
               prompts=toy_data["add"], device="cpu")
    run_script("finetune", init_from=str(w / "pre" / "ckpt.pt"), dataset=toy_data["sort"], out_dir=str(w / "ft"),
               max_steps=6, eval_interval=3, replay="kl", replay_source=str(w / "replay.pt"), replay_batch_size=8,
               **common)
    data = w / "data"

    def dataset(name, meta_change=None, train=None, meta_text=None):
        folder = data / name
        shutil.copytree(toy_data["add"], folder)
        meta = json.load(open(folder / "meta.json"))
        if meta_change:
            meta.update(meta_change)
            meta = {k: v for k, v in meta.items() if v is not None}
        (folder / "meta.json").write_text(meta_text if meta_text is not None else json.dumps(meta))
        if train is not None:
            (folder / "train.bin").write_bytes(train)
        return str(folder)

    rows = np.fromfile(os.path.join(toy_data["add"], "train.bin"), dtype=np.uint16)
    bad_ids = rows.copy()
    bad_ids[5] = 999
    paths = {
        "meta_malformed": dataset("meta_malformed", meta_text="{not json"),
        "meta_no_token": dataset("meta_no_token", {"dataset_token": None}),
        "odd_bytes": dataset("odd_bytes", train=rows.tobytes() + b"\x01"),
        "ids_out_of_range": dataset("ids_out_of_range", train=bad_ids.tobytes()),
        "short_stream": dataset("short_stream", {"row_len": None}, train=rows[:10].tobytes()),
        "other_tokenizer": dataset("other_tokenizer", {"tokenizer": "another-tokenizer"}),
        "twin/add": dataset("twin/add"),  # the same short name as the toy add task
        "token_outside": dataset("token_outside", {"dataset_token": 999}),
    }
    corpus = torch.load(w / "replay.pt", weights_only=True)
    for name, tokens in (("one_token", corpus["tokens"][:, :1]), ("bad_ids", corpus["tokens"].clone().fill_(99))):
        torch.save({"tokens": tokens, "meta": corpus["meta"]}, w / f"corpus_{name}.pt")
    ckpt = torch.load(w / "pre" / "ckpt.pt", weights_only=True)
    ckpt["model"]["unembed.weight"] += 0.01  # another model of the same shape and data
    torch.save(ckpt, w / "changed_ckpt.pt")
    ckpt["data"] = {paths["other_tokenizer"]: json.load(open(os.path.join(paths["other_tokenizer"], "meta.json")))}
    torch.save(ckpt, w / "other_tokenizer_ckpt.pt")
    ckpt = torch.load(w / "pre" / "ckpt.pt", weights_only=True)
    ckpt["model"]["unembed.weight"][0, 0] = float("nan")   # a diverged run's weights
    torch.save(ckpt, w / "nan_ckpt.pt")
    del ckpt["model"]["unembed.weight"]                    # weights that do not fit the model_config
    torch.save(ckpt, w / "mismatch_ckpt.pt")
    ckpt = torch.load(w / "pre" / "ckpt.pt", weights_only=True)
    ckpt["model"]["unembed.weight"] = ckpt["model"]["unembed.weight"][:, :-1]   # ... one column short
    torch.save(ckpt, w / "wrong_shape_ckpt.pt")
    ckpt = torch.load(w / "pre" / "ckpt.pt", weights_only=True)
    ckpt["model_config"]["n_experts"] = 8                  # a config key this GPT does not have
    torch.save(ckpt, w / "unknown_config_ckpt.pt")
    ckpt = torch.load(w / "pre" / "ckpt.pt", weights_only=True)
    for meta in ckpt["data"].values():
        meta["dataset_token"] = 999                        # a record of its data outside the vocabulary
    torch.save(ckpt, w / "bad_token_ckpt.pt")
    os.symlink(w / "pre", w / "pre_link")                  # another path to the pretraining run
    torch.save({"tokens": corpus["tokens"], "meta": ["not", "a", "dict"]}, w / "corpus_no_meta.pt")
    (w / "torn_replay.pt").write_bytes(b"PK\x03\x04 half a corpus")
    (w / "logs").mkdir()
    (w / "logs" / "empty.jsonl").write_text("")
    (w / "torn_run").mkdir()
    (w / "torn_run" / "log.jsonl").write_text('{"step": 0, "train_sec')   # a run whose log is torn in its only line
    (w / "empty.json").write_text("{}")
    return {"w": w, "pre": w / "pre", "ft": w / "ft", "replay": w / "replay.pt", **paths}


def cases(t, w):
    """(id, argv, words the error line must contain). t: the toy datasets, w: the world."""
    pre, ft, corpus = w["pre"] / "ckpt.pt", w["ft"], w["replay"]
    pretrain = ["pretrain.py", f"--datasets={t['add']}", "--device=cpu", "--max_steps=4", "--eval_interval=2",
                "--eval_sequences=8", "--batch_size=8", *TINY]
    fresh = f"--out_dir={w['w']}/fresh"
    finetune = ["finetune.py", f"--init_from={pre}", f"--dataset={t['sort']}", "--device=cpu", "--max_steps=4",
                "--eval_interval=2", "--eval_sequences=8", "--batch_size=8"]
    sample = ["sample_replay.py", f"--init_from={pre}", f"--prompts={t['add']}", "--num_samples=8", "--device=cpu",
              f"--out={w['w']}/new_corpus.pt"]
    evaluate = ["evaluate.py", f"--checkpoints={pre}", "--reference_checkpoint=", f"--out_json={w['w']}/eval.json"]
    return [
        # 1. never over another run, never over the run's own inputs
        ("finetune into its init_from's folder", [*finetune, f"--out_dir={w['pre']}"], "holds the input"),
        ("fresh pretraining over a finished run", [*pretrain, f"--out_dir={w['pre']}"], "--overwrite=True"),
        ("fresh finetuning over a finished run", [*finetune, f"--out_dir={ft}"], "already holds a run"),
        ("sampling over an existing corpus", [*sample[:-1], f"--out={corpus}"], "already exists"),
        ("sampling over the checkpoint itself", [*sample[:-1], f"--out={pre}"], "checkpoint sampled from"),
        # ... also through a symlink, and never with an offer to overwrite an input
        ("finetune into a symlink to init_from's folder", [*finetune, f"--out_dir={w['w']}/pre_link",
                                                           "--overwrite=True"], "holds the input"),
        ("sampling over the checkpoint through a symlink", [*sample[:-1], f"--out={w['w']}/pre_link/ckpt.pt",
                                                             "--overwrite=True"], "checkpoint sampled from"),
        ("evaluate --out_json onto its checkpoint", [*evaluate[:3], f"--out_json={w['w']}/pre_link/ckpt.pt"],
         "is the input"),
        ("evaluate --out_md onto a dataset file", [*evaluate, f"--datasets={t['add']}",
                                                   f"--out_md={t['add']}/meta.json"], "is the input"),
        ("plot --out onto its input log", ["plot.py", "--figure=frontier", f"--runs=a={ft}/log.jsonl",
                                           f"--out={ft}/log.jsonl"], "is the input"),
        # 2. checkpoints that are damaged, named as such
        ("finetune from NaN weights", [*finetune, fresh, f"--init_from={w['w']}/nan_ckpt.pt"], "NaN or infinite"),
        ("sample from NaN weights", [sample[0], f"--init_from={w['w']}/nan_ckpt.pt", *sample[2:]],
         "NaN or infinite"),
        ("evaluate NaN weights", [evaluate[0], f"--checkpoints={w['w']}/nan_ckpt.pt", *evaluate[2:]],
         "NaN or infinite"),
        ("weights that do not fit model_config", [*finetune, fresh, f"--init_from={w['w']}/mismatch_ckpt.pt"],
         "do not fit its model_config"),
        ("weights of the wrong shape", [*evaluate[:1], f"--checkpoints={w['w']}/wrong_shape_ckpt.pt", *evaluate[2:]],
         "do not fit its model_config"),
        ("a model_config with an unknown key", [sample[0], f"--init_from={w['w']}/unknown_config_ckpt.pt",
                                                *sample[2:]], "do not fit its model_config"),
        # 3. sizes that cannot fit, refused before anything is allocated
        ("sampling 10**12 sequences", [*sample, "--num_samples=1000000000000"], "more than this machine's"),
        ("pretraining batches of 10**9", [*pretrain, fresh, "--batch_size=1000000000"], "more than this machine's"),
        ("finetuning batches of 10**9", [*finetune, fresh, "--batch_size=1000000000"], "more than this machine's"),
        # 5. one line, not a traceback
        ("a corpus whose meta is not a dict", [*finetune, fresh, "--replay=kl",
                                               f"--replay_source={w['w']}/corpus_no_meta.pt"], "no metadata"),
        ("dataset_token outside the vocabulary", [*pretrain, fresh, f"--datasets={w['token_outside']}"],
         "outside the vocabulary"),
        ("sampling from a dataset token outside the vocabulary", [sample[0], f"--init_from={w['w']}/bad_token_ckpt.pt",
                                                                   *sample[2:]], "outside the model's vocabulary"),
        ("evaluate --time_runs on a torn log", [*evaluate, f"--datasets={t['add']}",
                                                f"--time_runs={w['w']}/torn_run"], "cannot be read"),
        ("evaluate --time_runs on a damaged corpus", [*evaluate, f"--datasets={t['add']}",
                                                      f"--time_runs={w['w']}/torn_replay.pt"], "cannot be read"),
        ("evaluate --memory_gb=0", [*evaluate, f"--datasets={t['add']}", "--memory_gb=0"], "--memory_gb"),
        ("evaluate --block_size above the model's", [*evaluate, f"--datasets={t['add']}", "--block_size=4096"],
         "is longer than"),
        ("a prepare script given a bad option", ["data/arithmetic/prepare.py", "--digits=x"], "cannot parse"),
        ("a prepare script given a word for a number", ["data/c4/prepare.py", "--shards=x"], "must be a number"),
        ("the Bible prepare given an unknown option", ["data/bible/prepare.py", "--bogus=1"], "unknown option"),
        # 3. a resume must find the inputs it started with
        ("resume with another init_from", [*finetune, f"--out_dir={ft}", "--resume=True", "--max_steps=6",
                                            "--eval_interval=3", "--batch_size=16", "--warmup_steps=2", "--replay=kl",
                                            f"--replay_source={corpus}",
                                            "--replay_batch_size=8", f"--init_from={w['w']}/changed_ckpt.pt"],
         "not the file the run started from"),
        # 6. messages that name the real problem
        ("--device=gpu", [*pretrain, fresh, "--device=gpu"], "must be auto, cpu"),
        *([("--device=cuda without a GPU", [*pretrain, fresh, "--device=cuda"], "no CUDA GPU")]
          if not torch.cuda.is_available() else []),
        ("--mix_fraction without --mix_dataset", [*finetune, fresh, "--mix_fraction=0.5"], "needs --mix_dataset"),
        ("a corpus of 1-token sequences", [*finetune, fresh, "--replay=kl",
                                           f"--replay_source={w['w']}/corpus_one_token.pt"], "at least 2"),
        # 7. every checkpoint is checked against the data
        ("evaluate a model of another tokenizer", [*evaluate[:1], f"--checkpoints={w['w']}/other_tokenizer_ckpt.pt",
                                                    f"--reference_checkpoint={pre}", f"--datasets={t['add']}", evaluate[3]],
         "tokenized by"),
        # 8. token ids out of range
        ("corpus ids out of range", [*finetune, fresh, "--replay=kl", f"--replay_source={w['w']}/corpus_bad_ids.pt"],
         "outside 0..18"),
        (".bin ids out of range", [*pretrain, fresh, f"--datasets={w['ids_out_of_range']}"], "outside 0..18"),
        # 9. one line, not a traceback
        ("malformed meta.json", [*pretrain, fresh, f"--datasets={w['meta_malformed']}"], "not a valid meta.json"),
        ("meta.json without dataset_token", [*pretrain, fresh, f"--datasets={w['meta_no_token']}"],
         "no 'dataset_token'"),
        ("text data shorter than a window", [*pretrain, fresh, f"--datasets={w['short_stream']}", "--block_size=16"],
         "fewer than one window"),
        ("--width=30 --head_dim=16", [*pretrain, fresh, "--width=30", "--head_dim=16"], "not a multiple"),
        ("--beta2=1.5", [*pretrain, fresh, "--beta2=1.5"], "--beta2"),
        ("pretrain --learning_rate=-1", [*pretrain, fresh, "--learning_rate=-1"], "--learning_rate"),
        ("--out_dir=", [*pretrain, "--out_dir="], "--out_dir is empty"),
        ("--out_dir=None", [*pretrain, "--out_dir=None"], "--out_dir is empty"),
        ("--prompts=19", [*sample, "--prompts=19"], "outside the model's vocabulary"),
        ("--prompts=x:0", [*sample, f"--prompts={t['add']}:0"], "positive number"),
        ("--prompts=x:-1", [*sample, f"--prompts={t['add']}:-1"], "positive number"),
        ("--prompts=x:abc", [*sample, f"--prompts={t['add']}:abc"], "positive number"),
        ("--top_k=-1", [*sample, "--top_k=-1"], "--top_k"),
        ("evaluate into a read-only place", [*evaluate[:3], "--out_json=/proc/nanoreplay/eval.json"],
         "not a writable folder"),
        ("plot an empty log", ["plot.py", "--figure=frontier", f"--runs=a={w['w']}/logs/empty.jsonl",
                               f"--out={w['w']}/f.png"], "is empty"),
        ("plot an empty results JSON", ["plot.py", "--figure=sweep_size", f"--results={w['w']}/empty.json",
                                        f"--out={w['w']}/f.png"], "not the results"),
        # 10. bad values refused, not run otherwise
        ("--dtype=float8", [*pretrain, fresh, "--dtype=float8"], "--dtype"),
        ("--dtype=float16", [*pretrain, fresh, "--dtype=float16"], "--dtype"),
        ("--min_lr=-1", [*pretrain, fresh, "--min_lr=-1"], "--min_lr"),
        ("--learning_rate=0", [*finetune, fresh, "--learning_rate=0"], "--learning_rate"),
        ("--depth=0", [*pretrain, fresh, "--depth=0"], "--depth"),
        ("--lora_alpha=-5", [*finetune, fresh, "--lora_rank=4", "--lora_alpha=-5"], "--lora_alpha"),
        ("--warmup_steps=-5", [*finetune, fresh, "--warmup_steps=-5"], "--warmup_steps"),
        ("--replay_batch_size above the corpus", [*finetune, fresh, "--replay=kl", f"--replay_source={corpus}",
                                                   "--replay_batch_size=100"], "larger than replay corpus"),
        (".bin with an odd number of bytes", [*pretrain, fresh, f"--datasets={w['odd_bytes']}"], "truncated"),
        # 12. one short name, two datasets
        ("two datasets named add", [*evaluate, f"--datasets={t['add']},{w['twin/add']}"], "share the short name"),
        ("pretrain tracking two datasets named add", [*pretrain, fresh, f"--eval_datasets={w['twin/add']}"],
         "share the short name"),
    ]


def test_every_guarded_case_exits_2_with_one_line_and_changes_nothing(world, toy_data):
    """Each case is the script run as `python` runs it, in this process (conftest.run_argv); the
    tests below start real processes where the process matters (locks, kills, limits)."""
    folders = [world["w"], os.path.dirname(toy_data["add"])]
    for name, argv, words in cases(toy_data, world):
        before = snapshot(*folders)
        code, stderr = run_argv(argv)
        lines = [l for l in stderr.strip().splitlines() if l.strip()]
        assert code == 2, (name, code, stderr[-1500:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (name, stderr[-1500:])
        after = snapshot(*folders)
        assert {p: h for p, h in after.items() if p in before} == before, name
        assert not os.path.exists(world["w"] / "fresh" / "log.jsonl"), name  # nothing half-started either


def test_two_runs_on_one_folder_the_second_is_refused_and_a_stale_lock_is_taken_over(toy_data, tmp_path):
    argv = ["pretrain.py", f"--datasets={toy_data['add']}", "--device=cpu", "--max_steps=100000",
            "--eval_interval=50", "--eval_sequences=8", "--batch_size=8", *TINY, f"--out_dir={tmp_path}/run"]
    first = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "run" / ".lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = script(*argv, "--learning_rate=1e-2")
        assert second.returncode == 2 and f"is in use by process {first.pid}" in second.stderr, second.stderr[-1500:]
    finally:
        first.send_signal(signal.SIGKILL)  # killed: its lock stays behind, stale
        first.wait()
    assert (tmp_path / "run" / ".lock").exists()
    replaced = script(*argv, "--max_steps=4", "--overwrite=True")
    assert replaced.returncode == 0, replaced.stderr[-1500:]
    assert not (tmp_path / "run" / ".lock").exists()  # released at the end


def test_four_runs_started_at_once_on_a_stale_lock_one_runs_and_three_are_refused(toy_data, tmp_path):
    """A lock left by a killed run, and four pretrain.py started on its folder together: exactly one
    runs (its log is one run's, step by step), each other stops with one line, and the lock goes."""
    import socket
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 1, "host": socket.gethostname()}))   # no such process
    argv = [sys.executable, "pretrain.py", f"--datasets={toy_data['add']}", "--device=cpu", "--max_steps=20",
            "--eval_interval=10", "--eval_sequences=8", "--batch_size=8", *TINY, f"--out_dir={run}"]
    runs = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(4)]
    results = [(p.wait(), p.stderr.read()) for p in runs]
    assert sorted(rc for rc, _ in results) == [0, 2, 2, 2], results
    for rc, stderr in results:
        errors = [l for l in stderr.splitlines() if l.startswith("error:")]
        assert rc == 0 or (len(errors) == 1 and ("is in use by process" in errors[0]
                                                 or "already holds a run" in errors[0])), stderr[-1500:]
    assert [json.loads(l)["step"] for l in open(run / "log.jsonl")] == [0, 10, 20]
    assert not (run / ".lock").exists()


def test_a_stale_lock_is_taken_over_by_exactly_one_of_many_processes(tmp_path):
    """Eight processes at once on a lock left by a killed run, twenty times: one wins each time."""
    import multiprocessing
    import socket
    from support.config import UserError
    from support.files import Lock
    context = multiprocessing.get_context("fork")
    for round in range(20):
        path = tmp_path / f"{round}.lock"
        path.write_text(json.dumps({"pid": 2 ** 22 + 1, "host": socket.gethostname()}))   # no such process
        start, done, wins = context.Barrier(8), context.Barrier(8), context.Array("i", 8)

        def contend(i):
            start.wait()
            try:
                Lock(str(path), "test")
                wins[i] = 1
            except UserError:
                pass
            done.wait()   # every winner holds its lock until all have tried
            os._exit(0)
        processes = [context.Process(target=contend, args=(i,)) for i in range(8)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(30)
        assert sum(wins) == 1, round


def test_reports_are_strict_json_with_null_where_a_number_is_not_finite(tmp_path):
    from support.files import write_json

    def refuse(constant):
        raise ValueError(constant)
    write_json(str(tmp_path / "r.json"), {"loss": float("nan"), "kl": [float("inf"), 1.5], "n": 3})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse) == {"loss": None, "kl": [None, 1.5],
                                                                                     "n": 3}


def test_running_out_of_memory_is_one_line_and_a_fresh_run_leaves_nothing(toy_data, tmp_path):
    """A batch that passes the size estimate (a lower bound) but not the memory the process may
    use (capped here at 2 GiB of address space): one line, exit 2, and no log left behind."""
    import resource
    limit, rows = 3 << 29, 100_000   # 1.5 GiB; the estimate for 100k rows is 2.4 GiB (any machine with 4 has room)
    result = script("pretrain.py", f"--datasets={toy_data['add']}", "--device=cpu", "--max_steps=4",
                    "--eval_interval=2", "--eval_sequences=8", f"--batch_size={rows}", *TINY,
                    f"--out_dir={tmp_path}/run", preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS,
                                                                                      (limit, limit)))
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]   # beside the progress bar
    assert result.returncode == 2 and len(errors) == 1 and "out of memory" in errors[0], result.stderr[-1500:]
    assert "Traceback" not in result.stderr and "removed, nothing of this run is left" in errors[0]
    assert not os.path.exists(tmp_path / "run" / "log.jsonl") and not os.path.exists(tmp_path / "run" / "ckpt.pt")


def test_a_write_that_finds_no_room_is_named_and_the_earlier_file_stays(world, toy_data, tmp_path):
    """sample_replay replacing a corpus (--overwrite=True) with a larger one, in a process that may
    write files of 16 KiB at most (as a full disk would stop it): one line, exit 2, the earlier
    corpus unchanged, no temporary or partial file left."""
    import resource
    shutil.copy(world["replay"], tmp_path / "replay.pt")
    before = snapshot(tmp_path)
    limit = 16 << 10
    result = script("sample_replay.py", f"--init_from={world['pre']}/ckpt.pt", f"--prompts={toy_data['add']}",
                    "--num_samples=4096", "--batch_size=4096", "--device=cpu", f"--out={tmp_path}/replay.pt",
                    "--overwrite=True", preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "would be larger than this process may write" in errors[0] \
        and "earlier file, if any, is intact" in errors[0], result.stderr[-1500:]
    assert snapshot(tmp_path) == before and os.listdir(tmp_path) == ["replay.pt"]


def test_a_full_disk_is_named_as_such(tmp_path):
    import errno
    from support.config import UserError
    from support.files import atomic_path
    path = tmp_path / "results.json"
    path.write_text("earlier")
    with pytest.raises(UserError, match="the disk is full writing"):
        with atomic_path(str(path)) as tmp:
            open(tmp, "w").write("half of it")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "earlier" and os.listdir(tmp_path) == ["results.json"]


def peak_memory(argv):
    """(exit code, stderr, the peak resident memory in bytes) of a script run."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stderr, usage.ru_maxrss * 1024   # Linux reports KiB


def test_evaluation_memory_stays_inside_its_budget_however_many_windows(tmp_path):
    """evaluate.py keeps the reference's logits for later checkpoints and batches windows: with a
    16k vocabulary each 64-token window's logits take 4 MiB, so 256 windows would hold 1 GiB. Under
    --memory_gb=0.03 the peak grows by less than twice the budget from 4 windows to 256."""
    data = tmp_path / "wide"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 1 << 14, 20_000, dtype=np.uint16).tofile(data / f"{split}.bin")
    (data / "meta.json").write_text(json.dumps({"kind": "text", "tokenizer": "test-16k", "vocab_size": 1 << 14,
                                                "dataset_token": 0, "row_len": None, "token_dtype": "uint16"}))
    run_script("pretrain", datasets=str(data), out_dir=str(tmp_path / "pre"), max_steps=1, eval_interval=1,
               eval_sequences=4, batch_size=4, block_size=64, device="cpu", **TINY_MODEL)
    ckpt, budget = tmp_path / "pre" / "ckpt.pt", 0.03
    peaks = {}
    for windows in (4, 256):
        rc, stderr, peaks[windows] = peak_memory(["evaluate.py", f"--checkpoints=a={ckpt},b={ckpt}",
                                                  f"--reference_checkpoint={ckpt}", f"--datasets={data}", "--device=cpu",
                                                  f"--eval_sequences={windows}", f"--memory_gb={budget}",
                                                  f"--out_json={tmp_path}/eval{windows}.json"])
        assert rc == 0, stderr[-1500:]
    assert json.loads((tmp_path / "eval256.json").read_text())["metrics"]["a"]["wide"]["kl_to_reference"] == 0
    assert peaks[256] - peaks[4] < 2 * budget * 2 ** 30, peaks


def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    from support.files import remove_stale_temporaries
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "replay.pt"
        names = {"live": f"replay.pt.tmp{alive.pid}", "dead": "replay.pt.tmp4194305",
                 "dead_partial": "replay.pt.partial.tmp4194305", "other_output": "replay.pt2.tmp4194305"}
        for name in names.values():
            (tmp_path / name).write_text("x")
        remove_stale_temporaries(str(out))
        assert sorted(os.listdir(tmp_path)) == sorted([names["live"], names["other_output"]])
    finally:
        alive.kill()
        alive.wait()


def test_a_resume_accepts_moved_identical_inputs_and_refuses_changed_ones(world, toy_data, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(world["pre"], moved)
    copied = tmp_path / "elsewhere" / "sort"   # the same dataset, named by another path
    shutil.copytree(toy_data["sort"], copied)
    same_data = script("finetune.py", f"--init_from={moved}/ckpt.pt", f"--replay_source={world['replay']}",
                       "--dataset=" + str(copied), "--device=cpu", "--max_steps=6", "--eval_interval=3",
                       "--eval_sequences=16", "--batch_size=16", "--warmup_steps=2", "--replay=kl",
                       "--replay_batch_size=8", "--resume=True", f"--out_dir={world['ft']}")
    assert same_data.returncode == 0 and "nothing to do" in same_data.stdout, same_data.stderr[-1500:]
    args = [f"--dataset={toy_data['sort']}", "--device=cpu", "--max_steps=6", "--eval_interval=3",
            "--eval_sequences=16", "--batch_size=16", "--warmup_steps=2", "--replay=kl", "--replay_batch_size=8",
            "--resume=True", f"--out_dir={world['ft']}"]
    same = script("finetune.py", f"--init_from={moved}/ckpt.pt", f"--replay_source={world['replay']}", *args)
    assert same.returncode == 0 and "nothing to do" in same.stdout, same.stderr[-1500:]
    # a re-sampled corpus at the same path is other replay data: refused
    resampled = tmp_path / "replay.pt"
    run_script("sample_replay", init_from=str(world["pre"] / "ckpt.pt"), out=str(resampled), num_samples=64,
               prompts=toy_data["add"], device="cpu", seed=7)
    other = script("finetune.py", f"--init_from={moved}/ckpt.pt", f"--replay_source={resampled}", *args)
    assert other.returncode == 2 and "input replay_source" in other.stderr, other.stderr[-1500:]


def test_a_diverging_run_writes_no_checkpoint_and_logs_no_bad_record(toy_data, tmp_path):
    result = script("pretrain.py", f"--datasets={toy_data['add']}", "--device=cpu", "--max_steps=40",
                    "--eval_interval=5", "--eval_sequences=8", "--batch_size=8", *TINY, "--learning_rate=1e6",
                    f"--out_dir={tmp_path}/run")
    assert result.returncode == 2 and "diverged" in result.stderr and "this run wrote no checkpoint" in result.stderr
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    for record in map(json.loads, open(tmp_path / "run" / "log.jsonl")):
        assert all(v is None or not isinstance(v, float) or np.isfinite(v) for v in record.values())


def test_sample_replay_resume_refuses_other_settings(world, toy_data, tmp_path):
    out = tmp_path / "big.pt"
    argv = ["sample_replay.py", f"--init_from={world['pre']}/ckpt.pt", f"--prompts={toy_data['add']}",
            "--num_samples=2000000", "--batch_size=64", "--device=cpu", f"--out={out}"]
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not os.path.exists(f"{out}.partial") and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = snapshot(tmp_path)
    for change, words in (("--temperature=0.5", "other settings"), ("--length=8", "other settings"),
                          (f"--init_from={world['w']}/changed_ckpt.pt", "another model")):
        result = script(*argv, "--resume=True", change)
        assert result.returncode == 2 and words in result.stderr, (change, result.stderr[-1500:])
        assert snapshot(tmp_path) == before, change


def test_a_torn_log_line_and_stale_temporaries_do_not_stop_a_resume(world, toy_data, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["pretrain.py", f"--datasets={toy_data['add']}", "--device=cpu", "--max_steps=12", "--eval_interval=4",
            "--eval_sequences=8", "--batch_size=8", *TINY, f"--out_dir={run_dir}"]
    assert script(*argv).returncode == 0
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    ckpt["finished"], ckpt["step"] = False, 8  # as if killed after step 8, mid-way through a log line
    torch.save(ckpt, run_dir / "ckpt.pt")
    lines = open(run_dir / "log.jsonl").read().splitlines()[:3]
    (run_dir / "log.jsonl").write_text("\n".join(lines) + "\n")
    with open(run_dir / "log.jsonl", "a") as f:
        f.write('{"step": 12, "tok')
    (run_dir / "ckpt.pt.tmp99999").write_bytes(b"half a checkpoint")
    plot = script("plot.py", "--figure=frontier", f"--runs=a={run_dir}/log.jsonl", "--old=add", "--new=add",
                  f"--out={tmp_path}/f.png")
    assert plot.returncode == 0, plot.stderr[-1500:]
    resumed = script(*argv, "--resume=True")
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    assert not (run_dir / "ckpt.pt.tmp99999").exists()
    assert [json.loads(l)["step"] for l in open(run_dir / "log.jsonl")] == [0, 4, 8, 12]
