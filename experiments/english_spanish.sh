#!/usr/bin/env bash
# English -> Spanish forgetting, method comparison (the paper's Figure 1 setting), end to end.
#
# A small GPT is pretrained on English (World English Bible) to saturation, then finetuned on
# Spanish (Reina-Valera 1909) with each method until its Spanish validation loss reaches the same
# target, all at the same learning rate. How much English it lost on the way is the forgetting, read
# at exactly that Spanish loss. Methods:
#   standard   plain finetuning                 lora16     LoRA rank 16 (+ full embeddings)
#   kl_self    KL on self-generated English     kl_real    KL on real English
#   ntp_self   NTP on self-generated English    ntp_real   NTP on real English
#   lwf        KL to the pretrained model on the Spanish batches (Learning without Forgetting)
#   ntp_self_reused  ntp_self from a small corpus cycled many times (to see what reuse does)
# Results: results/method_comparison.{json,md}, results/method_comparison.png. Artifacts: out/en_es/.
#
#   bash experiments/english_spanish.sh                 # CPU-mini profile (45 min on a 2-core Intel Xeon with AVX-512 BF16)
#   PROFILE=gpu bash experiments/english_spanish.sh     # the paper's model size, for one GPU
# Needs the Debian SWORD modules: apt-get install -y --no-install-recommends sword-text-web sword-text-sparv
set -euo pipefail
cd "$(dirname "$0")/.."   # the repo root: every path below is relative to it

OUT=${OUT:-out/en_es}
PROFILE=${PROFILE:-cpu}
if [ "$PROFILE" = gpu ]; then   # paper default model: D=256, L=6, head dim 64, T=256, V=4096
    MODEL=(--width=256 --depth=6 --head_dim=64 --block_size=256)
    PRETRAIN=(--batch_size=256 --max_steps=20000 --dtype=bfloat16 --compile=True)
    FT=(--batch_size=64 --dtype=bfloat16)
    REPLAY_BATCH=16; STANDARD_STEPS=1000; MAX_STEPS=5000
    REAL_REUSE=True   # 5000 x 16 windows of 256 tokens pass over the 1M-token Bible 20 times
else                            # CPU-mini: 4 layers of width 128, 128-token windows
    MODEL=(--width=128 --depth=4 --head_dim=32 --block_size=128)
    # bf16 where this CPU multiplies in it fast (AVX-512 BF16: ~2x), float32 where not (AVX2 alone: 6-200x slower)
    PRETRAIN=(--batch_size=32 --max_steps=${PRETRAIN_STEPS:-3000} --dtype=auto)
    FT=(--batch_size=32 --dtype=auto)
    REPLAY_BATCH=8; STANDARD_STEPS=200; MAX_STEPS=900
    REAL_REUSE=False  # 900 x 8 windows of 128 tokens: 0.9 passes over the English training split
fi
LR=${LR:-1e-3}            # finetuning learning rate, the same for every method (constant after warmup)
COEFF=${COEFF:-1.0}       # replay / LwF coefficient
# replay: REPLAY_BATCH old-distribution sequences per step beside the new batch (a quarter of it, as
# the study's 64 beside 256), never the same self-generated sequence twice: the corpus holds 300
# steps' worth, and finetune.py samples more from the same model if a run needs more
REPLAY_SAMPLES=$((300 * REPLAY_BATCH))
started_at=$(date +%s)

run() { echo "+ $*"; "$@"; }

# Every training stage runs with --resume=True: a finished run is skipped, an interrupted one
# continues where it stopped, a missing one starts (delete $OUT to start over). A corpus file
# appears only when complete, so an existing one is kept.
[ -f data/bible/es/meta.json ] || run python data/bible/prepare.py
run python pretrain.py --datasets=bible/en --eval_datasets=bible/es \
    "${MODEL[@]}" "${PRETRAIN[@]}" --learning_rate=3e-3 --schedule=cosine --warmup_steps=200 \
    --eval_interval=250 --eval_sequences=256 --out_dir=$OUT/pretrain_en --resume=True
[ -f $OUT/replay_en.pt ] || run python sample_replay.py --init_from=$OUT/pretrain_en/ckpt.pt --prompts=bible/en \
    --num_samples=$REPLAY_SAMPLES --batch_size=512 --out=$OUT/replay_en.pt --resume=True

finetune() {  # name, then extra finetune.py arguments
    local name=$1; shift
    run python finetune.py --init_from=$OUT/pretrain_en/ckpt.pt --dataset=bible/es --out_dir=$OUT/$name \
        "${FT[@]}" --learning_rate=$LR --eval_interval=20 --eval_sequences=256 --eval_kl=True --resume=True "$@"
}
# The Spanish target is the validation loss standard finetuning reaches in STANDARD_STEPS steps;
# every other method trains until it reaches the same loss (or gives up after MAX_STEPS), and is
# read off its log at exactly that loss (interpolated between the two evaluations around it).
finetune standard --max_steps=$STANDARD_STEPS
TARGET=$(python -c "import json; print(json.loads(open('$OUT/standard/log.jsonl').readlines()[-1])['val_loss/es'])")
echo "Spanish target loss: $TARGET"
UNTIL=(--target_val_loss=$TARGET --max_steps=$MAX_STEPS)
SELF=(--replay_source=$OUT/replay_en.pt --replay_batch_size=$REPLAY_BATCH)
REAL=(--replay_source=data:bible/en --replay_batch_size=$REPLAY_BATCH --replay_reuse=$REAL_REUSE)
finetune lora16   --lora_rank=16 --lora_embeddings=True "${UNTIL[@]}"
finetune kl_self  --replay=kl  --replay_coeff=$COEFF "${SELF[@]}" "${UNTIL[@]}"
finetune kl_real  --replay=kl  --replay_coeff=$COEFF "${REAL[@]}" "${UNTIL[@]}"
finetune ntp_self --replay=ntp --replay_coeff=$COEFF "${SELF[@]}" "${UNTIL[@]}"
finetune ntp_real --replay=ntp --replay_coeff=$COEFF "${REAL[@]}" "${UNTIL[@]}"
finetune lwf      --lwf_coeff=$COEFF "${UNTIL[@]}"
# the same NTP self-replay with reuse: a corpus of REPLAY_BATCH x 64 sequences, cycled (the old protocol)
[ -f $OUT/replay_en_small.pt ] || run python sample_replay.py --init_from=$OUT/pretrain_en/ckpt.pt \
    --prompts=bible/en --num_samples=$((64 * REPLAY_BATCH)) --batch_size=512 --seed=7 \
    --out=$OUT/replay_en_small.pt --resume=True
finetune ntp_self_reused --replay=ntp --replay_coeff=$COEFF --replay_source=$OUT/replay_en_small.pt \
    --replay_batch_size=$REPLAY_BATCH --replay_reuse=True "${UNTIL[@]}"

METHODS=(standard lora16 kl_self kl_real ntp_self ntp_real lwf ntp_self_reused)
logs=$(for m in "${METHODS[@]}"; do printf "%s=%s/%s/log.jsonl," $m $OUT $m; done)
run python evaluate.py --logs=${logs%,} --match=val_loss/es=$TARGET \
    --out_json=results/method_comparison.json --out_md=results/method_comparison.md
run python plot.py --figure=frontier --runs=${logs%,} --old=en --new=es --out=results/method_comparison.png
