"""Your model, your data, and back out: the two chat formats against transformers'
apply_chat_template, data/text/prepare.py on files the tests write, the answers-only loss against
float64, export.py read back by transformers (logits) and by convert.py (weights, bit for bit), the
README's recipe run command by command on a tiny converted model, and bad input."""
import json
import os
import re

import numpy as np
import pytest
import torch
import transformers

from conftest import REPO, run_command, run_script, script_in_process
from objective import Objective, ntp_loss
from support import tokenizer as bpe
from support.dataset import Dataset
from test_capabilities import SMOLLM2_TEMPLATE, chat_model, mmlu_lines, one_line_exit_2, script  # noqa: F401
from test_released import MERGES, TOKENS

# Llama 3 Instruct's chat template (its tokenizer_config.json): the header format read here
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "ab cd?"}, {"role": "assistant", "content": "abcd ab."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  padded  question \n"},
     {"role": "assistant", "content": "cd\n\nab cd"}, {"role": "user", "content": "and?"},
     {"role": "assistant", "content": "d c b a"}],
]


def tokenizer_file(folder, kind):
    """Our tokenizer file for a tiny byte-level BPE with ChatML's or Llama 3's special tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if kind == "chatml" else LLAMA3_SPECIALS
    tokens = specials + TOKENS[3:]
    bos, eos = (1, 2) if kind == "chatml" else (0, 4)
    path = os.path.join(folder, f"{kind}.json")
    bpe.released_tokenizer(path, kind, tokens, set(range(len(specials))), MERGES,
                           bpe.DIGITS_THEN_GPT2 if kind == "chatml" else bpe.LLAMA3_PATTERN, bos, eos,
                           chat_template=SMOLLM2_TEMPLATE if kind == "chatml" else LLAMA3_TEMPLATE)
    return path


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_chat_formats_render_as_transformers_apply_chat_template_and_mark_the_answers(kind, tmp_path):
    from experiments.export import write_hf_tokenizer
    encoding, _, tok = bpe.released_encoding(tokenizer_file(str(tmp_path), kind))
    write_hf_tokenizer(str(tmp_path / "hf"), tok, 64)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    end = "<|im_end|>" if kind == "chatml" else "<|eot_id|>"
    for messages in CONVERSATIONS:
        for generation in (True, False):
            text = bpe.render_chat(messages, tok, add_generation_prompt=generation)
            assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        ids, mask = bpe.encode_chat(messages, tok, encoding)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]   # the same text, the same ids
        answers = "".join((m["content"] if kind == "chatml" else m["content"].strip()) + end
                          for m in messages if m["role"] == "assistant")
        assert encoding.decode([i for i, keep in zip(ids, mask) if keep]) == answers


def test_an_unknown_chat_template_is_refused():
    for template in ("{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]", None,
                     "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023"):
        with pytest.raises(ValueError):
            bpe.chat_format(template)


# --- data/text/prepare.py ----------------------------------------------------------------------

def words(rng, n):
    return " ".join(rng.choice(["ab", "cd", "abcd", "a", "b", "c d"], n))


def test_text_prepare_splits_by_document_drops_duplicates_and_ends_each_with_eos(chat_model, tmp_path):
    rng = np.random.default_rng(0)
    docs = [words(rng, 30 + 5 * i) for i in range(12)]
    (tmp_path / "src" / "more").mkdir(parents=True)
    for i, doc in enumerate(docs[:6]):
        (tmp_path / "src" / f"{i}.txt").write_text(doc)
    (tmp_path / "src" / "copy.txt").write_text("  " + docs[0].replace(" ", "\n") + "\n")  # same up to whitespace
    (tmp_path / "src" / "more" / "rest.jsonl").write_text("".join(json.dumps({"body": d}) + "\n\n" for d in docs[6:]))
    out = tmp_path / "prepared"
    run_script("data.text.prepare", source=str(tmp_path / "src"), out_dir=str(out), field="body", val_fraction=0.25,
               tokenizer=str(chat_model / "tokenizer.json"))
    meta = json.load(open(out / "meta.json"))
    assert meta["duplicates_dropped"] == 1 and meta["format"] == "text" and not meta["loss_mask"]
    assert meta["documents"]["train"]["documents"] == 9 and meta["documents"]["val"]["documents"] == 3
    encoding = bpe.load(str(chat_model / "tokenizer.json"))
    data = Dataset(str(out))
    sides = {}
    for split, tokens in data.splits.items():
        assert tokens[-1] == 2 and (tokens == 2).sum() == meta["documents"][split]["documents"]  # EOS ends each
        sides[split] = set(encoding.decode(tokens.tolist()).split("<|im_end|>")[:-1])
    assert sides["train"] | sides["val"] == set(docs) and not sides["train"] & sides["val"]  # one side only
    first_side = "train" if docs[0] in sides["train"] else "val"   # where the copy's original went
    assert [meta["documents"][s]["duplicates_dropped"] for s in ("train", "val")] == \
        [int(first_side == "train"), int(first_side == "val")]
    glob_out = tmp_path / "glob"
    run_script("data.text.prepare", source=str(tmp_path / "src" / "*.txt"), out_dir=str(glob_out),
               tokenizer=str(chat_model / "tokenizer.json"))
    assert json.load(open(glob_out / "meta.json"))["duplicates_dropped"] == 1


def test_chat_prepare_stores_a_mask_of_the_answers(chat_model, tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i} ab?"},
                                      {"role": "assistant", "content": f"cd {i}"}]}) for i in range(10)]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    run_script("data.text.prepare", source=str(tmp_path / "chats.jsonl"), out_dir=str(tmp_path / "chat"),
               tokenizer=str(chat_model / "tokenizer.json"))
    data = Dataset(str(tmp_path / "chat"))
    encoding = bpe.load(str(chat_model / "tokenizer.json"))
    for split, tokens in data.splits.items():
        answers = encoding.decode(tokens[data.masks[split] == 1].tolist())
        assert re.fullmatch(r"(cd \d<\|im_end\|>)+", answers)
    x, mask = data.sample("train", 4, 16, np.random.default_rng(0), with_mask=True)
    assert x.shape == mask.shape == (4, 16)


# --- training on the answers only ----------------------------------------------------------------

def test_answers_only_loss_is_the_mean_over_answer_tokens_in_float64_and_leaves_replay_alone():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.uint8)
    mask[0, 3:6], mask[2, 1:] = 1, 1          # row 1 has no answer token
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T - 1):
            if mask[b, t + 1]:
                total -= torch.log_softmax(logits[b, t].double(), -1)[tokens[b, t + 1]].item()
                count += 1
    assert ntp_loss(logits, tokens, mask).item() == pytest.approx(total / count, rel=1e-6)
    assert ntp_loss(logits, tokens, torch.zeros_like(mask)).item() == 0   # nothing to learn: no NaN

    class Table(torch.nn.Module):  # logits that depend on the tokens, to see what each term reads
        def forward(self, x):
            return logits[:len(x), :x.size(1)] + x[..., None].float()
    objective = Objective(Table(), Table(), replay="kl", replay_coeff=1.0)
    replay = torch.randint(0, V, (B, T))
    _, with_mask = objective(tokens, replay, mask)
    _, without = objective(tokens, replay)
    assert with_mask["loss_replay"] == without["loss_replay"]
    assert with_mask["loss_new"].item() == pytest.approx(ntp_loss(Table()(tokens), tokens, mask).item())
    assert with_mask["loss_new"] != without["loss_new"]


# --- the recipe of the README, on a tiny model -------------------------------------------------------

def readme_recipe():
    """The commands of the README's "Finetune your own model without forgetting" section."""
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## Finetune your own model without forgetting", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("python ")]


@pytest.fixture(scope="module")
def recipe(chat_model, tmp_path_factory):
    """Every command of the README's recipe, in order, with paths and sizes made tiny."""
    root = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(1)
    chats = [{"messages": [{"role": "user", "content": words(rng, 6) + "?"},
                           {"role": "assistant", "content": words(rng, 20)}]} for _ in range(40)]
    (root / "my_chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (root / "mmlu.jsonl").write_text(mmlu_lines(4))
    model = root / "model"
    tiny = {  # per script: the test's paths and sizes, after the README's own arguments
        "experiments/convert.py": f"--source={chat_model.parent / 'tiny.gguf'} --out_dir={model}",
        "data/text/prepare.py": f"--source={root / 'my_chats.jsonl'} --tokenizer={model / 'tokenizer.json'} "
                                f"--out_dir={root / 'mine'}",
        "data/mmlu/prepare.py": f"--tokenizer={model / 'tokenizer.json'} --out_dir={root / 'mmlu'} "
                                f"--source={root / 'mmlu.jsonl'} --subjects=anatomy,marketing --selection_items=1",
        "sample_replay.py": f"--init_from={model / 'ckpt.pt'} --num_samples=8 --batch_size=8 --length=32 --device=cpu",
        "finetune.py": f"--init_from={model / 'ckpt.pt'} --dataset={root / 'mine'} --block_size=32 --batch_size=4 "
                       f"--replay_batch_size=4 --max_steps=6 --eval_interval=3 --eval_sequences=8 --warmup_steps=1 "
                       f"--device=cpu --out_dir={root / 'finetuned'}",
        "evaluate.py": f"--checkpoints=mine={root / 'finetuned' / 'ckpt.pt'} --reference_checkpoint={model / 'ckpt.pt'} "
                       f"--block_size=32 --eval_sequences=8 --device=cpu --out_json={root / 'eval.json'} "
                       f"--out_md={root / 'eval.md'}",
        "experiments/export.py": f"--checkpoint={root / 'finetuned' / 'ckpt.pt'} --out_dir={root / 'export'}",
    }
    commands = readme_recipe()
    assert [c.split()[1] for c in commands] == ["experiments/convert.py", "data/text/prepare.py", "data/mmlu/prepare.py",
                                                 "sample_replay.py", "sample_replay.py", "finetune.py",
                                                 "evaluate.py", "experiments/export.py"]
    corpora = iter([root / "replay.pt", root / "replay_heldout.pt"])
    for command in commands:
        name = command.split()[1]
        extra = tiny[name]
        if name == "sample_replay.py":
            extra += f" --out={next(corpora)}"
        if name in ("finetune.py", "evaluate.py"):   # the corpora and datasets the test wrote, by the same names
            command = (command.replace("out/mine_replay.pt", str(root / "replay.pt"))
                       .replace("out/mine_replay_heldout.pt", str(root / "replay_heldout.pt"))
                       .replace("mmlu_smollm2/mmlu", str(root / "mmlu" / "mmlu"))
                       .replace("--datasets=mine,", f"--datasets={root / 'mine'},"))
        run_command(f"{command} {extra}")
    return root


def test_the_readme_recipe_runs_start_to_end_and_keeps_what_it_promises(recipe):
    log = [json.loads(line) for line in open(recipe / "finetuned" / "log.jsonl")]
    assert log[-1]["loss_replay"] > 0
    config = torch.load(recipe / "finetuned" / "ckpt.pt", weights_only=True)["config"]
    assert config["answers_only"] and config["replay"] == "kl"
    metrics = json.load(open(recipe / "eval.json"))["metrics"]["mine"]
    assert {"mine", "mmlu", "replay_heldout"} <= set(metrics)
    assert sorted(os.listdir(recipe / "export")) == ["hf", "model-f16.gguf", "model-f32.gguf"]


# --- back out: export.py ----------------------------------------------------------------------------

def our_logits(ckpt_path, ids):
    from support.checkpoint import load_checkpoint
    model, _ = load_checkpoint(str(ckpt_path))
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))[0]


def test_export_loads_in_transformers_with_our_logits_and_converts_back_bit_for_bit(recipe, tmp_path):
    finetuned = recipe / "finetuned" / "ckpt.pt"
    weights = torch.load(finetuned, weights_only=True)["model"]
    encoding = bpe.load(torch.load(finetuned, weights_only=True)["tokenizer"]["tokenizer_path"])
    text = "<|im_start|>user\nab cd?<|im_end|>\n" + " ".join(["abcd ab cd a b 12 c"] * 60)
    ids = encoding.encode(text, allowed_special="all")[:300]
    assert len(ids) == 300
    ours = our_logits(finetuned, ids)
    hf_dir = recipe / "export" / "hf"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf_model(torch.tensor([ids])).logits[0] - ours).abs().max() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert hf_tok(text, add_special_tokens=False)["input_ids"][:300] == ids
    assert hf_tok.apply_chat_template([{"role": "user", "content": "ab?"}], tokenize=False,
                                      add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    for kind in ("f32", "f16"):
        gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(recipe / "export"), gguf_file=f"model-{kind}.gguf", dtype=torch.float32).eval()
        run_script("experiments.convert", source=str(recipe / "export" / f"model-{kind}.gguf"), out_dir=str(tmp_path / kind))
        back = torch.load(tmp_path / kind / "ckpt.pt", weights_only=True)["model"]
        rounded = {k: v.half().float() if v.ndim > 1 and kind == "f16" else v for k, v in weights.items()}
        assert set(back) == set(rounded) and all(torch.equal(back[k], rounded[k]) for k in back), kind
        with torch.no_grad():
            theirs = gguf_model(torch.tensor([ids])).logits[0]
        assert (theirs - our_logits(tmp_path / kind / "ckpt.pt", ids)).abs().max() <= 1e-4, kind
        tokenizer = json.load(open(tmp_path / kind / "tokenizer.json"))   # the same, but for its name (the file's)
        source = json.load(open(torch.load(finetuned, weights_only=True)["tokenizer"]["tokenizer_path"]))
        assert {**tokenizer, "name": ""} == {**source, "name": ""}
    run_script("experiments.convert", source=str(hf_dir), out_dir=str(tmp_path / "hf"))
    back = torch.load(tmp_path / "hf" / "ckpt.pt", weights_only=True)["model"]
    assert set(back) == set(weights) and all(torch.equal(back[k], weights[k]) for k in back)


def test_our_safetensors_writer_and_reader_agree_with_the_safetensors_package(tmp_path):
    from safetensors.torch import load_file, save_file
    from experiments.convert import read_safetensors
    from experiments.export import write_safetensors
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randn(2, 2).bfloat16()}
    write_safetensors(str(tmp_path / "ours.safetensors"), tensors)
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    assert all(torch.equal(theirs[k], tensors[k]) for k in tensors)
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    read = read_safetensors(str(tmp_path / "theirs.safetensors"))
    assert all(np.array_equal(read[k], tensors[k].float().numpy()) for k in tensors)


# --- bad input: one line, exit code 2, nothing written ---------------------------------------------

def test_bad_data_and_export_input_stop_with_one_line_and_write_nothing(chat_model, recipe, tmp_path):
    tok = f"--tokenizer={chat_model / 'tokenizer.json'}"
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "nofield.jsonl").write_text('{"text": "ab"}\n{"body": "cd"}\n')
    chat = lambda *messages: json.dumps({"messages": [dict(role=r, content=c) for r, c in messages]}) + "\n"
    (tmp_path / "role.jsonl").write_text(chat(("user", "ab"), ("assistant", "cd")) + chat(("bot", "ab")))
    (tmp_path / "noanswer.jsonl").write_text(chat(("user", "ab"), ("assistant", "cd")) + chat(("user", "ab")))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ab cd".encode("latin-1"))
    other = tmp_path / "other_template"
    other.mkdir()
    data = json.load(open(chat_model / "tokenizer.json"))
    (other / "tokenizer.json").write_text(json.dumps({**data, "chat_template": "{{ bos_token }}[INST]"}))
    (tmp_path / "broken_tokenizer.json").write_text("{not json")
    (tmp_path / "no_bos_tokenizer.json").write_text(json.dumps({k: v for k, v in data.items() if k != "bos"}))
    (tmp_path / "ok.jsonl").write_text(chat(("user", "ab"), ("assistant", "cd")) + chat(("user", "c"),
                                                                                   ("assistant", "d")))
    out = tmp_path / "out"
    cases = [
        (["data/text/prepare.py", f"--source={tmp_path / 'empty.txt'}", tok], "is empty"),
        (["data/text/prepare.py", f"--source={tmp_path / 'nofield.jsonl'}", tok], "line 2 has no text field 'text'"),
        (["data/text/prepare.py", f"--source={tmp_path / 'role.jsonl'}", tok], "role 'bot' is not one of"),
        (["data/text/prepare.py", f"--source={tmp_path / 'noanswer.jsonl'}", tok], "has no assistant turn"),
        (["data/text/prepare.py", f"--source={tmp_path / 'latin1.txt'}", tok], "is not UTF-8"),
        (["data/text/prepare.py", f"--source={tmp_path / 'ok.jsonl'}", f"--tokenizer={other / 'tokenizer.json'}"],
         "not one of the two formats read here"),
        (["data/text/prepare.py", f"--source={tmp_path / 'nothing*.txt'}", tok], "names no file"),
        (["data/text/prepare.py", f"--source={tmp_path / 'ok.jsonl'}",
          f"--tokenizer={tmp_path / 'broken_tokenizer.json'}"], "is not JSON"),
        (["data/text/prepare.py", f"--source={tmp_path / 'ok.jsonl'}",
          f"--tokenizer={tmp_path / 'no_bos_tokenizer.json'}"], "with its bos, eos and pattern"),
        (["data/text/prepare.py", f"--source={tmp_path / 'ok.jsonl'}", tok, f"--out_dir={recipe / 'mine'}"],
         "already holds a dataset"),
    ]
    prepared = {p: p.read_bytes() for p in sorted((recipe / "mine").iterdir())}
    for argv, message in cases:
        result = script_in_process(*argv, *([] if any(a.startswith("--out_dir=") for a in argv) else [f"--out_dir={out}"]))
        one_line_exit_2(result, message)
        assert not out.exists(), argv
    assert {p: p.read_bytes() for p in sorted((recipe / "mine").iterdir())} == prepared
    existing = recipe / "export"
    before = {f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(existing) for f in fs}
    one_line_exit_2(script("experiments/export.py", f"--checkpoint={recipe / 'finetuned' / 'ckpt.pt'}", f"--out_dir={existing}"),
                    "already exists")
    assert before == {f: os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(existing) for f in fs}
    toy = tmp_path / "toy.pt"
    from model import GPT, GPTConfig
    torch.save({"model": GPT(GPTConfig(vocab_size=16, block_size=8, width=16, depth=1, head_dim=8)).state_dict(),
                "model_config": GPTConfig(vocab_size=16, block_size=8, width=16, depth=1, head_dim=8).to_dict()}, toy)
    one_line_exit_2(script("experiments/export.py", f"--checkpoint={toy}", f"--out_dir={out}"), "the paper's GPT")
    assert not out.exists()
