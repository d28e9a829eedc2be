"""
Our converted released model against code we did not write: Hugging Face transformers' own
LlamaForCausalLM and tokenizer, both loaded from the same GGUF file.

    pip install -r requirements-check.txt        # transformers, accelerate, gguf (optional extras)
    python convert.py && python check_released.py

1. Logits: the same few hundred tokens through both models, in float64 (where only the order of
   floating-point operations differs: max |difference| must be <= 1e-5) and in float32.
   transformers' LlamaRMSNorm rounds its input to float32 whatever the model's dtype, so its
   "float64" model is float32 in every normalisation; the float64 comparison runs its RMSNorm in
   the input's dtype (the same formula without that cast), and we report the as-shipped number too.
2. Tokenizer: the ids of both Bibles (chapter by chapter) and of hard strings (unicode, digits,
   whitespace runs, special-token text), ours against transformers'. transformers builds its
   tokenizer from the GGUF with plain GPT-2 pre-tokenization, ignoring the file's
   tokenizer.ggml.pre = "smollm" (digits split one by one, as in llama.cpp and SmolLM2's own
   tokenizer.json); we report the comparison with that tokenizer as loaded, and with the same
   tokenizer given SmolLM2's pre-tokenizer (Digits, then ByteLevel), which is the one ours follows.
Writes results/released_check.json and results/released_check.md.
"""
import os
import sys
import time

import torch

import tokenizer as bpe
from checkpoint import load_checkpoint
from config import UserError, run
from files import atomic_write_text, write_json

checkpoint = "out/smollm2/ckpt.pt"   # from convert.py
gguf = ""                            # the GGUF it was converted from; "" = the checkpoint's source
n_tokens = 300                       # tokens through both models
modules_dir = "/usr/share/sword"     # the Bibles (data/bible/prepare.py's reader); skipped if missing
out_json = "results/released_check.json"
out_md = "results/released_check.md"

HARD_STRINGS = [
    "Hello world", " leading space", "trailing space ", "  two  spaces   three    four", "tabs\tand\nnewlines\n\n\n",
    "1234567890", "pi is 3.14159, e is 2.71828", "x  1", "a 12  34   56", "version 2.0.1-rc3", "١٢٣ ٤٥٦ (Arabic digits)",
    "naïve café résumé — “quotes” ‘single’", "東京タワー 北京 서울", "emoji 🚀🔥 and family 👩‍👩‍👧", "Ünïcödé ÅÄÖ ß ẞ",
    "can't won't I'm you're they've we'll he'd", "CAN'T WON'T", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>",
    "<repo_name>nanoreplay<file_sep>", "\x00\x01\x7f control bytes", "    indented code\n        more", "a\r\nb\r\n",
    "¿Dónde está el baño? ¡Ahí!", "Él comió piña y ñandú.", "$100.00 + 25% = ???", "e=mc^2 && x<y || y>=z",
]


def transformers_models(path):
    """transformers' model and tokenizer, loaded from the GGUF (dequantised to float32)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError("this check needs transformers: pip install -r requirements-check.txt") from None
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tok


def rmsnorm_in_input_dtype(self, x):
    """transformers' LlamaRMSNorm.forward without its cast to float32."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def with_smollm2_pretokenizer(tok):
    """A copy of transformers' tokenizer whose pre-tokenizer is SmolLM2's: split every digit
    apart, then GPT-2's byte-level pattern."""
    from tokenizers import pre_tokenizers
    fast = type(tok.backend_tokenizer).from_str(tok.backend_tokenizer.to_str())
    fast.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return lambda text: fast.encode(text, add_special_tokens=False).ids


def compare_ids(ours, theirs, texts):
    """How many of the texts get identical ids, and the first few that do not."""
    mismatches = [t for t in texts if ours(t) != theirs(t)]
    return {"texts": len(texts), "identical": len(texts) - len(mismatches),
            "tokens": sum(len(ours(t)) for t in texts), "first_mismatches": mismatches[:3]}


def main():
    t0 = time.time()
    ours, ckpt = load_checkpoint(checkpoint)
    path = gguf or ckpt.get("source", "")
    if not path.endswith(".gguf") or not os.path.exists(path):
        raise UserError(f"no GGUF file to compare with ({path!r}): pass --gguf=the file "
                        f"{checkpoint} was converted from")
    hf_model, hf_tok = transformers_models(path)
    encoding = bpe.load(ckpt["tokenizer"]["tokenizer_path"])
    report = {"checkpoint": checkpoint, "gguf": path, "transformers": __import__("transformers").__version__}

    # 1. logits, float64 then float32
    text = " ".join(HARD_STRINGS[:10]) + " In the beginning God created the heavens and the earth. " * 20
    ids = [ckpt["tokenizer"]["bos"]] + encoding.encode_ordinary(text)[:n_tokens - 1]
    x = torch.tensor([ids])
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    shipped_norm = LlamaRMSNorm.forward
    for name, dtype, norm in (("float64", torch.float64, rmsnorm_in_input_dtype),
                              ("float64, transformers' RMSNorm as shipped (float32)", torch.float64, shipped_norm),
                              ("float32", torch.float32, shipped_norm)):
        LlamaRMSNorm.forward = norm
        with torch.no_grad():
            difference = (ours.to(dtype)(x) - hf_model.to(dtype)(x).logits).abs().max().item()
        LlamaRMSNorm.forward = shipped_norm
        report.setdefault("logits_max_abs_difference", {})[name] = difference
        print(f"logits over {len(ids)} tokens, {name}: max |ours - transformers| = {difference:.3g}")

    # 2. tokenizer ids: ours with special tokens recognised, as transformers does by default
    ours_ids = lambda t: encoding.encode(t, allowed_special="all")
    as_loaded = lambda t: hf_tok(t, add_special_tokens=False)["input_ids"]
    smollm2 = with_smollm2_pretokenizer(hf_tok)
    corpora = {"hard strings": HARD_STRINGS}
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bible"))
        import prepare as bible
        for lang, prefix in bible.LANGUAGES.items():
            chapters = bible.read_bible(bible.find_module(modules_dir, prefix))
            corpora[f"Bible {lang}"] = [c for book in chapters.values() for c in book]
    except FileNotFoundError as e:
        print(f"skipping the Bibles: {e}")
    report["tokenizer"] = {}
    for name, texts in corpora.items():
        report["tokenizer"][name] = {"vs transformers with SmolLM2's pre-tokenizer": compare_ids(ours_ids, smollm2, texts),
                                     "vs transformers as loaded from the GGUF": compare_ids(ours_ids, as_loaded, texts)}
        for against, r in report["tokenizer"][name].items():
            print(f"{name}: {r['identical']}/{r['texts']} identical {against} ({r['tokens']:,} tokens)")
    report["seconds"] = round(time.time() - t0, 1)
    write_json(out_json, report)
    lines = ["| check | result |", "|---|---|"]
    for name, difference in report["logits_max_abs_difference"].items():
        lines.append(f"| logits, {len(ids)} tokens, {name}: max abs difference | {difference:.2e} |")
    for name, results in report["tokenizer"].items():
        for against, r in results.items():
            lines.append(f"| {name}: identical ids {against} | {r['identical']} of {r['texts']} "
                         f"({r['tokens']:,} tokens) |")
    atomic_write_text(out_md, "\n".join(lines) + "\n")
    print(f"wrote {out_json} and {out_md}")


if __name__ == "__main__":
    run(main, globals())
