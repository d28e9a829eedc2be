#!/usr/bin/env bash
# English -> Spanish forgetting, method comparison (the paper's Figure 1 setting), end to end.
#
# A small GPT is pretrained on English (World English Bible) to saturation, then finetuned on
# Spanish (Reina-Valera 1909) with each method until its Spanish validation loss reaches the same
# target. How much English it lost on the way is the forgetting. Methods:
#   standard   plain finetuning                 lora16     LoRA rank 16
#   kl_self    KL on self-generated English     kl_real    KL on real English
#   ntp_self   NTP on self-generated English    ntp_real   NTP on real English
#   lwf        KL to the pretrained model on the Spanish batches (Learning without Forgetting)
# Results: results/method_comparison.{json,md}, results/method_comparison.png. Artifacts: out/en_es/.
#
#   bash english_spanish.sh                     # CPU-mini profile (~1 hour on 2 cores)
#   PROFILE=gpu bash english_spanish.sh         # the paper's model size, for one GPU
# Needs the Debian SWORD modules: apt-get install -y --no-install-recommends sword-text-web sword-text-sparv
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-out/en_es}
PROFILE=${PROFILE:-cpu}
if [ "$PROFILE" = gpu ]; then   # paper default model: D=256, L=6, head dim 64, T=256, V=4096
    MODEL=(--width=256 --depth=6 --head_dim=64 --block_size=256)
    PRETRAIN=(--batch_size=256 --max_steps=20000 --dtype=bfloat16 --compile=True)
    FT=(--batch_size=64 --dtype=bfloat16)
    REPLAY_SAMPLES=16384; STANDARD_STEPS=1000; MAX_STEPS=5000
else                            # CPU-mini: 4 layers of width 128, 128-token windows
    MODEL=(--width=128 --depth=4 --head_dim=32 --block_size=128)
    PRETRAIN=(--batch_size=32 --max_steps=${PRETRAIN_STEPS:-3000} --dtype=bfloat16)
    FT=(--batch_size=32 --dtype=bfloat16)
    REPLAY_SAMPLES=2048; STANDARD_STEPS=200; MAX_STEPS=600
fi
LR=${LR:-1e-3}            # finetuning learning rate (constant after warmup, as in the paper)
LORA_LR=${LORA_LR:-3e-3}  # LoRA adapters start at zero and need a larger step
COEFF=${COEFF:-1.0}       # replay / LwF coefficient
started_at=$(date +%s)

run() { echo "+ $*"; "$@"; }

# Every stage is skipped when its output exists, so an interrupted run continues where it stopped
# (delete $OUT to start over).
[ -f data/bible/es/meta.json ] || run python data/bible/prepare.py
[ -f $OUT/pretrain_en/ckpt.pt ] || run python pretrain.py --datasets=bible/en --eval_datasets=bible/es \
    "${MODEL[@]}" "${PRETRAIN[@]}" --learning_rate=3e-3 --schedule=cosine --warmup_steps=200 \
    --eval_interval=250 --eval_sequences=256 --out_dir=$OUT/pretrain_en
[ -f $OUT/replay_en.pt ] || run python sample_replay.py --init_from=$OUT/pretrain_en/ckpt.pt --prompts=bible/en \
    --num_samples=$REPLAY_SAMPLES --batch_size=512 --out=$OUT/replay_en.pt

finetune() {  # name, then extra finetune.py arguments
    local name=$1; shift
    if [ -f $OUT/$name/ckpt.pt ]; then echo "= $name done, skipping"; return; fi
    run python finetune.py --init_from=$OUT/pretrain_en/ckpt.pt --dataset=bible/es --out_dir=$OUT/$name \
        "${FT[@]}" --learning_rate=$LR --eval_interval=20 --eval_sequences=128 "$@"
}
# The Spanish target is the validation loss standard finetuning reaches in STANDARD_STEPS steps;
# every other method trains until it reaches the same loss (or gives up after MAX_STEPS).
finetune standard --max_steps=$STANDARD_STEPS
TARGET=$(python -c "import json; print(json.loads(open('$OUT/standard/log.jsonl').readlines()[-1])['val_loss/es'])")
echo "Spanish target loss: $TARGET"
finetune lora16   --lora_rank=16 --learning_rate=$LORA_LR \
    --target_val_loss=$TARGET --max_steps=$MAX_STEPS
finetune kl_self  --replay=kl  --replay_coeff=$COEFF --replay_source=$OUT/replay_en.pt \
    --target_val_loss=$TARGET --max_steps=$MAX_STEPS
finetune kl_real  --replay=kl  --replay_coeff=$COEFF --replay_source=data:bible/en \
    --target_val_loss=$TARGET --max_steps=$MAX_STEPS
finetune ntp_self --replay=ntp --replay_coeff=$COEFF --replay_source=$OUT/replay_en.pt \
    --target_val_loss=$TARGET --max_steps=$MAX_STEPS
finetune ntp_real --replay=ntp --replay_coeff=$COEFF --replay_source=data:bible/en \
    --target_val_loss=$TARGET --max_steps=$MAX_STEPS
finetune lwf      --lwf_coeff=$COEFF --target_val_loss=$TARGET --max_steps=$MAX_STEPS

METHODS=(standard lora16 kl_self kl_real ntp_self ntp_real lwf)
checkpoints=$(for m in "${METHODS[@]}"; do printf "%s=%s/%s/ckpt.pt," $m $OUT $m; done)
logs=$(for m in "${METHODS[@]}"; do printf "%s=%s/%s/log.jsonl," $m $OUT $m; done)
run python evaluate.py --checkpoints=${checkpoints%,} --reference=$OUT/pretrain_en/ckpt.pt \
    --datasets=bible/en,bible/es --eval_sequences=512 --started_at=$started_at \
    --out_json=results/method_comparison.json --out_md=results/method_comparison.md
run python plot.py --figure=frontier --runs=${logs%,} --old=en --new=es --out=results/method_comparison.png
