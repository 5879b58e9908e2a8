"""Tables and curves of the accuracy study (``recipes/accuracy_study.sh``) from its evaluation logs.

    python -m t2r_fairseq.tools.study_report runs/study [--docs docs]

Reads ``OUT/eval/ROW.KIND.POINT.SUBSET.log`` (``fairseq-eval-lm`` perplexity or
the sacreBLEU line of ``t2r_fairseq.tools.sacrebleu_from_generate``) and the
training logs ``OUT/train/ROW.KIND.log`` (their validation lines), and writes
``OUT/report.md`` (one table per task and test set: every row's metric at every
evaluated update count, the teacher as reference; per task the teacher's cost,
best dev loss and why it stopped, and every row's last dev loss -- the numbers a
recipe is chosen by, since the test sets are not for choosing) and PNGs
(``accuracy_lm.png``, ``accuracy_mt.png``: the metric against finetune updates,
the teacher as a horizontal line; ``teacher_lm.png``, ``teacher_mt.png``: the
teacher's dev-loss curve, i.e. the evidence for its convergence), into
``--docs`` too when given.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, Optional, Tuple

_LOG = re.compile(r"^(?P<row>.+)\.(?P<kind>lm|mt)\.(?P<point>\d+)\.(?P<subset>\w+)\.log$")
_PPL = re.compile(r"Perplexity: ([0-9.]+)")
_TRAIN_LOG = re.compile(r"^(?P<row>.+)\.(?P<kind>lm|mt)\.log$")
_VALID = re.compile(r"valid on 'valid' subset \| loss (?P<loss>[0-9.]+) .*\| num_updates (?P<updates>\d+)")
_BLEU = re.compile(r"sacreBLEU = ([0-9.]+) .*signature: ([^\s)]+)")  # the line ends "...; signature: SIG)"

# The study's fairseq subset names -> the corpus files they hold (recipes/accuracy_study.sh)
SUBSET_NAMES = {"mt": {"test": "test_2016_flickr", "test1": "test_2017_flickr", "valid": "val"},
                "lm": {"test": "test.txt"}}

Results = Dict[str, Dict[str, Dict[str, Dict[int, float]]]]  # kind -> subset -> row -> point -> value
DevCurves = Dict[str, Dict[str, Dict[int, float]]]  # kind -> row -> update -> dev loss


def read_results(out: Path) -> Tuple[Results, Optional[str]]:
    """All evaluated numbers, and the sacreBLEU signature (the same for every MT row)."""
    results: Results = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    signature = None
    for log in sorted((out / "eval").glob("*.log")):
        m = _LOG.match(log.name)
        if not m:
            continue
        text = log.read_text(errors="replace")
        if m["kind"] == "lm":
            found = _PPL.findall(text)
            value = float(found[-1]) if found else None
        else:
            bleu = _BLEU.findall(text)
            value = float(bleu[-1][0]) if bleu else None
            signature = bleu[-1][1] if bleu else signature
        if value is not None:
            results[m["kind"]][m["subset"]][m["row"]][int(m["point"])] = value
    return results, signature


def read_dev_curves(out: Path) -> Tuple[DevCurves, Dict[str, str]]:
    """Dev loss by update from every training log, and how each teacher's training ended.

    A resumed run appends to its log, so an update can appear twice (the checkpoint it resumed from is validated
    again at the same count); the later line wins. Stopping: fairseq's "early stop" line means patience fired,
    "done training" without it means --max-update was reached, neither means the run did not finish.
    """
    curves: DevCurves = defaultdict(dict)
    stopped: Dict[str, str] = {}
    for log in sorted((out / "train").glob("*.log")) if (out / "train").is_dir() else []:
        m = _TRAIN_LOG.match(log.name)
        if not m or m["row"].endswith(".convert"):
            continue
        text = log.read_text(errors="replace")
        curve = {int(v["updates"]): float(v["loss"]) for v in _VALID.finditer(text)}
        if not curve:
            continue
        curves[m["kind"]][m["row"]] = curve
        if m["row"] == "teacher":
            stopped[m["kind"]] = ("patience (no dev improvement for --patience validations)" if "early stop" in text
                                  else "--max-update reached" if "done training" in text else "not finished")
    return curves, stopped


def best_update(curve: Dict[int, float]) -> int:
    """The update with the lowest dev loss (the earliest on ties): what checkpoint_best.pt holds."""
    return min(curve, key=lambda u: (curve[u], u))


def dev_markdown(curves: DevCurves, stopped: Dict[str, str]) -> str:
    """Per task: the teacher's cost and convergence, and each row's dev loss at the end of its budget."""
    lines = []
    for kind in ("lm", "mt"):
        rows = curves.get(kind, {})
        if not rows:
            continue
        lines.append(f"\n### {kind.upper()} dev loss (training logs)\n")
        teacher = rows.get("teacher")
        if teacher:
            best = best_update(teacher)
            lines.append(f"teacher: {max(teacher)} updates run, best dev loss {teacher[best]:.3f} at update {best}, "
                         f"stopped: {stopped.get(kind, 'not finished')}; last five validations: "
                         + ", ".join(f"{u}: {teacher[u]:.3f}" for u in sorted(teacher)[-5:]) + "\n")
        finetuned = sorted(r for r in rows if r != "teacher")
        if finetuned:
            lines.append("| row | updates | dev loss (last) | best dev loss |")
            lines.append("|---|---|---|---|")
            for row in finetuned:
                c = rows[row]
                lines.append(f"| {row} | {max(c)} | {c[max(c)]:.3f} | {min(c.values()):.3f} |")
    return "\n".join(lines) + "\n" if lines else ""


def markdown(results: Results, signature: Optional[str]) -> str:
    lines = []
    for kind in ("lm", "mt"):
        if kind not in results:
            continue
        metric = "test perplexity" if kind == "lm" else "BLEU"
        for subset, rows in sorted(results[kind].items()):
            teacher = rows.get("teacher", {}).get(0)
            points = sorted({p for r, pts in rows.items() if r != "teacher" for p in pts})
            if not points:
                continue
            label = SUBSET_NAMES.get(kind, {}).get(subset, subset)
            lines.append(f"\n### {kind.upper()} {metric}, `{label}` (teacher: {teacher})\n")
            lines.append("| row | " + " | ".join(f"{p} upd" for p in points) + " | vs teacher (last point) |")
            lines.append("|---" * (len(points) + 2) + "|")
            for row, pts in sorted(rows.items()):
                if row == "teacher":
                    continue
                cells = [f"{pts[p]:.2f}" if p in pts else "" for p in points]
                last = pts[max(pts)] if pts else None
                if teacher is None or last is None:
                    delta = ""
                elif kind == "lm":
                    delta = f"{100 * (last / teacher - 1):+.1f}%"
                else:
                    delta = f"{last - teacher:+.2f}"
                lines.append(f"| {row} | " + " | ".join(cells) + f" | {delta} |")
    if signature:
        lines.append(f"\nsacreBLEU signature: `{signature}`")
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib's pyplot, headless and quiet (fairseq's import leaves the root logger verbose)."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results: Results, out: Path, docs: Optional[Path]) -> None:
    plt = _pyplot()
    for kind in ("lm", "mt"):
        if kind not in results:
            continue
        subsets = sorted(s for s in results[kind] if s != "valid")
        fig, axes = plt.subplots(1, len(subsets), figsize=(6.5 * len(subsets), 4.8), squeeze=False)
        for ax, subset in zip(axes[0], subsets):
            rows = results[kind][subset]
            for row, pts in sorted(rows.items()):
                if row == "teacher" or not pts:
                    continue
                xs = sorted(pts)
                ax.plot(xs, [pts[x] for x in xs], marker="o", ms=3, label=row)
            if 0 in rows.get("teacher", {}):
                ax.axhline(rows["teacher"][0], color="black", ls="--", lw=1, label="softmax teacher")
            ax.set_xlabel("finetune updates after the swap")
            ax.set_ylabel("test perplexity" if kind == "lm" else "sacreBLEU")
            if kind == "lm":
                ax.set_yscale("log")
            label = SUBSET_NAMES.get(kind, {}).get(subset, subset)
            ax.set_title(f"{'WikiText-2 LM' if kind == 'lm' else 'Multi30k EN-DE'}: {label}")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        for folder in [out] + ([docs] if docs else []):
            fig.savefig(folder / f"accuracy_{kind}.png", dpi=110)
        plt.close(fig)


def plot_teachers(curves: DevCurves, out: Path, docs: Optional[Path]) -> None:
    """The teachers' dev-loss curves: whether "converged" holds is read off these, not asserted."""
    plt = _pyplot()
    for kind in ("lm", "mt"):
        teacher = curves.get(kind, {}).get("teacher")
        if not teacher:
            continue
        xs = sorted(teacher)
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ax.plot(xs, [teacher[x] for x in xs], marker="o", ms=2)
        best = best_update(teacher)
        ax.axhline(teacher[best], color="black", ls="--", lw=1, label=f"best {teacher[best]:.3f} @ {best}")
        ax.set_xlabel("teacher training updates")
        ax.set_ylabel("dev loss (label-smoothed)" if kind == "mt" else "dev loss")
        ax.set_ylim(top=min(max(teacher.values()), teacher[best] * 1.5))
        ax.set_title(f"{'WikiText-2 LM' if kind == 'lm' else 'Multi30k EN-DE'} softmax teacher")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        for folder in [out] + ([docs] if docs else []):
            fig.savefig(folder / f"teacher_{kind}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the study's --out directory")
    ap.add_argument("--docs", type=Path, default=None, help="also write the PNGs here")
    args = ap.parse_args()
    results, signature = read_results(args.out)
    if not results:
        raise SystemExit(f"study_report: no evaluation logs under {args.out / 'eval'}: run the eval stage first")
    curves, stopped = read_dev_curves(args.out)
    text = markdown(results, signature) + dev_markdown(curves, stopped)
    (args.out / "report.md").write_text(text)
    print(text)
    plot(results, args.out, args.docs)
    plot_teachers(curves, args.out, args.docs)


if __name__ == "__main__":
    main()
