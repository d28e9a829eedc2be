"""
Stage 6 (optional): a finetuned checkpoint of a released model -> the files serving tools read.

    python experiments/export.py --checkpoint=out/finetune/ckpt.pt --out_dir=out/export

writes, into a new folder (never over an existing one):
- out_dir/hf/: config.json, model.safetensors (float32), tokenizer.json and tokenizer_config.json
  (with the model's chat template): transformers' from_pretrained(out_dir/hf) reads it, and so does
  convert.py.
- out_dir/model-f32.gguf and out_dir/model-f16.gguf: llama.cpp's format (F16: every matrix in
  float16, the norms' gains in float32, as llama.cpp's own converter does), with its row order of
  the query and key projections and the tokenizer's metadata.

A LoRA checkpoint is exported with its adapters folded into the weights (finetune.py saves it so).
Only Llama-family models convert back (convert.py's input: SmolLM2, Llama 3.2, Qwen3); the paper's
GPT has no counterpart in those formats. GGUF is written for Llama models without Llama 3's
frequency scaling (what convert.py reads back); Qwen3 and scaled-RoPE Llama 3 leave as hf only.

Weights are written with our own safetensors writer (8 bytes of header length, a JSON header,
the raw little-endian tensors: a dozen lines, so reading and writing a Hugging Face folder needs
no extra package); the tests read it back with the safetensors package itself. GGUF is written by
the gguf package (experiments/requirements-released.txt), which convert.py reads GGUF with too.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: model.py, support/

from experiments.convert import GGUF_NAMES, HF_BLOCK_NAMES, HF_TOP_NAMES, SAFETENSORS_DTYPES, permute_rope_rows
from support import tokenizer as bpe
from support.checkpoint import load_checkpoint
from support.config import UserError, run
from support.files import atomic_path, check_writable

checkpoint = "out/finetune/ckpt.pt"
out_dir = "out/export"
formats = "hf,gguf-f32,gguf-f16"   # any of: hf, gguf-f32, gguf-f16
FORMATS = ("hf", "gguf-f32", "gguf-f16")


def load(path):
    """(GPTConfig, {our name: float32 tensor}, tokenizer file data) of a released model's checkpoint;
    the tokenizer data also holds the GGUF tokenizer flags convert.py kept ("gguf")."""
    if not os.path.exists(path):
        raise UserError(f"--checkpoint={path} not found: pass a finetune.py or convert.py checkpoint")
    model, ckpt = load_checkpoint(path)   # finite weights that fit their config, beside their own tokenizer
    config, weights = model.config, ckpt["model"]
    if config.mlp != "swiglu" or not config.norm_gain:
        raise UserError(f"{path} is the paper's GPT, which no serving format describes: export reads "
                        "released models (convert.py, then finetune.py)")
    tokenizer_path = ckpt.get("tokenizer", {}).get("tokenizer_path", "")
    if not os.path.exists(tokenizer_path):
        raise UserError(f"{path} names its tokenizer {tokenizer_path or '(none)'}, which is not there: "
                        "run convert.py again to write it")
    _, _, tok = bpe.released_encoding(tokenizer_path)
    return config, {k: v.float() for k, v in weights.items()}, {**tok, "gguf": ckpt["tokenizer"].get("gguf", {})}


def split_qkv(weights, config):
    """Our fused attention projection -> the separate q, k, v matrices both formats store."""
    out = dict(weights)
    sizes = [config.n_heads * config.head_dim] + [config.n_kv_heads * config.head_dim] * 2
    for i in range(config.depth):
        p = f"blocks.{i}.attn"
        for name, w in zip("qkv", out.pop(f"{p}.qkv.weight").split(sizes)):
            out[f"{p}.{name}.weight"] = w
    if config.tie_embeddings:
        out.pop("unembed.weight", None)
    return out


# ----------------------------------------------------------------------------------------------
# Hugging Face folder

def write_safetensors(path, tensors):
    """{name: tensor} -> a .safetensors file: header length (8 bytes), JSON header, raw data."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        t = t.contiguous()
        dtype = next(k for k, v in SAFETENSORS_DTYPES.items() if v == t.dtype)
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)


def write_hf(folder, config, weights, tok):
    qwen3 = config.qk_norm
    hf = {"architectures": ["Qwen3ForCausalLM" if qwen3 else "LlamaForCausalLM"],
          "model_type": "qwen3" if qwen3 else "llama", "vocab_size": config.vocab_size,
          "hidden_size": config.width, "intermediate_size": config.mlp_width,
          "num_hidden_layers": config.depth, "num_attention_heads": config.n_heads,
          "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
          "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
          "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_embeddings,
          "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
          "bos_token_id": tok["bos"], "eos_token_id": tok["eos"]}
    if config.rope_scaling:
        hf["rope_scaling"] = {"rope_type": "llama3", **config.rope_scaling}
    ours_to_hf = {v: k for k, v in HF_TOP_NAMES.items()}
    ours_to_hf.update({f"{v}.weight": k for k, v in HF_BLOCK_NAMES.items()})
    tensors = {}
    for name, w in weights.items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            tensors[f"model.layers.{i}.{ours_to_hf[rest]}.weight"] = w
        else:
            tensors[ours_to_hf[name]] = w
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    write_hf_tokenizer(folder, tok, config.block_size)


def write_hf_tokenizer(folder, tok, max_length):
    """tokenizer.json (the same ids as ours) and tokenizer_config.json (special tokens, chat template)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(bpe.hf_tokenizer_json(tok), f, ensure_ascii=False)
    names = bpe.special_names(tok)
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                        "bos_token": names.get(tok["bos"]), "eos_token": names.get(tok["eos"]),
                        "clean_up_tokenization_spaces": False}
    if tok.get("chat_template"):
        tokenizer_config["chat_template"] = tok["chat_template"]
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# GGUF

def write_gguf(path, config, weights, tok, name, half):
    import gguf   # checked in main
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.width)
    writer.add_block_count(config.depth)
    writer.add_feed_forward_length(config.mlp_width)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    if config.n_heads * config.head_dim != config.width:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    tokens, types, merges = bpe.gguf_vocabulary(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(bpe.gguf_pre_name(tok["pattern"]))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok["bos"])
    writer.add_eos_token_id(tok["eos"])
    for key, value in tok["gguf"].items():  # add_bos_token and the like, as the source GGUF had them
        (writer.add_bool if isinstance(value, bool) else writer.add_uint32)(f"tokenizer.ggml.{key}", value)
    if tok.get("chat_template"):
        writer.add_chat_template(tok["chat_template"])
    ours_to_gguf = {f"{v}.weight": k for k, v in GGUF_NAMES.items()}
    for ours, w in weights.items():
        w = w.numpy()
        if ours.startswith("blocks."):
            _, i, rest = ours.split(".", 2)
            theirs = f"blk.{i}.{ours_to_gguf[rest]}.weight"
        else:
            theirs = f"{ours_to_gguf[ours]}.weight"
        if ours.endswith((".attn.q.weight", ".attn.k.weight")):  # llama.cpp's RoPE row order
            w = permute_rope_rows(w, config.n_heads if ours.endswith(".q.weight") else config.n_kv_heads)
        # llama.cpp keeps one-dimensional tensors (the norms' gains) in float32 in every file type
        writer.add_tensor(theirs, w.astype(np.float16) if half and w.ndim > 1 else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------------------------

def main():
    wanted = [f for f in formats.split(",") if f]
    if not wanted or set(wanted) - set(FORMATS):
        raise UserError(f"--formats={formats!r}: choose from {', '.join(FORMATS)}")
    if os.path.exists(out_dir):
        raise UserError(f"--out_dir={out_dir} already exists: export writes a new folder; choose another "
                        "--out_dir or remove that one")
    check_writable(out_dir)
    config, weights, tok = load(checkpoint)
    if any(f.startswith("gguf") for f in wanted):
        if config.qk_norm or config.rope_scaling:
            raise UserError(f"{checkpoint}: GGUF export covers Llama models without Llama 3's frequency "
                            "scaling (what convert.py reads back); pass --formats=hf")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise UserError("writing GGUF needs the gguf package: pip install -r experiments/requirements-released.txt, "
                            "or pass --formats=hf") from None
        try:
            bpe.gguf_pre_name(tok["pattern"])
        except ValueError as e:
            raise UserError(f"{checkpoint}: {e}; pass --formats=hf") from None
    weights = split_qkv(weights, config)
    name = os.path.basename(os.path.dirname(os.path.abspath(checkpoint)))

    # everything goes into a temporary folder first, renamed into place whole: an interrupted export
    # leaves no half-written out_dir behind
    with atomic_path(out_dir) as tmp:
        os.makedirs(tmp)
        try:
            if "hf" in wanted:
                os.makedirs(os.path.join(tmp, "hf"))
                write_hf(os.path.join(tmp, "hf"), config, weights, tok)
            for kind in ("f32", "f16"):
                if f"gguf-{kind}" in wanted:
                    write_gguf(os.path.join(tmp, f"model-{kind}.gguf"), config, weights, tok, name, kind == "f16")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for folder, _, files in sorted(os.walk(out_dir)):
        for f in sorted(files):
            print(f"{os.path.join(folder, f)}: {os.path.getsize(os.path.join(folder, f)) / 1e6:.1f} MB")


if __name__ == "__main__":
    run(main, globals())
