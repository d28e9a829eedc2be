#!/usr/bin/env bash
# The toy continual-learning experiment, end to end: the pipeline scripts in order, visibly.
#
# One small GPT learns four tasks in sequence: add, then reversal, sort, modadd. Two arms share the
# pretrained `add` model:
#   no_replay  plain finetuning on each new task;
#   replay     before each new task, sample a replay corpus from the current model, prompted with
#              the BOS tokens of all earlier tasks in equal shares, then finetune on the new task
#              with KL(teacher || student) on those self-generated sequences.
# Results: results/toy_continual.{json,md,png}. Bulky artifacts: out/toy/.
#
#   bash toy_continual.sh                 # settings below; override with env vars, e.g. STEPS=400
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-out/toy}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-800}     # steps on `add` (reaches ~100% accuracy)
STEPS=${STEPS:-200}                       # finetuning steps per later task
LR=${LR:-1e-3}                            # finetuning peak learning rate (cosine decay to 0)
REPLAY=${REPLAY:-kl}                      # kl or ntp
COEFF=${COEFF:-1.0}                       # replay coefficient
REPLAY_SAMPLES=${REPLAY_SAMPLES:-16384}   # size of each self-generated corpus
TASKS=(add reversal sort modadd)
ALL=arithmetic/add,arithmetic/reversal,arithmetic/sort,arithmetic/modadd
started_at=$(date +%s)

run() { echo "+ $*"; "$@"; }

run python data/arithmetic/prepare.py
run python pretrain.py --datasets=arithmetic/add --eval_datasets=$ALL --max_steps=$PRETRAIN_STEPS \
    --eval_interval=100 --out_dir=$OUT/pretrain

for arm in no_replay replay; do
    previous=$OUT/pretrain/ckpt.pt
    for i in 1 2 3; do
        task=${TASKS[$i]}
        dir=$OUT/$arm/$task
        replay_args=()
        if [ $arm = replay ]; then
            # prompts: the BOS token of every task learned so far, equal shares
            old=$(printf "arithmetic/%s," "${TASKS[@]:0:$i}")
            run python sample_replay.py --init_from=$previous --prompts=${old%,} \
                --num_samples=$REPLAY_SAMPLES --out=$dir/replay.pt
            replay_args=(--replay=$REPLAY --replay_coeff=$COEFF --replay_source=$dir/replay.pt)
        fi
        run python finetune.py --init_from=$previous --dataset=arithmetic/$task --eval_datasets=$ALL \
            --max_steps=$STEPS --learning_rate=$LR --schedule=cosine --eval_interval=20 --out_dir=$dir "${replay_args[@]}"
        previous=$dir/ckpt.pt
    done
done

run python evaluate.py --checkpoints=no_replay=$OUT/no_replay/modadd/ckpt.pt,replay=$OUT/replay/modadd/ckpt.pt \
    --datasets=$ALL --reference=$OUT/pretrain/ckpt.pt --started_at=$started_at \
    --out_json=results/toy_continual.json --out_md=results/toy_continual.md
run python plot.py --figure=toy_continual --toy_dir=$OUT --out=results/toy_continual.png
