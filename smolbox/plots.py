"""Pictures of a run and of an eval, written as PNG files beside them.

- `plot_training(run_dir)`: runs/<name>/training.png, the curves of metrics.jsonl (loss, reward accuracy and
  margins with the evaluation points, learning rate, pairs/s, log-probs of chosen and rejected answers).
- `plot_eval(report, path)`: eval.png, base against adapter (a run) or every variant of an export.

matplotlib is in the training image and requirements/dev.txt only, never in the serving image: without it these
return None and log why. Only matplotlib's object API is used (no pyplot), so no display or global state is touched.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("smolbox.plots")

# (title, metrics.jsonl key of training logs, key of evaluation logs or None)
TRAINING_PANELS = [
    ("DPO loss", "loss", "eval_loss"),
    ("reward accuracy", "rewards/accuracies", "eval_rewards/accuracies"),
    ("reward margin (chosen - rejected)", "rewards/margins", "eval_rewards/margins"),
    ("learning rate", "learning_rate", None),
    ("throughput (pairs/s)", "pairs_per_s", None),
    ("log-prob of chosen / rejected", "logps/chosen", "logps/rejected"),
]
BASE_COLOR, TRAINED_COLOR, EVAL_COLOR = "#9aa5b1", "#1f77b4", "#d62728"


def _figure(rows: int, cols: int, width: float, height: float, **margins: float):
    """A figure of rows x cols axes, placed by fixed margins (figure fractions, as Figure.subplots_adjust takes them)
    that fit our titles and labels: matplotlib's constrained layout measures every text first, which was most of the
    time a training run or an eval spent on its picture (docs/notes.md)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("plots: matplotlib is not installed (it comes with the training image); no PNG written")
        return None
    fig = Figure(figsize=(width, height))
    fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(**margins)
    return fig


def plot_training(run_dir: str | Path) -> Path | None:
    """runs/<name>/training.png from runs/<name>/metrics.jsonl; None without metrics or matplotlib."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        return None
    fig = _figure(2, 3, 13, 7, left=0.055, right=0.985, bottom=0.075, top=0.9, wspace=0.2, hspace=0.36)
    if fig is None:
        return None
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    for ax, (title, key, second) in zip(fig.axes, TRAINING_PANELS):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            ax.plot(*zip(*points), color=TRAINED_COLOR, marker=".", label="chosen" if key == "logps/chosen" else "train")
        if second == "logps/rejected":
            rejected = [(r["step"], r[second]) for r in train if second in r]
            if rejected:
                ax.plot(*zip(*rejected), color=EVAL_COLOR, marker=".", label="rejected")
        elif second:
            held_out = [(r["step"], r[second]) for r in evals if second in r]
            if held_out:
                ax.plot(*zip(*held_out), color=EVAL_COLOR, marker="o", linestyle="--", label="eval")
        if key == "rewards/accuracies":
            ax.set_ylim(-0.02, 1.02)
        ax.ticklabel_format(axis="y", useOffset=False)  # a constant learning rate reads as 0.0005, not 0 + 5e-4
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    fig.suptitle(f"{run_dir.name}: {records[-1].get('step', '?')} steps")
    return _save(fig, run_dir / "training.png")


def plot_eval(report: dict, path: str | Path) -> Path | None:
    """eval.png for a report of smolbox.eval: base against adapter, or every export variant."""
    return (_plot_run_eval if report["kind"] == "run" else _plot_export_eval)(report, Path(path))


def _plot_run_eval(report: dict, path: Path) -> Path | None:
    fig = _figure(1, 1, 8, 4.5, left=0.09, right=0.98, bottom=0.2, top=0.84)
    if fig is None:
        return None
    ax = fig.axes[0]
    labels, base, trained = [], [], []
    for label, side_key, metric in (("answers right\n(greedy, exact)", "greedy", "exact"), ("answer words right\n(greedy, F1)", "greedy", "f1"),
                                    ("prefers chosen\n(log-prob win rate)", None, "win_rate"), ("DPO reward\naccuracy", None, "reward_accuracy")):
        labels.append(label)
        for side, values in (("base", base), ("adapter", trained)):
            entry = report.get(side) or {}
            entry = entry.get(side_key, {}) if side_key else entry
            values.append(entry.get(metric))
    x = range(len(labels))
    for offset, values, name, color in ((-0.2, base, "base (before)", BASE_COLOR), (0.2, trained, "trained adapter (after)", TRAINED_COLOR)):
        if all(v is None for v in values):
            continue
        bars = ax.bar([i + offset for i in x], [v or 0 for v in values], width=0.4, label=name, color=color)
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.0%}" for v in values], fontsize="small")
    ax.set_xticks(list(x), labels)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share of held-out pairs")
    _legend_and_title(ax, f"{report['source']}: {report['samples']} held-out pairs ({report['split']})")
    fig.supxlabel("the base's reward accuracy is n/a (policy = reference): its fair 'before' is its win rate", fontsize="x-small", color="dimgray")
    return _save(fig, path)


def _plot_export_eval(report: dict, path: Path) -> Path | None:
    fig = _figure(1, 1, 8, 4.5, left=0.09, right=0.98, bottom=0.14, top=0.84)
    if fig is None:
        return None
    ax = fig.axes[0]
    variants = list(report["variants"])
    exact = [report["variants"][v]["greedy"]["exact"] for v in variants]
    agreement = [report["variants"][v].get("token_agreement") for v in variants]
    x = range(len(variants))
    bars = ax.bar([i - 0.2 for i in x], exact, width=0.4, label="answers right (greedy, exact)", color=TRAINED_COLOR)
    ax.bar_label(bars, labels=[f"{v:.0%}" for v in exact], fontsize="small")
    if any(a is not None for a in agreement):
        bars = ax.bar([i + 0.2 for i in x], [a or 0 for a in agreement], width=0.4, label="tokens equal to fp32's", color=BASE_COLOR)
        ax.bar_label(bars, labels=["n/a" if a is None else f"{a:.0%}" for a in agreement], fontsize="small")
    sizes = [report["variants"][v].get("weight_mb") for v in variants]
    ax.set_xticks(list(x), [v if s is None else f"{v}\n{s:.2g} MB" for v, s in zip(variants, sizes)])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("share of held-out questions / tokens")
    _legend_and_title(ax, f"{Path(report['folder']).name}: {report['samples']} held-out questions ({report['split']})")
    return _save(fig, path)


def _legend_and_title(ax, title: str) -> None:
    """Legend in a row above the bars (inside they hide the bar labels), the title above it."""
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize="small", frameon=False)
    ax.figure.suptitle(title, fontsize="medium")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)
    return path
