"""Dev MLM loss against updates and training wall time, from the fairseq-train logs of recipes/shatter_study.sh.

``python -m t2r_fairseq.tools.shatter_report runs/shatter/logs/multihead.log runs/shatter/logs/shatter.log
--plot docs/shatter_mlm.png`` prints a markdown table (update, dev loss, cumulative train wall seconds per run)
and optionally plots both curves. ``--bench runs/shatter/bench.json`` adds the fwd+bwd / memory table and plot.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

_JSON = re.compile(r"\| (train_inner|valid) \| (\{.*\})")


def read_log(path: Path) -> Dict[str, List[Tuple[int, float, float]]]:
    """``{"valid": [(update, dev loss (base 2), cumulative train wall s)], "train": [(update, loss, same)]}``
    (train wall = time in training steps, without validation; logged every --log-interval updates)."""
    train: List[Tuple[int, float, float]] = []
    total = 0.0  # fairseq resets train_inner's train_wall at every log line: the sum is the run's training time
    valid: List[Tuple[int, float, float]] = []
    for line in path.read_text(errors="replace").splitlines():
        m = _JSON.search(line)
        if not m:
            continue
        row = json.loads(m.group(2))
        if m.group(1) == "train_inner":
            total += float(row["train_wall"])
            train.append((int(row["num_updates"]), float(row["loss"]), total))
        else:
            update = int(row["valid_num_updates"])
            # train wall is known where a train_inner line was logged at this very update (every --log-interval);
            # an end-of-epoch validation between two log lines gets nan (table: blank; wall plot: left out)
            walls = [w for u, _, w in train if u == update]
            valid.append((update, float(row["valid_loss"]), walls[-1] if walls else float("nan")))
    return {"train": train, "valid": valid}


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--bench", type=Path, default=None)
    p.add_argument("--bench-plot", type=Path, default=None)
    a = p.parse_args(argv)
    runs = {log.stem: read_log(log) for log in a.logs}
    names = list(runs)
    print("| update | " + " | ".join(f"{n} dev loss | {n} train s" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    updates = sorted({u for r in runs.values() for u, _, _ in r["valid"]})
    for u in updates:
        cells = []
        for n in names:
            hit = [(l, w) for uu, l, w in runs[n]["valid"] if uu == u]
            if hit:
                cells += [f"{hit[0][0]:.3f}", "" if hit[0][1] != hit[0][1] else f"{hit[0][1]:.0f}"]
            else:
                cells += ["", ""]
        print(f"| {u} | " + " | ".join(cells) + " |")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import logging

        import matplotlib.pyplot as plt

        logging.getLogger("matplotlib").setLevel(logging.WARNING)  # importing t2r_fairseq leaves the root at DEBUG
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for n in names:
            v = runs[n]["valid"]
            ax1.plot([u for u, _, _ in v], [l for _, l, _ in v], marker="o", label=n)
            timed = [(w, l) for _, l, w in v if w == w]
            ax2.plot([w for w, _ in timed], [l for _, l in timed], marker="o", label=n)
        ax1.set_xlabel("updates"), ax2.set_xlabel("cumulative train wall (s)")
        for ax in (ax1, ax2):
            ax.set_ylabel("dev MLM loss (base 2)"), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=90)
    if a.bench:
        rows = json.loads(a.bench.read_text())["rows"]
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        print("\n| L | " + " | ".join(f"{v} fwd+bwd ms, median | {v} saved MiB" for v in variants) + " |")
        print("|---|" + "---|---|" * len(variants))
        for length in sorted({r["length"] for r in rows}):
            cells = []
            for v in variants:
                r = [r for r in rows if r["length"] == length and r["variant"] == v][0]
                low = f", min {r['min_ms']:.0f}" if "min_ms" in r else ""
                cells += [f"{r['median_ms']:.0f} (spread {r['spread_ms']:.0f}{low})", f"{r['saved_activation_mib']:.1f}"]
            print(f"| {length} | " + " | ".join(cells) + " |")
        if a.bench_plot:
            import matplotlib

            matplotlib.use("Agg")
            import logging

            import matplotlib.pyplot as plt

            logging.getLogger("matplotlib").setLevel(logging.WARNING)
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
            for v in variants:
                rr = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["length"])
                ax1.plot([r["length"] for r in rr], [r["median_ms"] for r in rr], marker="o", label=v)
                ax2.plot([r["length"] for r in rr], [r["saved_activation_mib"] for r in rr], marker="o", label=v)
            ax1.set_ylabel("fwd+bwd ms (median)"), ax2.set_ylabel("saved activations MiB")
            for ax in (ax1, ax2):
                ax.set_xlabel("sequence length"), ax.set_xscale("log", base=2), ax.set_yscale("log")
                ax.legend(), ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(a.bench_plot, dpi=90)


if __name__ == "__main__":
    main()
