"""
Stage 5: figures from the logs the pipeline wrote.

    python plot.py --figure=toy_continual --toy_dir=out/toy --out=results/toy_continual.png
    python plot.py --figure=frontier --runs=plain=out/ft/log.jsonl,kl=out/ft_kl/log.jsonl \
        --old=add --new=sort --out=results/frontier.png

toy_continual: accuracy of every task vs training step, one panel per arm (no replay, replay),
task boundaries marked. Reads <toy_dir>/pretrain/log.jsonl and <toy_dir>/<arm>/<task>/log.jsonl,
the layout toy_continual.sh writes.
frontier: old-data loss against new-data loss along each finetuning run: a method that forgets
less stays lower at the same new-data loss.
"""
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

from common import UserError, read_jsonl, run

figure = "toy_continual"        # "toy_continual" or "frontier"
out = "results/toy_continual.png"
# toy_continual
toy_dir = "out/toy"
tasks = "add,reversal,sort,modadd"
arms = "no_replay,replay"
# frontier
runs = ""                       # comma-separated name=log.jsonl
old = "add"                     # dataset short names as they appear in the logs (val_loss/<name>)
new = "sort"

ARM_TITLES = {"no_replay": "no replay", "replay": "self-generated replay"}


def read_log(path):
    if not os.path.exists(path):
        raise UserError(f"log {path} not found: run the stage that writes it first")
    return read_jsonl(path)


def toy_continual_figure():
    task_list = tasks.split(",")
    arm_list = arms.split(",")
    fig, axes = plt.subplots(1, len(arm_list), figsize=(6 * len(arm_list), 3.8), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, arm in zip(axes[0], arm_list):
        paths = [os.path.join(toy_dir, "pretrain", "log.jsonl")]
        paths += [os.path.join(toy_dir, arm, t, "log.jsonl") for t in task_list[1:]]
        offset, boundaries, series = 0, [], {t: ([], []) for t in task_list}
        for segment, path in zip(task_list, paths):
            records = read_log(path)
            for r in records:
                for t in task_list:
                    if f"accuracy/{t}" in r:
                        series[t][0].append(offset + r["step"])
                        series[t][1].append(r[f"accuracy/{t}"])
            boundaries.append((offset, segment))
            offset += records[-1]["step"]
        for i, t in enumerate(task_list):
            ax.plot(*series[t], label=t, color=colors[i % len(colors)], lw=1.8)
        ends = [start for start, _ in boundaries[1:]] + [offset]
        for (start, segment), end in zip(boundaries, ends):
            if start:
                ax.axvline(start, color="gray", ls="--", lw=0.8)
            ax.text((start + end) / 2, 1.05, segment, fontsize=8, color="dimgray", ha="center")
        ax.set_title(ARM_TITLES.get(arm, arm), pad=16)
        ax.set_xlabel("training step")
        ax.set_ylim(-0.03, 1.12)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact-match accuracy (val)")
    fig.text(0.5, 0.01, "task being trained is named at the top of each segment", ha="center", fontsize=8, color="dimgray")
    axes[0][-1].legend(loc="center right", fontsize=8)
    return fig


def frontier_figure():
    named = [item.partition("=") for item in runs.split(",") if item]
    if not named:
        raise UserError("--runs is empty: give name=path/to/log.jsonl pairs")
    # left: every run; right: the same, zoomed on the runs that stay near the old-data loss
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lowest = float("inf")
    for name, _, path in named:
        records = [r for r in read_log(path) if f"val_loss/{old}" in r and f"val_loss/{new}" in r]
        if not records:
            raise UserError(f"{path} has no val_loss/{old} and val_loss/{new}: pass --old/--new as logged there")
        xs, ys = [r[f"val_loss/{new}"] for r in records], [r[f"val_loss/{old}"] for r in records]
        lowest = min(lowest, min(ys))
        for ax in axes:
            ax.plot(xs, ys, marker="o", ms=3, label=name)
    axes[1].set_ylim(lowest - 0.05, lowest + 0.6)
    axes[1].set_title("zoom", fontsize=9)
    for ax in axes:
        ax.set_xlabel(f"new-data loss ({new}), training moves right")
        ax.set_ylabel(f"old-data loss ({old}), lower = less forgetting")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def main():
    if figure == "toy_continual":
        fig = toy_continual_figure()
    elif figure == "frontier":
        fig = frontier_figure()
    else:
        raise UserError(f"--figure={figure!r} must be toy_continual or frontier")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main, globals())
