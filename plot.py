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
sweep_size, sweep_tpp, sweep_mixture, sweep_lr, sweep_compute, sweep_methods: the capacity,
learning-rate and method-comparison studies, drawn from the results/sweep_<study>.json that
sweep.py writes (--results=PATH).
"""
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt

from support.config import UserError, run
from support.files import atomic_path, check_writable, read_jsonl, refuse_inputs

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
right = ""                      # right panel: "" = zoom on the left one, or another logged metric
                                # (val_kl/<name>)
# sweep_*, capabilities
results = ""                    # results/sweep_<study>.json, results/released_verilog.json

ARM_TITLES = {"no_replay": "no replay", "replay": "self-generated replay"}


def read_log(path):
    if not os.path.exists(path):
        raise UserError(f"log {path} not found: run the stage that writes it first")
    records = read_jsonl(path)
    if not records:
        raise UserError(f"log {path} is empty: run (or resume) the stage that writes it")
    return records


def read_results(path):
    if not os.path.exists(path):
        raise UserError(f"--results={path!r} not found: run python experiments/sweep.py --study={figure[6:]} first")
    try:
        with open(path) as f:
            result = json.load(f)
    except ValueError:
        raise UserError(f"{path} is not valid JSON: run python experiments/sweep.py --study={figure[6:]} again") from None
    if not isinstance(result, dict) or result.get("study") != figure[6:]:
        raise UserError(f"{path} is not the results of sweep.py --study={figure[6:]}: run it again")
    return result


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
    fig.text(0.5, 0.01, "task being trained is named at the top of each segment", ha="center", fontsize=8,
             color="dimgray")
    axes[0][-1].legend(loc="center right", fontsize=8)
    return fig


def frontier_figure():
    named = [item.partition("=") for item in runs.split(",") if item]
    if not named:
        raise UserError("--runs is empty: give name=path/to/log.jsonl pairs")
    # left: every run; right: the same, zoomed on the runs that stay near the old-data loss, or
    # another logged measure of forgetting (e.g. KL to the model before finetuning) against the same axis
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lowest = float("inf")
    second = right or f"val_loss/{old}"
    for name, _, path in named:
        wanted = (f"val_loss/{old}", f"val_loss/{new}", second)
        records = [r for r in read_log(path) if all(k in r for k in wanted)]
        if not records:
            raise UserError(f"{path} has no val_loss/{old}, val_loss/{new} and {second}: pass "
                            "--old/--new/--right as logged there")
        xs, ys = [r[f"val_loss/{new}"] for r in records], [r[f"val_loss/{old}"] for r in records]
        lowest = min(lowest, min(ys))
        axes[0].plot(xs, ys, marker="o", ms=3, label=name)
        axes[1].plot(xs, [r[second] for r in records], marker="o", ms=3, label=name)
    if right:
        kind, _, data = right.partition("/")
        label = f"KL to the model before finetuning\non {data}" if kind == "val_kl" else right
        axes[1].set_ylabel(f"{label}, lower = less forgetting")
    else:
        axes[1].set_ylim(lowest - 0.05, lowest + 0.6)
        axes[1].set_title("zoom", fontsize=9)
        axes[1].set_ylabel(f"old-data loss ({old}), lower = less forgetting")
    axes[0].set_ylabel(f"old-data loss ({old}), lower = less forgetting")
    for ax in axes:
        ax.set_xlabel(f"new-data loss ({new}), training moves right")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------
# the capacity and learning-rate studies (sweep.py). A hollow marker is a run that hit its step cap
# before reaching the Spanish target: its forgetting is measured at a higher Spanish loss.

def mark_capped(ax, x, y, color):
    """A hollow ring over a run that hit its step cap before the Spanish target."""
    ax.plot([x], [y], marker="o", ms=9, mfc="white", color=color)


def coeff_lines(ax, rows, x_key, coeffs):
    """Forgetting against x_key, one line per KL replay coefficient (mean over the finetuning
    seeds, bars = min..max)."""
    for i, c in enumerate(rows[0]["finetune"]):
        if c not in coeffs:
            continue
        xs = [row[x_key] for row in rows]
        outcomes = [row["finetune"][c] for row in rows]
        label = "plain finetuning" if float(c) == 0 else f"KL self-replay, coeff {c}"
        ax.errorbar(xs, [o["forgetting"] for o in outcomes], marker="o", color=f"C{i}", label=label, capsize=3,
                    yerr=[[o["forgetting"] - o["forgetting_min"] for o in outcomes],
                          [o["forgetting_max"] - o["forgetting"] for o in outcomes]])
        for x, o in zip(xs, outcomes):
            if not o["reached"]:
                mark_capped(ax, x, o["forgetting"], f"C{i}")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.axhline(0, color="gray", lw=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def forgetting_panels(rows, x_key, tick_labels, xlabel, title):
    """Left: every coefficient; right: the replay runs alone, whose forgetting is 10x smaller."""
    coeffs = list(rows[0]["finetune"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    coeff_lines(axes[0], rows, x_key, coeffs)
    coeff_lines(axes[1], rows, x_key, [c for c in coeffs if float(c) > 0])
    for ax in axes:
        ax.set_xticks([row[x_key] for row in rows], tick_labels, fontsize=8)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("forgetting: English loss increase")
    axes[1].set_title("replay runs only (hollow: step cap hit before the Spanish target)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def sweep_size_figure(result):
    rows = result["models"]
    labels = [f"D={r['width']}\n{r['paper_params'] / 1e3:.0f}k\n{r['tokens_per_param']:.0f} TPP" for r in rows]
    return forgetting_panels(rows, "paper_params", labels,
                             "model width, parameters (12LD^2+DV), tokens/param pretrained",
                             "Forgetting vs model size: every model pretrained to English loss "
                             f"{result['english_target']:.3f}, "
                             f"finetuned to Spanish loss {result['spanish_target']:.3f}")


def sweep_tpp_figure(result):
    rows = result["models"]
    return forgetting_panels(rows, "tpp", [f"{r['tpp']:g}\n(en {r['en_loss']:.2f})" for r in rows],
                             f"pretraining tokens per parameter (width {result['width']}), "
                             "English loss reached",
                             "Forgetting vs pretraining length, finetuned to Spanish loss "
                             f"{result['spanish_target']:.3f}")


def sweep_mixture_figure(result):
    lengths = result["lengths"]
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), sharey=True)
    for ax, (label, length) in zip(axes, lengths.items()):
        frontier = length["frontier"]
        ax.plot([p["es_loss"] for p in frontier], [p["en_loss"] for p in frontier], "k--", marker="s",
                label="pretrained on a mixture")
        for p in frontier:
            ax.annotate(f"{p['es_share']:.0%} es", (p["es_loss"], p["en_loss"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        for name, trajectory in length["finetune"].items():
            ax.plot([r["es_loss"] for r in trajectory], [r["en_loss"] for r in trajectory], marker="o", ms=2,
                    label=f"English model finetuned on Spanish: {name}")
        ax.set_title(f"{label}: {length['tpp']:g} tokens/param", fontsize=10)
        ax.set_xlabel("Spanish loss")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("English loss")
    axes[0].legend(fontsize=7)
    return fig


def sweep_lr_figure(result):
    """Left: forgetting against the Spanish loss along every finetuning run of the first seed, a
    colour per pretraining LR, a line style per finetuning LR; right: forgetting at the Spanish
    target against the finetuning LR, a line per pretraining LR (mean over seeds, bars = min..max)."""
    summary, runs = result["summary"], result["runs_table"]
    plrs = sorted({g["pretrain_lr"] for g in summary})
    flrs = sorted({g["finetune_lr"] for g in summary})
    styles = dict(zip(flrs, ["-", "--", ":", "-."] * len(flrs)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    first_seed = min(r["seed"] for r in runs)
    for i, plr in enumerate(plrs):
        for r in runs:
            if r["pretrain_lr"] == plr and r["seed"] == first_seed:
                spanish, forgetting = zip(*r["curve"])
                axes[0].plot(spanish, forgetting, styles[r["finetune_lr"]], color=f"C{i}", lw=1,
                             label=f"pretrain LR {plr:g}, finetune LR {r['finetune_lr']:g}")
        sel = sorted((g for g in summary if g["pretrain_lr"] == plr), key=lambda g: g["finetune_lr"])
        axes[1].errorbar([g["finetune_lr"] for g in sel], [g["forgetting"] for g in sel], capsize=3, marker="o",
                         color=f"C{i}", label=f"pretrain LR {plr:g}",
                         yerr=[[g["forgetting"] - g["forgetting_min"] for g in sel],
                               [g["forgetting_max"] - g["forgetting"] for g in sel]])
        for g in sel:
            if not g["all_reached"]:
                mark_capped(axes[1], g["finetune_lr"], g["forgetting"], f"C{i}")
    axes[0].axvline(result["spanish_target"], color="k", lw=0.5)
    axes[0].invert_xaxis()
    axes[0].set_xlabel(f"Spanish loss (line: the target, {result['spanish_target']:.3f})")
    axes[0].set_ylabel("English loss increase")
    axes[0].set_title(f"every finetuning run, seed {first_seed}", fontsize=9)
    axes[0].legend(fontsize=6)
    axes[1].set_xscale("log")
    axes[1].minorticks_off()
    axes[1].set_xticks(flrs, [f"{lr:g}" for lr in flrs])
    axes[1].set_xlabel("finetuning learning rate")
    axes[1].set_ylabel("English loss increase at the Spanish target")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"Pretraining LR: every model pretrained to English loss {result['english_target']:g}, "
                 f"then finetuned (plain); {len({r['seed'] for r in runs})} seeds", fontsize=10)
    return fig


def sweep_compute_figure(result):
    """Left: English loss vs cost (training + replay sampling seconds) of every arm, first seed;
    right: per lower learning rate, how many times less time replay at the high LR needs to end at
    the same English loss (median over seeds, bars = min..max; open marker = a lower bound)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    ax = axes[0]
    for i, arm in enumerate(result["seeds"][0]["arms"]):
        seconds, english = zip(*arm["curve"])
        style = {"none": "-", "self": "--", "replace": ":"}[arm["variant"]]
        ax.plot(seconds, english, style, color=f"C{i % 10}", lw=1, alpha=0.6)
        ax.plot([arm["train_seconds"]], [arm["en_after"]], marker="o", color=f"C{i % 10}",
                mfc=None if arm["reached"] else "white", label=arm["arm"])
    ax.set_xscale("log")
    ax.set_xlabel("training seconds; dot = Spanish target, at its cost (self-generated: + sampling)")
    ax.set_ylabel("English loss")
    ax.set_title(f"seed {result['seeds'][0]['seed']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax = axes[1]
    for j, variant in enumerate(("self", "replace")):
        rows = [r for r in result["summary"] if r["variant"] == variant and r["median"]]
        x = [r["low_lr"] * (1.08 if j else 1 / 1.08) for r in rows]
        ax.errorbar(x, [r["median"] for r in rows], capsize=3, marker="o", ls="none", color=f"C{j}",
                    mfc="white" if any(r["at_least"] for r in rows) else None,
                    yerr=[[r["median"] - r["min"] for r in rows], [r["max"] - r["median"] for r in rows]],
                    label={"self": "self-generated replay (KL)",
                           "replace": "real rows replace part of the batch"}[variant])
    if any(r["median"] for r in result["summary"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no replay run matched a lower learning rate", ha="center", transform=ax.transAxes)
    ax.set_xlabel("lower learning rate matched (no replay)")
    ax.set_ylabel("time ratio: lower LR / high LR + replay")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def sweep_methods_figure(result):
    """Forgetting of every method at the Spanish target: one dot per finetuning seed, a bar at the
    mean, so a reader sees which differences are larger than the seeds' spread."""
    summary = result["summary"]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(summary) + 1.5))
    for i, m in enumerate(summary):
        seeds = [r["forgetting"] for r in result["runs_table"] if r["method"] == m["method"]]
        ax.plot(seeds, [i] * len(seeds), "o", color=f"C{i}", alpha=0.7)
        ax.plot([m["forgetting"]] * 2, [i - 0.3, i + 0.3], color=f"C{i}", lw=2)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_yticks(range(len(summary)), [m["method"] for m in summary])
    ax.invert_yaxis()
    ax.set_xlabel("English loss increase at the Spanish target (dots: seeds, bar: mean)")
    ax.set_title(f"Method comparison: finetune LR {result['finetune_lr']:g} (LoRA {result['lora_lr']:g}), replay "
                 f"coefficient {result['coeff']:g}, Spanish target {result['spanish_target']:.3f}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


SWEEP_FIGURES = {"sweep_size": sweep_size_figure, "sweep_tpp": sweep_tpp_figure,
                 "sweep_mixture": sweep_mixture_figure, "sweep_lr": sweep_lr_figure,
                 "sweep_compute": sweep_compute_figure, "sweep_methods": sweep_methods_figure}


def capabilities_figure():
    """The released model finetuned on Verilog (released_verilog.py): MMLU accuracy (left) and KL to
    the model before finetuning on its own chat answers (right) against the Verilog validation loss,
    along every run; one colour per method, one line per seed. The study's Figure 9, in shape."""
    if not os.path.exists(results):
        raise UserError(f"--results={results!r} not found: run python experiments/released_verilog.py first")
    with open(results) as f:
        result = json.load(f)
    if "methods" not in result or "verilog_target" not in result:
        raise UserError(f"{results} is not the results of released_verilog.py: run it again")
    headline = result["headline"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (arm, row) in enumerate(result["methods"].items()):
        for j, r in enumerate(row["runs"]):
            path = r["trajectory"]
            scored = [p for p in path if headline in p]
            label = arm if j == 0 else None
            axes[0].plot([p["verilog_loss"] for p in scored], [p[headline] for p in scored], marker="o", ms=4,
                         color=colors[i % len(colors)], alpha=0.8, label=label)
            axes[1].plot([p["verilog_loss"] for p in path], [p["chat_kl"] for p in path], marker="o", ms=4,
                         color=colors[i % len(colors)], alpha=0.8, label=label)
    axes[0].set_ylabel(f"MMLU {headline} ({result['items']} items), higher = kept")
    axes[1].set_ylabel("KL to the model before finetuning\non its own chat answers, lower = kept")
    for ax in axes:
        ax.axvline(result["verilog_target"], color="gray", ls="--", lw=0.8)
        ax.set_xlabel("Verilog validation loss, training moves right")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].axhline(0.25, color="gray", ls=":", lw=0.8)
    axes[0].legend(fontsize=8)
    return fig


def main():
    if figure == "toy_continual":
        fig = toy_continual_figure()
    elif figure == "frontier":
        fig = frontier_figure()
    elif figure == "capabilities":
        fig = capabilities_figure()
    elif figure in SWEEP_FIGURES:
        fig = SWEEP_FIGURES[figure](read_results(results))
    else:
        raise UserError(f"--figure={figure!r} must be toy_continual, frontier, capabilities or one of "
                        f"{', '.join(SWEEP_FIGURES)}")
    refuse_inputs(out, [p.split("=", 1)[-1] for p in f"{runs},{results}".split(",") if p], "--out")
    check_writable(out)
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:  # savefig picks the format by the ending
        fig.savefig(tmp, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    run(main, globals())
