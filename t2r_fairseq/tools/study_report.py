"""Tables and curves of the accuracy study (``recipes/accuracy_study.sh``) from its evaluation logs.

    python -m t2r_fairseq.tools.study_report runs/study [--docs docs]

Reads ``OUT/eval/ROW.KIND.POINT.SUBSET.log`` (``fairseq-eval-lm`` perplexity or
the sacreBLEU line of ``t2r_fairseq.tools.sacrebleu_from_generate``), the
finetune logs' validation losses, and writes ``OUT/report.md`` (one table per
task: every row's test metric at every evaluated update count, the teacher as
reference) and one PNG per task (``accuracy_lm.png``, ``accuracy_mt.png``;
into ``--docs`` too when given): the metric against finetune updates, the
teacher as a horizontal line.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, Optional, Tuple

_LOG = re.compile(r"^(?P<row>.+)\.(?P<kind>lm|mt)\.(?P<point>\d+)\.(?P<subset>\w+)\.log$")
_PPL = re.compile(r"Perplexity: ([0-9.]+)")
_BLEU = re.compile(r"sacreBLEU = ([0-9.]+) .*signature: ([^\s)]+)")  # the line ends "...; signature: SIG)"

# The study's fairseq subset names -> the corpus files they hold (recipes/accuracy_study.sh)
SUBSET_NAMES = {"mt": {"test": "test_2016_flickr", "test1": "test_2017_flickr", "valid": "val"},
                "lm": {"test": "test.txt"}}

Results = Dict[str, Dict[str, Dict[str, Dict[int, float]]]]  # kind -> subset -> row -> point -> value


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


def plot(results: Results, out: Path, docs: Optional[Path]) -> None:
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import leaves the root logger verbose
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the study's --out directory")
    ap.add_argument("--docs", type=Path, default=None, help="also write the PNGs here")
    args = ap.parse_args()
    results, signature = read_results(args.out)
    if not results:
        raise SystemExit(f"study_report: no evaluation logs under {args.out / 'eval'}: run the eval stage first")
    text = markdown(results, signature)
    (args.out / "report.md").write_text(text)
    print(text)
    plot(results, args.out, args.docs)


if __name__ == "__main__":
    main()
