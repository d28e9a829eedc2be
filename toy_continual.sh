#!/usr/bin/env bash
# The toy continual-learning experiment, end to end: the pipeline scripts in order, visibly.
#
# One small GPT learns four tasks in sequence (default order: add, reversal, sort, modadd). The
# first task is plain pretraining; two arms then share that model:
#   no_replay  plain finetuning on each new task;
#   replay     before each new task, sample a replay corpus from the current model, prompted with
#              the BOS tokens of all earlier tasks in equal shares, then finetune on the new task
#              with KL(reference || model) on those self-generated sequences, never one twice
#              (finetune.py samples more from the same model when the corpus runs out), as the study.
# Results: $RESULTS.{json,md,png} (default results/toy_continual). Bulky artifacts: $OUT (out/toy).
#
#   bash toy_continual.sh                               # CPU profile: a few minutes on 2 cores
#   ORDER="sort modadd reversal add" SEED=2 bash toy_continual.sh   # any order of the four tasks
#   PROFILE=study bash toy_continual.sh                 # the study's own protocol (GPU-sized)
set -euo pipefail
cd "$(dirname "$0")"

PROFILE=${PROFILE:-cpu}
# Every setting below keeps a value given in the environment, e.g. STEPS=400 LR=1e-3 bash toy_continual.sh
if [ "$PROFILE" = study ]; then
    # the study's toy protocol: width 256, 2 blocks, 16 heads, batch 2048, LR 1e-4 after 200 warmup
    # steps, beta2 0.99, 2000 steps per task (the first one included), a fresh optimizer per task,
    # NTP replay x10 on fresh self-generated samples, as many per step as new ones
    : ${WIDTH:=256} ${BATCH:=2048} ${PRETRAIN_STEPS:=2000} ${PRETRAIN_LR:=1e-4} ${PRETRAIN_SCHEDULE:=constant}
    : ${PRETRAIN_WARMUP:=200} ${PRETRAIN_TARGET:=0} ${PRETRAIN_COOLDOWN:=0} ${STEPS:=2000} ${LR:=1e-4} ${WARMUP:=200}
    : ${REPLAY:=ntp} ${COEFF:=10} ${REPLAY_BATCH:=$BATCH} ${TARGET_ACCURACY:=0} ${COOLDOWN:=0} ${EVAL_INTERVAL:=250}
elif [ "$PROFILE" = cpu ]; then
    # CPU-sized: a narrower model and smaller batches at a higher learning rate. Each task trains
    # until it is learned (tens of steps for reversal and sort, several hundred for an arithmetic
    # task that comes late), then cools down; so the run adapts to any task order. Every task, the
    # first included, cools down once learned, and replay gets as many sequences per step as the new
    # task (the study's balance). How these values were chosen: experiments/LOG.md.
    : ${WIDTH:=128} ${BATCH:=192} ${PRETRAIN_STEPS:=800} ${PRETRAIN_LR:=3e-3} ${PRETRAIN_SCHEDULE:=cosine}
    : ${PRETRAIN_WARMUP:=50} ${PRETRAIN_TARGET:=0.99} ${PRETRAIN_COOLDOWN:=100} ${STEPS:=1500} ${LR:=3e-3} ${WARMUP:=50}
    : ${REPLAY:=kl} ${COEFF:=1} ${REPLAY_BATCH:=$BATCH} ${TARGET_ACCURACY:=0.95} ${COOLDOWN:=100} ${EVAL_INTERVAL:=25}
else
    echo "toy_continual.sh: PROFILE=$PROFILE must be cpu or study" >&2; exit 2
fi
: ${DEPTH:=2}                  # blocks
: ${HEAD_DIM:=16}              # 8 heads at width 128, 16 at width 256
: ${SCHEDULE:=constant}        # finetuning LR after warmup: constant (as the study) or cosine to 0 at STEPS
: ${BETA2:=0.99}
# WIDTH: residual width; BATCH: new-task sequences per step; PRETRAIN_*: the first task, from scratch
# (PRETRAIN_TARGET: once its accuracy gets there, the LR falls linearly to 0 over PRETRAIN_COOLDOWN
# steps and it ends; 0 = never); STEPS: the most steps on each later task, a fresh AdamW for each;
# TARGET_ACCURACY: a later task counts as learned at this exact-match accuracy, after which the LR
# falls linearly to 0 over COOLDOWN steps and the task ends;
# REPLAY: kl = KL(reference || model) or ntp = next-token loss, x COEFF, on REPLAY_BATCH sequences/step
# (by default as many as BATCH: the study's balance);
# the corpus sampled before each task holds 32 steps' worth; finetune.py samples more from the same
# frozen model whenever it runs out, so no replay sequence is ever used twice
: ${REPLAY_SAMPLES:=$((32 * REPLAY_BATCH))}
SEED=${SEED:-1337}
ORDER=(${ORDER:-add reversal sort modadd})
OUT=${OUT:-out/toy}
RESULTS=${RESULTS:-results/toy_continual}
ALL=$(printf "arithmetic/%s," "${ORDER[@]}"); ALL=${ALL%,}
MODEL=(--width=$WIDTH --depth=$DEPTH --head_dim=$HEAD_DIM)
started_at=$(date +%s)

run() { echo "+ $*"; "$@"; }
# The demo redoes every stage each time it runs: --overwrite=True replaces the previous run's outputs
# in $OUT (the scripts refuse to write over another run's files unless asked).

# 1. the data, and the first task learned from scratch
run python data/arithmetic/prepare.py
run python pretrain.py --datasets=arithmetic/${ORDER[0]} --eval_datasets=$ALL "${MODEL[@]}" --batch_size=$BATCH \
    --max_steps=$PRETRAIN_STEPS --learning_rate=$PRETRAIN_LR --schedule=$PRETRAIN_SCHEDULE \
    --warmup_steps=$PRETRAIN_WARMUP --beta2=$BETA2 --target_accuracy=$PRETRAIN_TARGET \
    --cooldown_steps=$PRETRAIN_COOLDOWN --eval_interval=$EVAL_INTERVAL --eval_sequences=512 --seed=$SEED \
    --out_dir=$OUT/pretrain --overwrite=True

# 2. the later tasks, one after another, in each arm
RUNS=$OUT/pretrain   # every run folder and corpus, for the results' split of time
for arm in no_replay replay; do
    previous=$OUT/pretrain/ckpt.pt
    for i in 1 2 3; do
        task=${ORDER[$i]}
        dir=$OUT/$arm/$task
        replay_args=()
        if [ $arm = replay ]; then
            # prompts: the BOS token of every task learned so far, equal shares. The corpus lives
            # outside the run's folder: a run never writes into a folder that holds one of its inputs
            old=$(printf "arithmetic/%s," "${ORDER[@]:0:$i}")
            corpus=$OUT/replay_corpora/$task.pt
            run python sample_replay.py --init_from=$previous --prompts=${old%,} \
                --num_samples=$REPLAY_SAMPLES --batch_size=4096 --seed=$((SEED + i)) --out=$corpus --overwrite=True
            replay_args=(--replay=$REPLAY --replay_coeff=$COEFF --replay_source=$corpus
                         --replay_batch_size=$REPLAY_BATCH)
            RUNS=$RUNS,$corpus
        fi
        run python finetune.py --init_from=$previous --dataset=arithmetic/$task --eval_datasets=$ALL \
            --batch_size=$BATCH --max_steps=$STEPS --learning_rate=$LR --schedule=$SCHEDULE --warmup_steps=$WARMUP \
            --beta2=$BETA2 --target_accuracy=$TARGET_ACCURACY --cooldown_steps=$COOLDOWN --eval_interval=$EVAL_INTERVAL \
            --eval_sequences=512 \
            --seed=$SEED --out_dir=$dir --overwrite=True "${replay_args[@]}"
        previous=$dir/ckpt.pt
        RUNS=$RUNS,$dir
    done
done

# 3. every task after the last one, against the model that knew only the first; then the figure
last=${ORDER[3]}
run python evaluate.py --checkpoints=no_replay=$OUT/no_replay/$last/ckpt.pt,replay=$OUT/replay/$last/ckpt.pt \
    --datasets=$ALL --reference_checkpoint=$OUT/pretrain/ckpt.pt --started_at=$started_at --time_runs=$RUNS \
    --out_json=$RESULTS.json --out_md=$RESULTS.md
run python plot.py --figure=toy_continual --toy_dir=$OUT --tasks=$(IFS=,; echo "${ORDER[*]}") --out=$RESULTS.png
