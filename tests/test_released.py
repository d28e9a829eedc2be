"""Released models: convert.py on a tiny GGUF and tiny Hugging Face folders that the tests write,
each checked against a float64 Llama forward written out here; the tokenizer on hand-checked ids;
every switch of the one GPT (gains, SwiGLU, GQA, tied embeddings, RoPE theta and Llama 3 scaling,
QK-norm) through KV-cache decoding and LoRA; the pipeline on a converted model; bad input."""
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, assert_two_processes_match_one, greedy_by_recomputing, run_script, script_in_process
from model import GPT, GPTConfig, KVCache
from support import tokenizer as bpe
from support.checkpoint import load_checkpoint

gguf = pytest.importorskip("gguf", reason="the converter tests need gguf (tests/requirements.txt installs it)")


# --- a tiny byte-level BPE: 3 control tokens, the 256 bytes, then 4 merges ---------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ALPHABET = bpe.byte_alphabet()
MERGES = ["a b", "Ġ ab", "c d", "ab cd"]
TOKENS = SPECIALS + [ALPHABET[b] for b in range(256)] + ["ab", "Ġab", "cd", "abcd"]
ID = {t: i for i, t in enumerate(TOKENS)}


def random_llama(vocab, width, depth, n_heads, n_kv, head_dim, mlp_width, tie, qk_norm, seed=0):
    """Weights in Hugging Face's layout (q/k rows in half-split RoPE order), float32 values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    gain = lambda n: 1 + 0.1 * torch.randn(n, generator=g)
    w = {"embed": r(vocab, width), "norm": gain(width), "layers": []}
    if not tie:
        w["head"] = r(vocab, width)
    for _ in range(depth):
        layer = {"attn_norm": gain(width), "q": r(n_heads * head_dim, width), "k": r(n_kv * head_dim, width),
                 "v": r(n_kv * head_dim, width), "o": r(width, n_heads * head_dim), "mlp_norm": gain(width),
                 "gate": r(mlp_width, width), "up": r(mlp_width, width), "down": r(width, mlp_width)}
        if qk_norm:
            layer.update(q_norm=gain(head_dim), k_norm=gain(head_dim))
        w["layers"].append(layer)
    return w


def reference_logits(w, ids, n_heads, n_kv, head_dim, eps, theta, scaling=None):
    """A Llama forward written out in float64, one operation per line, for one sequence."""
    d = lambda t: t.double()
    inv_freq = [1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
    if scaling:  # Llama 3: slow the long wavelengths, keep the short ones, blend in between
        ctx, low, high = scaling["original_max_position_embeddings"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        scaled = []
        for f in inv_freq:
            wavelength = 2 * math.pi / f
            if wavelength < ctx / high:
                scaled.append(f)
            elif wavelength > ctx / low:
                scaled.append(f / scaling["factor"])
            else:
                s = (ctx / wavelength - low) / (high - low)
                scaled.append((1 - s) * f / scaling["factor"] + s * f)
        inv_freq = scaled
    T = len(ids)
    angles = torch.tensor([[t * f for f in inv_freq] for t in range(T)], dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()

    def rope(x):  # (heads, T, head_dim): rotate (first half, second half) pairs
        a, b = x[..., :head_dim // 2], x[..., head_dim // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    def norm(x, gain):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * d(gain)

    x = d(w["embed"])[torch.tensor(ids)]
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    for layer in w["layers"]:
        h = norm(x, layer["attn_norm"])
        q = (h @ d(layer["q"]).T).view(T, n_heads, head_dim).transpose(0, 1)
        k = (h @ d(layer["k"]).T).view(T, n_kv, head_dim).transpose(0, 1)
        v = (h @ d(layer["v"]).T).view(T, n_kv, head_dim).transpose(0, 1)
        if "q_norm" in layer:
            q, k = norm(q, layer["q_norm"]), norm(k, layer["k_norm"])
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(n_heads // n_kv, 0), v.repeat_interleave(n_heads // n_kv, 0)
        scores = (q @ k.transpose(1, 2) / math.sqrt(head_dim)).masked_fill(causal, float("-inf"))
        attended = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(T, n_heads * head_dim)
        x = x + attended @ d(layer["o"]).T
        h = norm(x, layer["mlp_norm"])
        x = x + (torch.nn.functional.silu(h @ d(layer["gate"]).T) * (h @ d(layer["up"]).T)) @ d(layer["down"]).T
    return norm(x, w["norm"]) @ d(w.get("head", w["embed"])).T


def ours_logits(ckpt_path, ids):
    model, _ = load_checkpoint(ckpt_path)
    with torch.no_grad():
        return model.double()(torch.tensor([ids]))[0]


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's converter does to q/k rows (half-split -> interleaved pairs), written out."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


# --- GGUF -------------------------------------------------------------------------------------

GGUF_DIMS = dict(width=64, depth=2, n_heads=4, n_kv=2, head_dim=16, mlp_width=96)


def write_gguf(path, w, arch="llama", embed_type="Q8_0", pre="smollm", extra_tensor=None, chat_template=None,
               context_length=64, dims=None):
    """A tiny Llama in llama.cpp's layout: permuted q/k rows, reversed shapes (done by the writer),
    the token embedding quantised; the tokenizer above (and a chat template, if given). Returns the
    weights as the file holds them. dims: other metadata than GGUF_DIMS (the tensors stay as w)."""
    dims = dims or GGUF_DIMS
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(dims["depth"])
    writer.add_context_length(context_length)
    writer.add_embedding_length(dims["width"])
    writer.add_feed_forward_length(dims["mlp_width"])
    writer.add_head_count(dims["n_heads"])
    writer.add_head_count_kv(dims["n_kv"])
    writer.add_rope_freq_base(50_000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template:
        writer.add_chat_template(chat_template)
    quantized = gguf.GGMLQuantizationType[embed_type]
    stored = gguf.quants.dequantize(gguf.quants.quantize(w["embed"].numpy(), quantized), quantized)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(w["embed"].numpy(), quantized), raw_dtype=quantized)
    writer.add_tensor("output_norm.weight", w["norm"].numpy())
    for i, layer in enumerate(w["layers"]):
        names = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_v": "v", "attn_output": "o",
                 "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}
        for theirs, ours in names.items():
            writer.add_tensor(f"blk.{i}.{theirs}.weight", layer[ours].numpy())
        writer.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(layer["q"].numpy(), GGUF_DIMS["n_heads"]))
        writer.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(layer["k"].numpy(), GGUF_DIMS["n_kv"]))
    if extra_tensor:
        writer.add_tensor(*extra_tensor[:2], raw_dtype=extra_tensor[2])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {**w, "embed": torch.from_numpy(np.array(stored))}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A converted tiny GGUF: (folder, the weights it holds)."""
    root = tmp_path_factory.mktemp("gguf")
    w = random_llama(len(TOKENS), **{k: v for k, v in GGUF_DIMS.items()}, tie=True, qk_norm=False)
    stored = write_gguf(str(root / "tiny.gguf"), w)
    run_script("experiments.convert", source=str(root / "tiny.gguf"), out_dir=str(root / "model"))
    return root, stored


def test_converted_gguf_matches_a_float64_llama_forward(tiny_gguf):
    root, w = tiny_gguf
    ids = [1] + [int(i) for i in torch.randint(3, len(TOKENS), (30,), generator=torch.Generator().manual_seed(1))]
    ours = ours_logits(str(root / "model" / "ckpt.pt"), ids)
    reference = reference_logits(w, ids, GGUF_DIMS["n_heads"], GGUF_DIMS["n_kv"], GGUF_DIMS["head_dim"], 1e-5, 50_000.0)
    assert (ours - reference).abs().max().item() < 1e-5   # RoPE angles are float32 in our model, as in HF's


def test_converted_checkpoint_is_plain_data_with_config_and_tokenizer(tiny_gguf):
    root, _ = tiny_gguf
    ckpt = torch.load(root / "model" / "ckpt.pt", weights_only=True)
    c = ckpt["model_config"]
    assert (c["n_heads"], c["n_kv_heads"], c["mlp"], c["norm_gain"], c["qk_norm"], c["tie_embeddings"]) == \
        (4, 2, "swiglu", True, False, True)
    assert c["rope_theta"] == 50_000.0 and c["norm_eps"] == pytest.approx(1e-5)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())
    assert ckpt["tokenizer"]["bos"] == 1
    assert ckpt["tokenizer"]["tokenizer"] == bpe.fingerprint(root / "model" / "tokenizer.json")


def test_released_tokenizer_gives_hand_checked_ids(tiny_gguf):
    root, _ = tiny_gguf
    enc = bpe.load(str(root / "model" / "tokenizer.json"))
    # "ab" merges once; " abcd" -> Ġab + cd (no merge makes "Ġab cd"); each digit is its own chunk,
    # and the whitespace run before a digit ends there (SmolLM2's pre-tokenizer)
    assert enc.encode_ordinary("ab abcd 12  3") == [ID["ab"], ID["Ġab"], ID["cd"], ID["Ġ"], ID["1"], ID["2"],
                                                    ID["Ġ"], ID["Ġ"], ID["3"]]
    assert enc.encode_ordinary("abcd") == [ID["abcd"]]
    assert enc.encode("<|im_start|>ab", allowed_special="all") == [1, ID["ab"]]
    assert enc.encode_ordinary("<|im_end|>") != [2]   # special-token text in data stays text
    text = "héllo wörld 1 2  3\n\t東京 🚀"
    assert enc.decode(enc.encode_ordinary(text)) == text


# --- Hugging Face folders ---------------------------------------------------------------------

def write_safetensors(path, tensors, bf16=()):
    """The safetensors layout: 8-byte header length, JSON header, raw little-endian data."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.to(torch.bfloat16) if name in bf16 else t.float()
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if name in bf16 else t.numpy().tobytes()
        header[name] = {"dtype": "BF16" if name in bf16 else "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_hf_folder(folder, w, config, pre_tokenizer, normalizer=None):
    os.makedirs(folder)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    vocab = {t: i for i, t in enumerate(TOKENS) if i >= len(SPECIALS)}
    json.dump({"model": {"type": "BPE", "vocab": vocab, "merges": [m.split(" ") for m in MERGES]},
               "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(SPECIALS)],
               "pre_tokenizer": pre_tokenizer, "normalizer": normalizer},
              open(os.path.join(folder, "tokenizer.json"), "w"))
    tensors = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"]}
    if "head" in w:
        tensors["lm_head.weight"] = w["head"]
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "q": "self_attn.q_proj",
             "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj", "q_norm": "self_attn.q_norm",
             "k_norm": "self_attn.k_norm", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for i, layer in enumerate(w["layers"]):
        tensors.update({f"model.layers.{i}.{names[k]}.weight": v for k, v in layer.items()})
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors, bf16={"model.layers.0.mlp.up_proj.weight"})
    w["layers"][0]["up"] = w["layers"][0]["up"].to(torch.bfloat16).float()   # what the file now holds


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
SPLIT_THEN_BYTELEVEL = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": bpe.LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_converted_hf_folder_matches_a_float64_forward(arch, tmp_path):
    if arch == "llama3":  # untied, GQA, Llama 3's RoPE scaling, Split + ByteLevel pre-tokenizer
        dims = dict(width=48, depth=2, n_heads=6, n_kv=2, head_dim=8, mlp_width=80)
        w = random_llama(len(TOKENS), **dims, tie=False, qk_norm=False, seed=2)
        config = {"architectures": ["LlamaForCausalLM"], "rope_theta": 500_000.0, "rope_scaling": LLAMA3_SCALING,
                  "tie_word_embeddings": False}
        pre, normalizer, scaling, theta = SPLIT_THEN_BYTELEVEL, None, LLAMA3_SCALING, 500_000.0
    else:  # Qwen3: QK-norm with gains, n_heads * head_dim != width, tied, NFC normaliser
        dims = dict(width=48, depth=2, n_heads=4, n_kv=2, head_dim=16, mlp_width=80)
        w = random_llama(len(TOKENS), **dims, tie=True, qk_norm=True, seed=3)
        config = {"architectures": ["Qwen3ForCausalLM"], "rope_theta": 1_000_000.0, "tie_word_embeddings": True,
                  "head_dim": dims["head_dim"]}
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
        normalizer, scaling, theta = {"type": "NFC"}, None, 1_000_000.0
    config.update(vocab_size=len(TOKENS), max_position_embeddings=64, hidden_size=dims["width"],
                  num_hidden_layers=dims["depth"], num_attention_heads=dims["n_heads"],
                  num_key_value_heads=dims["n_kv"], intermediate_size=dims["mlp_width"], rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2)
    write_hf_folder(str(tmp_path / "hf"), w, config, pre, normalizer)
    run_script("experiments.convert", source=str(tmp_path / "hf"), out_dir=str(tmp_path / "model"))
    ids = [1] + list(range(40, 80))   # 41 positions: past the 16 of the original context, where scaling acts
    reference = reference_logits(w, ids, dims["n_heads"], dims["n_kv"], dims["head_dim"], 1e-6, theta, scaling)
    assert (ours_logits(str(tmp_path / "model" / "ckpt.pt"), ids) - reference).abs().max().item() < 1e-5
    saved = json.load(open(tmp_path / "model" / "tokenizer.json"))
    assert saved["pattern"] == (bpe.LLAMA3_PATTERN if arch == "llama3" else bpe.GPT2_PATTERN)
    assert saved["normalize"] == (None if arch == "llama3" else "NFC")


# --- the switches through decoding and LoRA ---------------------------------------------------

LLAMA_LIKE = dict(vocab_size=50, block_size=32, width=48, depth=2, head_dim=8, n_heads=6, n_kv_heads=2,
                  mlp="swiglu", mlp_width=80, norm_gain=True, norm_eps=1e-5, qk_norm=True, rope_theta=1e5,
                  rope_scaling={"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8}, tie_embeddings=True)


def test_kv_cache_decoding_with_every_switch_on_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA_LIKE)).eval()
    x = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, 3, "cpu", torch.float32, max_length=20)
        assert cache.k[0].shape == (3, 2, 20, 8)      # sized for the key/value heads and the length needed
        model(x[:, :5], cache)
        cache.fix_shapes()
        for t in range(5, 20):
            assert (model.decode_step(x[:, t:t + 1], cache) - full[:, t]).abs().max().item() < 1e-5
            cache.position += 1
    assert torch.equal(model.generate(x[:, :2], 10, temperature=0), greedy_by_recomputing(model, x[:, :2], 10))


def test_tied_embeddings_are_one_tensor_and_lora_wraps_the_gate_too():
    from finetune import add_lora, plain_state_dict
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA_LIKE))
    assert model.unembed.weight is model.embed.weight
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = model(x)
    add_lora(model, rank=2, alpha=2.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.0.mlp.gate.A", "blocks.0.attn.qkv.B", "blocks.1.mlp.down.A"} <= trainable
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_()
        wrapped = model(x)
        plain = GPT(GPTConfig(**LLAMA_LIKE))
        plain.load_state_dict(plain_state_dict(model))
        assert torch.allclose(plain(x), wrapped, atol=1e-4) and not torch.allclose(wrapped, before, atol=1e-3)


def test_paper_checkpoints_keep_their_state_dict_layout():
    """A checkpoint saved before the switches existed has exactly these keys and a model_config
    without the new fields: it must load into today's GPT unchanged."""
    old_config = dict(vocab_size=19, block_size=14, width=32, depth=1, head_dim=8)
    model = GPT(GPTConfig(**old_config))
    assert set(model.state_dict()) == {"embed.weight", "unembed.weight", "blocks.0.attn.qkv.weight",
                                       "blocks.0.attn.out.weight", "blocks.0.mlp.up.weight", "blocks.0.mlp.down.weight"}
    assert model.blocks[0].attn.qkv.weight.shape == (96, 32) and model.blocks[0].mlp.up.weight.shape == (128, 32)


# --- the pipeline on a converted model ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_text(tiny_gguf, tmp_path_factory):
    """Two 'languages' tokenized by the converted model's tokenizer: windows start with its BOS."""
    root, _ = tiny_gguf
    rng = np.random.default_rng(0)
    words = lambda letters: [" ".join(rng.choice(["ab", "abcd", "cd", letters], 400)) for _ in range(2)]
    out = tmp_path_factory.mktemp("text") / "tiny"
    bpe.build_text_datasets(str(out), {lang: dict(zip(("train", "val"), words(extra)))
                                       for lang, extra in (("en", "ba"), ("es", "dc"))}, 0, "test",
                            tokenizer_path=str(root / "model" / "tokenizer.json"))
    return out


def test_replay_finetune_and_evaluate_run_on_a_converted_model(tiny_gguf, tiny_text, tmp_path):
    root, _ = tiny_gguf
    ckpt = str(root / "model" / "ckpt.pt")
    assert json.load(open(tiny_text / "en" / "meta.json"))["dataset_token"] == 1
    corpus = str(tmp_path / "replay.pt")
    run_script("sample_replay", init_from=ckpt, prompts="bos", num_samples=8, batch_size=4, length=16, out=corpus,
               device="cpu")
    tokens = torch.load(corpus, weights_only=True)["tokens"]
    assert tokens.shape == (8, 16) and (tokens[:, 0] == 1).all()
    ft = dict(init_from=ckpt, dataset=str(tiny_text / "es"), eval_datasets=f"{tiny_text / 'en'},corpus:{corpus}",
              block_size=16, batch_size=4, max_steps=2, eval_interval=1, eval_sequences=4, eval_kl=True, device="cpu")
    run_script("finetune", out_dir=str(tmp_path / "kl"), replay="kl", replay_source=corpus, replay_batch_size=4, **ft)
    run_script("finetune", out_dir=str(tmp_path / "lora"), lora_rank=2, dtype="bfloat16", **ft)
    log = [json.loads(l) for l in open(tmp_path / "kl" / "log.jsonl")]
    assert log[0]["val_kl/en"] == pytest.approx(0, abs=1e-6) and log[-1]["val_kl/replay"] > 0
    finetuned = torch.load(tmp_path / "kl" / "ckpt.pt", weights_only=True)
    assert finetuned["tokenizer"] == torch.load(ckpt, weights_only=True)["tokenizer"]   # still knows its tokenizer
    run_script("evaluate", checkpoints=f"kl={tmp_path / 'kl' / 'ckpt.pt'},lora={tmp_path / 'lora' / 'ckpt.pt'}",
               reference_checkpoint=ckpt, datasets=f"{tiny_text / 'en'},corpus:{corpus}", block_size=16, eval_sequences=4,
               out_json=str(tmp_path / "eval.json"), device="cpu")
    metrics = json.load(open(tmp_path / "eval.json"))["metrics"]
    assert metrics["kl"]["replay"]["kl_to_reference"] > 0 and "en" in metrics["lora"]


def test_torchrun_two_processes_match_one_on_a_converted_model(tiny_gguf, tiny_text, tmp_path):
    root, _ = tiny_gguf
    assert_two_processes_match_one(["finetune.py", f"--init_from={root / 'model' / 'ckpt.pt'}",
                                    f"--dataset={tiny_text / 'es'}", "--replay=kl", f"--replay_source=data:{tiny_text / 'en'}",
                                    "--block_size=16", "--batch_size=8", "--max_steps=3", "--eval_interval=1",
                                    "--eval_sequences=4", "--device=cpu"], tmp_path)


# --- bad input: one line, exit code 2, nothing written -------------------------------------------

def script(*argv):
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)


def test_bad_released_inputs_stop_with_one_line_and_write_nothing(tiny_gguf, tiny_text, toy_data, tmp_path):
    root, _ = tiny_gguf
    w = random_llama(len(TOKENS), **GGUF_DIMS, tie=True, qk_norm=False)
    write_gguf(str(tmp_path / "gemma.gguf"), w, arch="gemma3")
    q2k = gguf.GGMLQuantizationType.Q2_K   # a real quantisation the converter does not read
    write_gguf(str(tmp_path / "q2k.gguf"), w, extra_tensor=("blk.0.extra.weight", np.zeros((1, 84), np.uint8), q2k))
    whole = (root / "tiny.gguf").read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(whole[:len(whole) // 2])
    write_gguf(str(tmp_path / "unknown_pre.gguf"), w, pre="some-new-model")
    write_gguf(str(tmp_path / "huge_context.gguf"), w, context_length=2 ** 32 - 1)
    write_gguf(str(tmp_path / "odd_tensor.gguf"), w, extra_tensor=("blk.0.attn_weird.weight", np.zeros((4, 4), np.float32),
                                                                   gguf.GGMLQuantizationType.F32))
    hf_config = {"architectures": ["LlamaForCausalLM"], "vocab_size": len(TOKENS), "max_position_embeddings": 64,
                 "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 96, "rms_norm_eps": 1e-5}
    write_hf_folder(str(tmp_path / "hf"), random_llama(len(TOKENS), **GGUF_DIMS, tie=False, qk_norm=False), hf_config,
                    SPLIT_THEN_BYTELEVEL)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    for name, change in (("hf_more_layers", {"num_hidden_layers": 3}), ("hf_not_json", None)):
        write_hf_folder(str(tmp_path / name), random_llama(len(TOKENS), **GGUF_DIMS, tie=False, qk_norm=False),
                        {**hf_config, **(change or {})}, SPLIT_THEN_BYTELEVEL)
        if change is None:
            (tmp_path / name / "config.json").write_text("{not json")
    write_gguf(str(tmp_path / "no_kv_heads.gguf"), w, dims={**GGUF_DIMS, "n_kv": 0})
    write_gguf(str(tmp_path / "odd_kv_heads.gguf"), w, dims={**GGUF_DIMS, "n_kv": 3})   # 4 query heads in 3 groups
    write_gguf(str(tmp_path / "more_blocks.gguf"), w, dims={**GGUF_DIMS, "depth": GGUF_DIMS["depth"] + 1})
    write_hf_folder(str(tmp_path / "hf_huge_shape"), random_llama(len(TOKENS), **GGUF_DIMS, tie=False, qk_norm=False),
                    hf_config, SPLIT_THEN_BYTELEVEL)
    shards = tmp_path / "hf_huge_shape" / "model.safetensors"   # a header that claims a tensor of 10^12 rows
    raw = shards.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["shape"] = [10 ** 12, 64]
    text = json.dumps(header).encode()
    shards.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    toy_corpus = str(tmp_path / "toy_corpus.pt")   # the right vocabulary size, another tokenizer
    toy_tokenizer = json.load(open(os.path.join(toy_data["add"], "meta.json")))["tokenizer"]
    torch.save({"tokens": torch.ones(4, 16, dtype=torch.int32), "meta": {"vocab_size": len(TOKENS),
                                                                       "tokenizer": toy_tokenizer}}, toy_corpus)
    converted = root / "model" / "ckpt.pt"
    cases = [
        (["experiments/convert.py", f"--source={tmp_path / 'gemma.gguf'}"], "architecture 'gemma3' is not supported"),
        (["experiments/convert.py", f"--source={tmp_path / 'q2k.gguf'}"], "Q2_K, which is not supported"),
        (["experiments/convert.py", f"--source={tmp_path / 'truncated.gguf'}"], "not a readable GGUF file"),
        (["experiments/convert.py", f"--source={tmp_path / 'unknown_pre.gguf'}"], "pre-tokenizer 'some-new-model'"),
        (["experiments/convert.py", f"--source={tmp_path / 'huge_context.gguf'}"], "declares a context of 4,294,967,295"),
        (["experiments/convert.py", f"--source={tmp_path / 'odd_tensor.gguf'}"], "do not describe a Llama-family model"),
        (["experiments/convert.py", f"--source={tmp_path / 'hf_more_layers'}"], "do not describe a Llama-family model"),
        (["experiments/convert.py", f"--source={tmp_path / 'hf_not_json'}"], "do not describe a Llama-family model"),
        (["experiments/convert.py", f"--source={tmp_path / 'no_kv_heads.gguf'}"], "do not describe a Llama-family model"),
        (["experiments/convert.py", f"--source={tmp_path / 'odd_kv_heads.gguf'}"], "do not describe a Llama-family model"),
        (["experiments/convert.py", f"--source={tmp_path / 'more_blocks.gguf'}"], "do not describe a Llama-family model"),
        (["experiments/convert.py", f"--source={tmp_path / 'hf_huge_shape'}"], "do not describe a Llama-family model"),
        (["experiments/convert.py", f"--source={tmp_path / 'missing.gguf'}"], "not found"),
        (["experiments/convert.py", f"--source={tmp_path}"], "lacks config.json"),
        (["experiments/convert.py", f"--source={tmp_path / 'hf'}"], "is truncated"),
        (["finetune.py", f"--init_from={converted}", f"--dataset={toy_data['add']}", "--device=cpu"], "tokenized by"),
        (["evaluate.py", f"--checkpoints=a={converted}", f"--reference_checkpoint={converted}", f"--datasets={toy_data['add']}",
          "--device=cpu"], "tokenized by"),
        (["finetune.py", f"--init_from={converted}", f"--dataset={tiny_text / 'es'}", "--replay=kl",
          f"--replay_source={toy_corpus}", "--block_size=16", "--device=cpu"], "tokenized by"),
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        target = f"--out_json={out}/e.json" if argv[0] == "evaluate.py" else f"--out_dir={out}"
        result = script_in_process(*argv, target)   # (the script as python runs it, in this process)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len([l for l in lines if l.startswith("error:")]) == 1, result.stderr[-2000:]
        assert message in lines[-1], (argv, lines[-1])
        assert not out.exists(), argv


def test_download_offline_fails_with_one_clear_line(tmp_path):
    result = script("experiments/download_hf.py", "--base_url=http://127.0.0.1:9", f"--out_dir={tmp_path / 'hf'}")
    assert result.returncode == 2 and "needs internet" in result.stderr.strip().splitlines()[-1]
    assert not [f for f in os.listdir(tmp_path / "hf")]   # nothing half-written


def test_convert_never_writes_over_a_checkpoint_or_into_its_source_and_replaces_both_files_together(tiny_gguf,
                                                                                                  tmp_path):
    root, _ = tiny_gguf
    gguf_file = root / "tiny.gguf"
    shutil.copytree(root / "model", tmp_path / "model")
    (tmp_path / "model" / "log.jsonl").write_text('{"step": 0}\n')   # as if a run lived there
    os.symlink(root, tmp_path / "source_link")
    before = {p: p.read_bytes() for p in sorted((tmp_path / "model").iterdir())}
    for out_dir, words in ((tmp_path / "model", "already holds a checkpoint or run (ckpt.pt, log.jsonl)"),
                           (root, "is the folder of the model converted"),
                           ("/proc/nanoreplay/model", "not a writable folder"),   # refused before converting
                           (tmp_path / "source_link", "is the folder of the model converted")):
        result = script("experiments/convert.py", f"--source={gguf_file}", f"--out_dir={out_dir}")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr[-1500:]
    assert {p: p.read_bytes() for p in sorted((tmp_path / "model").iterdir())} == before
    assert sorted(os.listdir(root)) == ["model", "tiny.gguf"]
    replaced = script("experiments/convert.py", f"--source={gguf_file}", f"--out_dir={tmp_path / 'model'}", "--overwrite=True")
    assert replaced.returncode == 0, replaced.stderr[-1500:]
    assert sorted(os.listdir(tmp_path / "model")) == ["ckpt.pt", "tokenizer.json"]   # the old run's log went too
    # killed between its two renames: the new weights beside the old tokenizer. No script uses the pair
    old_tokenizer = (tmp_path / "model" / "tokenizer.json").read_bytes()
    shutil.copy(gguf_file, tmp_path / "other.gguf")   # another model's tokenizer (its name differs)
    assert script("experiments/convert.py", f"--source={tmp_path / 'other.gguf'}", f"--out_dir={tmp_path / 'model'}",
                  "--overwrite=True").returncode == 0
    (tmp_path / "model" / "tokenizer.json").write_bytes(old_tokenizer)
    for argv in (["sample_replay.py", "--num_samples=2", "--device=cpu", f"--out={tmp_path / 'corpus.pt'}"],
                 ["experiments/export.py", f"--out_dir={tmp_path / 'export'}"]):
        setting = "--checkpoint" if argv[0] == "experiments/export.py" else "--init_from"
        result = script(*argv, f"{setting}={tmp_path / 'model' / 'ckpt.pt'}")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "run convert.py again" in lines[0], result.stderr[-1500:]
    assert not (tmp_path / "corpus.pt").exists() and not (tmp_path / "export").exists()
