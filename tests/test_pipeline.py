"""The pipeline scripts, run in-process on tiny models: checkpoints, replay corpora, the KL
regulariser, evaluation, and the one-line errors for bad input."""
import json
import os
import time

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, run_script
from evaluate import evaluate_on
from replay import load_corpus
from support import checkpoint
from support.checkpoint import load_checkpoint
from support.config import UserError, apply_overrides
from support.dataset import Dataset
from support.files import read_jsonl
from support.training import lr_at


def weights(path):
    return torch.load(path, weights_only=True)["model"]


# --- checkpoints ------------------------------------------------------------------------------

def test_pretrain_checkpoint_is_plain_data_with_config_and_data_metadata(tiny_checkpoint, toy_data):
    model, ckpt = load_checkpoint(tiny_checkpoint)  # weights_only=True inside
    assert ckpt["model_config"]["width"] == TINY_MODEL["width"]
    assert set(ckpt["data"]) == {toy_data["reversal"], toy_data["sort"]}
    assert ckpt["step"] == 30 and ckpt["finished"] and "optimizer" in ckpt["train_state"]
    assert not any(name.endswith(".tmp") for name in os.listdir(os.path.dirname(tiny_checkpoint)))


def test_pretraining_is_deterministic_given_a_seed(toy_data, tmp_path):
    args = dict(datasets=toy_data["sort"], max_steps=5, eval_interval=5, eval_sequences=16, batch_size=16,
                device="cpu", **TINY_MODEL)
    run_script("pretrain", out_dir=str(tmp_path / "a"), **args)
    run_script("pretrain", out_dir=str(tmp_path / "b"), **args)
    a, b = weights(tmp_path / "a" / "ckpt.pt"), weights(tmp_path / "b" / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- replay corpus ------------------------------------------------------------------------------

def test_replay_corpus_round_trips_with_its_metadata(tiny_checkpoint, toy_data, tmp_path):
    out = str(tmp_path / "replay.pt")
    run_script("sample_replay", init_from=tiny_checkpoint, out=out, num_samples=50, batch_size=16,
               prompts=f"{toy_data['reversal']}:0.6,{toy_data['sort']}:0.4", device="cpu")
    tokens, meta = load_corpus(out)
    assert tokens.shape == (50, 14)
    assert meta["count"] == 50 and meta["temperature"] == 1.0 and meta["top_k"] == 0
    assert meta["vocab_size"] == 19 and meta["tokenizer"].startswith("arithmetic")
    assert meta["source_checkpoint"] == os.path.abspath(tiny_checkpoint)
    assert [p["count"] for p in meta["prompts"]] == [30, 20]
    assert (tokens[:30, 0] == 2).all() and (tokens[30:, 0] == 3).all()  # reversal and sort BOS tokens
    assert set(meta["stats"]) == {toy_data["reversal"], toy_data["sort"]}


def test_a_replay_corpus_from_another_tokenizer_is_refused(tiny_checkpoint, toy_data, tmp_path):
    path = str(tmp_path / "alien.pt")
    torch.save({"tokens": torch.zeros(4, 14, dtype=torch.int32),
                "meta": {"vocab_size": 19, "tokenizer": "bpe-4096"}}, path)
    with pytest.raises(UserError, match="tokenizer"):
        run_script("finetune", init_from=tiny_checkpoint, dataset=toy_data["add"], out_dir=str(tmp_path / "ft"),
                   replay="kl", replay_source=path, max_steps=1, device="cpu")
    assert not os.path.exists(tmp_path / "ft" / "ckpt.pt")


# --- finetuning ---------------------------------------------------------------------------------

FT = dict(max_steps=6, batch_size=16, eval_interval=3, eval_sequences=16, warmup_steps=2, device="cpu")


def test_finetune_with_coeff_zero_equals_plain_finetuning(tiny_checkpoint, toy_data, tmp_path):
    run_script("finetune", init_from=tiny_checkpoint, dataset=toy_data["add"], out_dir=str(tmp_path / "plain"), **FT)
    run_script("finetune", init_from=tiny_checkpoint, dataset=toy_data["add"], out_dir=str(tmp_path / "kl0"),
               replay="kl", replay_coeff=0.0, replay_source=f"data:{toy_data['sort']}", **FT)
    run_script("finetune", init_from=tiny_checkpoint, dataset=toy_data["add"], out_dir=str(tmp_path / "kl1"),
               replay="kl", replay_coeff=1.0, replay_source=f"data:{toy_data['sort']}", **FT)
    plain, kl0, kl1 = (weights(tmp_path / n / "ckpt.pt") for n in ("plain", "kl0", "kl1"))
    assert all(torch.equal(plain[k], kl0[k]) for k in plain)
    assert not all(torch.equal(plain[k], kl1[k]) for k in plain)  # the term does something when on


def test_replay_sequences_are_never_reused_unless_asked_and_passes_are_logged(tiny_checkpoint, toy_data, tmp_path):
    corpus = str(tmp_path / "replay.pt")
    run_script("sample_replay", init_from=tiny_checkpoint, out=corpus, num_samples=40, prompts=toy_data["sort"],
               device="cpu")
    args = dict(init_from=tiny_checkpoint, dataset=toy_data["add"], replay="kl", replay_source=corpus, **FT)
    # 6 steps x 16 = 96 > 40: the frozen reference samples more whenever the corpus runs out
    run_script("finetune", out_dir=str(tmp_path / "fresh"), **args)
    log = read_jsonl(tmp_path / "fresh" / "log.jsonl")
    assert [r["replay_passes"] for r in log] == [0, 1, 1] and log[-1]["replay_sample_seconds"] > 0
    # with reuse allowed the corpus is cycled instead, and the log says how often
    run_script("finetune", out_dir=str(tmp_path / "reused"), replay_reuse=True, **args)
    assert read_jsonl(tmp_path / "reused" / "log.jsonl")[-1]["replay_passes"] == 3
    assert not torch.equal(weights(tmp_path / "fresh" / "ckpt.pt")["unembed.weight"],
                           weights(tmp_path / "reused" / "ckpt.pt")["unembed.weight"])
    # a corpus from another checkpoint cannot be topped up: too small is refused up front (the same
    # file under another name is the same model, so it is "another" only if its content differs)
    other = tmp_path / "other.pt"
    changed = torch.load(tiny_checkpoint, weights_only=True)
    changed["model"]["unembed.weight"] += 0.01
    torch.save(changed, other)
    with pytest.raises(UserError, match=r"replay\.pt has 40 sequences.*--num_samples=96"):
        run_script("finetune", out_dir=str(tmp_path / "short"), **{**args, "init_from": str(other)})
    assert not (tmp_path / "short").exists()
    run_script("finetune", out_dir=str(tmp_path / "plain"), **{**args, "replay": "none"})  # plain runs log 0
    assert read_jsonl(tmp_path / "plain" / "log.jsonl")[-1]["replay_passes"] == 0


def test_fresh_replay_is_sampled_as_the_run_asks_compiled_or_not(tiny_checkpoint, toy_data, tmp_path, monkeypatch):
    """finetune.py --compile=True reaches the replay sampled mid-run too (passed in, no module global)."""
    import replay
    corpus = str(tmp_path / "replay.pt")
    run_script("sample_replay", init_from=tiny_checkpoint, out=corpus, num_samples=8, prompts=toy_data["sort"],
               device="cpu")
    model, ckpt = load_checkpoint(tiny_checkpoint)
    T, asked, real_sample = ckpt["model_config"]["block_size"], [], replay.sample_corpus
    def sample(*args, **kwargs):   # record what was asked; sample uncompiled (compiling takes seconds)
        asked.append(kwargs["compile_step"])
        return real_sample(*args, **{**kwargs, "compile_step": False})
    monkeypatch.setattr(replay, "sample_corpus", sample)
    for compile_step in (False, True):
        stream = replay.ReplayStream(corpus, tiny_checkpoint, ckpt, np.random.default_rng(0), 8, T, 3, False, model,
                                     compile_step=compile_step)
        for _ in range(3):   # 24 sequences from a corpus of 8: two top-ups, none seen twice
            stream.next(8, T)
        assert stream.chunk == 2 and stream.passes == 1
    assert asked == [False, False, True, True]


def test_the_reference_gets_no_gradient_and_never_changes(tiny_checkpoint, toy_data, tmp_path, monkeypatch):
    loaded = []
    real_load = checkpoint.load_checkpoint

    def recording_load(path, device="cpu"):
        model, ckpt = real_load(path, device)
        loaded.append(model)
        return model, ckpt

    monkeypatch.setattr(checkpoint, "load_checkpoint", recording_load)
    original = weights(tiny_checkpoint)
    # reload finetune so it binds the recording loader, then run with KL replay and LwF
    module = run_script("finetune", init_from=tiny_checkpoint, dataset=toy_data["add"],
                        out_dir=str(tmp_path / "ft"), replay="kl", replay_source=f"data:{toy_data['sort']}",
                        lwf_coeff=1.0, **FT)
    assert module.load_checkpoint is recording_load
    model, reference = loaded
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert all(torch.equal(reference.state_dict()[k], original[k]) for k in original)
    assert not all(torch.equal(model.state_dict()[k], original[k]) for k in original)


def test_finetune_logs_old_and_new_data_from_step_zero(tiny_checkpoint, toy_data, tmp_path):
    run_script("finetune", init_from=tiny_checkpoint, dataset=toy_data["add"], out_dir=str(tmp_path / "ft"), **FT)
    log = read_jsonl(tmp_path / "ft" / "log.jsonl")
    assert [r["step"] for r in log] == [0, 3, 6]
    assert {"accuracy/add", "accuracy/sort", "accuracy/reversal", "val_loss/sort"} <= set(log[0])
    _, ckpt = load_checkpoint(str(tmp_path / "ft" / "ckpt.pt"))
    assert toy_data["add"] in ckpt["data"] and toy_data["sort"] in ckpt["data"]


# --- evaluation ---------------------------------------------------------------------------------

class RowSet:
    """Stands in for a toy Dataset: fixed validation rows and where their answers are."""

    def __init__(self, rows, start, end):
        self.rows, self.meta = rows, {"answer_start": start, "answer_end": end}

    def eval_batches(self, split, batch_size, block_size, max_sequences):
        for i in range(0, min(len(self.rows), max_sequences), batch_size):
            yield self.rows[i:i + batch_size]


def test_evaluation_numbers_do_not_depend_on_the_memory_it_may_use(toy_data):
    """Small logits and cache budgets make smaller batches and recompute the reference's logits (so
    memory does not grow with the number of windows): the numbers stay the same."""
    from model import GPT, GPTConfig
    data = Dataset(toy_data["add"])
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=data.meta["vocab_size"], block_size=data.row_len, **TINY_MODEL)
    model, reference = GPT(config).eval(), GPT(config).eval()
    roomy = evaluate_on(model, data, None, 64, reference=reference, reference_cache={})
    cache = {}
    tight = evaluate_on(model, data, None, 64, reference=reference, reference_cache=cache,
                        logits_bytes=data.row_len * config.vocab_size * 16 * 5, cache_bytes=0)   # 5 rows a batch
    assert not cache and tight == pytest.approx(roomy, rel=1e-6) and set(tight) == {"loss", "kl", "accuracy"}


def test_a_model_measured_against_itself_fills_the_reference_cache_with_the_reference_numbers(toy_data):
    """At a finetuning run's step 0 (and for evaluate.py's reference row) the model is the reference:
    one forward pass serves both. The cache it fills, and every later KL read from it, are exactly
    those a separate copy of the reference gives."""
    import copy
    from model import GPT, GPTConfig
    data = Dataset(toy_data["add"])
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=data.meta["vocab_size"], block_size=data.row_len, **TINY_MODEL)
    model = GPT(config).eval()
    reference = copy.deepcopy(model)
    itself, separate = {}, {}
    first = evaluate_on(model, data, None, 64, reference=model, reference_cache=itself, batch_size=16)
    assert first == evaluate_on(model, data, None, 64, reference=reference, reference_cache=separate, batch_size=16)
    assert first["kl"] == 0.0 and len(itself) == 4
    assert all(torch.equal(a, b) for i in itself for a, b in zip(itself[i], separate[i]))
    with torch.no_grad():
        model.blocks[0].mlp.up.weight.add_(0.1)   # "trained": now it drifts from the reference
    later = evaluate_on(model, data, None, 64, reference=reference, reference_cache=itself, batch_size=16)
    assert later["kl"] > 0 and later == evaluate_on(model, data, None, 64, reference=reference, batch_size=16)


def test_accuracy_is_exact_match_of_greedy_decoding(toy_data):
    """A row counts as right exactly when greedy decoding from its prompt writes its whole answer:
    rows holding the model's own greedy answers are right; one changed answer token, the first or
    the last, makes a row wrong. (evaluate_on reads it off the loss's teacher-forced logits.)"""
    from model import GPT, GPTConfig
    data = Dataset(toy_data["add"])
    start, end, V = data.meta["answer_start"], data.meta["answer_end"], data.meta["vocab_size"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=end, **TINY_MODEL)).eval()
    prompts = next(data.eval_batches("val", 12, None, 12))[:, :start]
    rows = model.generate(prompts, end - start, temperature=0)   # its own greedy answers
    rows[4:8, start] = (rows[4:8, start] + 1) % V
    rows[8:12, end - 1] = (rows[8:12, end - 1] + 1) % V
    numbers = evaluate_on(model, RowSet(rows, start, end), None, batch_size=5)
    assert numbers["accuracy"] == 4 / 12 and set(numbers) == {"loss", "accuracy"}


def test_methods_are_compared_at_exactly_the_target_loss_by_interpolation(tmp_path):
    import evaluate
    log = [{"step": 0, "val_loss/es": 9.0, "val_loss/en": 3.0}, {"step": 20, "val_loss/es": 5.0, "val_loss/en": 3.2},
           {"step": 40, "val_loss/es": 4.0, "val_loss/en": 3.6}]
    values, how = evaluate.at_target(log, "val_loss/es", 4.5)  # halfway between steps 20 and 40
    assert how == "interpolated between steps 20 and 40"
    assert values["step"] == 30 and values["val_loss/en"] == pytest.approx(3.4)
    assert evaluate.at_target(log, "val_loss/es", 5.0) == (log[1], "exact")
    assert evaluate.at_target(log, "val_loss/es", 3.0) == (log[2], "not reached")
    for name, records in (("a", log), ("b", log[:2])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    out = tmp_path / "cmp.json"
    run_script("evaluate", logs=f"a={tmp_path / 'a.jsonl'},b={tmp_path / 'b.jsonl'}", match="val_loss/es=4.5",
               out_json=str(out))
    runs = json.load(open(out))["runs"]
    assert runs["a"]["forgetting/en"] == pytest.approx(0.4) and runs["a"]["how"].startswith("interpolated")
    assert runs["b"]["how"] == "not reached" and runs["b"]["best"] == 5.0


def test_evaluate_reports_accuracy_loss_kl_and_forgetting(tiny_checkpoint, toy_data, tmp_path):
    """...and a finetuning run's log holds the same numbers: its last record is its final checkpoint
    measured as evaluate.py measures it, its step 0 the reference (so experiments read the logs)."""
    run_script("finetune", init_from=tiny_checkpoint, dataset=toy_data["add"], out_dir=str(tmp_path / "ft"),
               eval_kl=True, **{**FT, "eval_sequences": 32})
    out_json = str(tmp_path / "eval.json")
    run_script("evaluate", checkpoints=f"same={tiny_checkpoint},ft={tmp_path / 'ft' / 'ckpt.pt'}",
               reference_checkpoint=tiny_checkpoint, datasets=f"{toy_data['sort']},{toy_data['add']}", eval_sequences=32,
               out_json=out_json, out_md=str(tmp_path / "eval.md"), device="cpu")
    report = json.load(open(out_json))
    same, ft = report["metrics"]["same"], report["metrics"]["ft"]
    assert same["sort"]["kl_to_reference"] == pytest.approx(0, abs=1e-6)
    assert same["sort"]["forgetting_loss"] == pytest.approx(0, abs=1e-6)
    assert ft["sort"]["kl_to_reference"] > 0
    reference = report["metrics"]["reference"]
    assert ft["sort"]["forgetting_loss"] == pytest.approx(ft["sort"]["loss"] - reference["sort"]["loss"])
    assert report["arms"]["ft"] == {"sort": ft["sort"]["accuracy"], "add": ft["add"]["accuracy"]}
    p = ft["add"]["accuracy"]   # 32 rows: the standard error of an accuracy over them, beside it in the table
    assert ft["add"]["accuracy_se"] == pytest.approx((p * (1 - p) / 32) ** 0.5)
    assert f"| {p:.3f} ± {ft['add']['accuracy_se']:.3f} |" in open(tmp_path / "eval.md").read()
    log = read_jsonl(tmp_path / "ft" / "log.jsonl")
    for record, numbers in ((log[-1], ft), (log[0], reference)):
        for short in ("sort", "add"):
            assert record[f"val_loss/{short}"] == pytest.approx(numbers[short]["loss"], rel=1e-6)
            assert record[f"accuracy/{short}"] == numbers[short]["accuracy"]
        assert record["val_kl/sort"] == pytest.approx(numbers["sort"].get("kl_to_reference", 0.0), abs=1e-7)
    assert log[0]["val_kl/sort"] == 0.0 and "kl_to_reference" not in reference["sort"]


def test_evaluate_splits_an_experiments_time_into_sampling_training_and_evaluation(tiny_checkpoint, toy_data,
                                                                                      tmp_path):
    started = time.time()
    run_dir, corpus_path = tmp_path / "ft", tmp_path / "corpora" / "replay.pt"
    run_script("sample_replay", init_from=tiny_checkpoint, out=str(corpus_path), num_samples=40,
               prompts=toy_data["sort"], device="cpu")
    run_script("finetune", init_from=tiny_checkpoint, dataset=toy_data["add"], out_dir=str(run_dir), replay="kl",
               replay_source=str(corpus_path), **FT)  # 40 sequences are too few: it samples more mid-run
    out_json = str(tmp_path / "eval.json")
    run_script("evaluate", checkpoints=f"ft={run_dir / 'ckpt.pt'}", reference_checkpoint=tiny_checkpoint,
               datasets=toy_data["add"], eval_sequences=32, out_json=out_json, device="cpu", started_at=started,
               time_runs=f"{run_dir},{corpus_path}")
    report = json.load(open(out_json))
    split, log = report["time_split"], read_jsonl(run_dir / "log.jsonl")[-1]
    corpus = torch.load(corpus_path, weights_only=True)["meta"]["seconds"]
    assert split["training"] == pytest.approx(log["train_seconds"], abs=0.1) and log["train_seconds"] > 0
    assert split["sampling"] == pytest.approx(corpus + log["replay_sample_seconds"], abs=0.1)
    assert log["replay_sample_seconds"] > 0 and log["eval_seconds"] > 0
    assert split["evaluation"] >= log["eval_seconds"] - 0.05  # the runs' evaluations, and evaluate.py's own
    assert split["other"] >= 0  # the parts fit inside the whole (start-up, loading: the rest)
    # pretraining logs the time of its training steps too
    pretrain_log = read_jsonl(os.path.join(os.path.dirname(tiny_checkpoint), "log.jsonl"))[-1]
    assert 0 < pretrain_log["train_seconds"] < pretrain_log["seconds"] and pretrain_log["eval_seconds"] > 0


# --- configuration and bad input ----------------------------------------------------------------

def test_overrides_parse_literals_and_refuse_unknown_keys():
    config = {"lr": 1e-3, "steps": 10, "name": "x", "flag": False}
    apply_overrides(config, ["--lr=3e-4", "--steps=20", "--name=out/run", "--flag=True"])
    assert config == {"lr": 3e-4, "steps": 20, "name": "out/run", "flag": True}
    with pytest.raises(UserError, match="unknown setting"):
        apply_overrides(config, ["--nope=1"])
    with pytest.raises(UserError, match="expects a int"):
        apply_overrides(config, ["--steps=abc"])


# --- LoRA baseline ------------------------------------------------------------------------------

def test_lora_starts_at_the_checkpoint_trains_only_adapters_and_merges_exactly(tiny_checkpoint):
    from finetune import add_lora, plain_state_dict
    from model import GPT
    model, _ = load_checkpoint(tiny_checkpoint)
    x = torch.randint(0, 19, (4, 14))
    with torch.no_grad():
        before = model(x)
    add_lora(model, rank=4, alpha=8.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6)          # B = 0: nothing changed yet
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_()                                          # pretend training moved B
        wrapped = model(x)
        plain = GPT(model.config)
        plain.load_state_dict(plain_state_dict(model))
        merged = plain(x)
    assert not torch.allclose(wrapped, before, atol=1e-3)
    assert torch.allclose(merged, wrapped, atol=1e-4)                # merging keeps the function
    assert set(plain.state_dict()) == set(load_checkpoint(tiny_checkpoint)[0].state_dict())


def test_lora_finetune_leaves_embeddings_untouched(tiny_checkpoint, toy_data, tmp_path):
    run_script("finetune", init_from=tiny_checkpoint, dataset=toy_data["add"], out_dir=str(tmp_path / "lora"),
               lora_rank=2, **FT)
    before, after = weights(tiny_checkpoint), weights(tmp_path / "lora" / "ckpt.pt")
    assert set(before) == set(after)
    assert torch.equal(before["embed.weight"], after["embed.weight"])
    assert torch.equal(before["unembed.weight"], after["unembed.weight"])
    assert not torch.equal(before["blocks.0.mlp.up.weight"], after["blocks.0.mlp.up.weight"])


def test_lora_with_embeddings_also_trains_the_embeddings_in_full(tiny_checkpoint, toy_data, tmp_path):
    run_script("finetune", init_from=tiny_checkpoint, dataset=toy_data["add"], out_dir=str(tmp_path / "lora"),
               lora_rank=2, lora_embeddings=True, **FT)
    before, after = weights(tiny_checkpoint), weights(tmp_path / "lora" / "ckpt.pt")
    assert not torch.equal(before["embed.weight"], after["embed.weight"])
    assert not torch.equal(before["unembed.weight"], after["unembed.weight"])


def test_the_cooldown_falls_linearly_to_zero_from_where_the_schedule_was():
    cosine = dict(total_steps=100, peak_lr=1.0, warmup_steps=10, schedule="cosine")
    at_40 = lr_at(40, **cosine)
    cooled = [lr_at(step, **cosine, target_reached_at=40, cooldown_steps=4) for step in range(38, 44)]
    assert cooled[:2] == [lr_at(38, **cosine), lr_at(39, **cosine)]  # untouched before it
    assert cooled[2:] == pytest.approx([at_40 * 4 / 5, at_40 * 3 / 5, at_40 * 2 / 5, at_40 * 1 / 5])


def test_pretraining_that_reaches_its_target_cools_down_then_stops(toy_data, tmp_path):
    run_script("pretrain", datasets=toy_data["sort"], out_dir=str(tmp_path / "pre"), max_steps=20, eval_interval=3,
               eval_sequences=16, batch_size=16, device="cpu", target_val_loss=100.0, cooldown_steps=4, **TINY_MODEL)
    assert [r["step"] for r in read_jsonl(tmp_path / "pre" / "log.jsonl")] == [0, 3, 6, 7]
    ckpt = torch.load(tmp_path / "pre" / "ckpt.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["step"] == 7


def test_a_reached_target_starts_a_cooldown_and_the_run_stops_after_it(tiny_checkpoint, toy_data, tmp_path):
    run_script("finetune", init_from=tiny_checkpoint, dataset=toy_data["add"], out_dir=str(tmp_path / "ft"),
               **{**FT, "max_steps": 20}, target_val_loss=100.0, cooldown_steps=4)  # reached at the first evaluation
    assert [r["step"] for r in read_jsonl(tmp_path / "ft" / "log.jsonl")] == [0, 3, 6, 7]
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["stop_reason"] == "target_val_loss" and ckpt["step"] == 7


def test_mixed_in_old_rows_add_up_to_the_fraction_even_below_one_row_a_step():
    from finetune import mix_rows
    per_step = 32 / 256                                   # 1/256 of a 32-row batch
    rows = [mix_rows(step, per_step) for step in range(256)]
    assert sum(rows) == 32 and set(rows) == {0, 1} and rows[:8] == [0] * 7 + [1]
    assert [mix_rows(step, 8.0) for step in range(5)] == [8] * 5     # a whole share: the same every step
    assert sum(mix_rows(step, 3.2) for step in range(10)) == 32       # 3, 3, 3, 3, 4, ...
