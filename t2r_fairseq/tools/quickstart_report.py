"""Collect the quickstart's evaluation outputs into results.md, results.json and a decode-time plot.

Reads, under OUT: ``eval/<name>.lm.log`` (fairseq-eval-lm), ``eval/<name>.mt.log``
(fairseq-generate with sacreBLEU), ``train/<name>.log`` (for update counts and wall
time) and ``eval/speed*.json`` (:mod:`t2r_fairseq.tools.decode_speed`). Every number
in the table is parsed from those logs; a missing one is reported as missing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Optional

ROWS = [
    ("teacher", "softmax teacher"),
    ("t2r", "T2R + pretrain, recommended recipe (t2r_qk map, calibrated swap, feature maps at 8x lr; MT: fairseq's "
            "softmax cross-attention kept, lr annealed to 0)"),
    ("t2r_paper", "T2R + pretrain, the paper's recipe (tied t2r map, swap-then-finetune)"),
    ("elu", "ELU+1 + pretrain"),
    ("rfa", "RFA + pretrain"),
    ("performer", "Performer + pretrain"),
    ("hedgehog", "Hedgehog + pretrain"),
    ("t2r_at_mse", "T2R + pretrain, attention transfer (output MSE), then task"),
    ("t2r_at_ce", "T2R + pretrain, attention transfer (attention CE), then task"),
    ("hedgehog_at_ce", "Hedgehog + pretrain, attention transfer (attention CE), then task"),
    ("hedgehog_at_mse", "Hedgehog + pretrain, attention transfer (output MSE), then task"),
    ("t2r_scratch", "T2R random init, same updates"),
    ("t2r_scratch_long", "T2R random init, teacher's updates"),
]


def _find(pattern: str, path: Path) -> Optional[str]:
    if not path.is_file():
        return None
    matches = re.findall(pattern, path.read_text(errors="replace"))
    return matches[-1] if matches else None


def _float(x: Optional[str]) -> Optional[float]:
    return float(x) if x is not None else None


def collect(out: Path) -> dict:
    rows = []
    for key, label in ROWS:
        if not any((out / d / f"{key}.{k}.log").exists() for d in ("train", "eval") for k in ("lm", "mt")):
            continue  # not part of this run
        row = {"model": key, "description": label}
        for kind in ("lm", "mt"):
            row[f"{kind}_test_ppl" if kind == "lm" else "mt_test_bleu"] = (
                _float(_find(r"Perplexity: ([\d.]+)", out / "eval" / f"{key}.lm.log"))
                if kind == "lm"
                else _float(_find(r"sacreBLEU = ([\d.]+)", out / "eval" / f"{key}.mt.log"))
            )
            train_log = out / "train" / f"{key}.{kind}.log"
            row[f"{kind}_valid_ppl"] = _float(_find(r"\| valid \|.*?\| ppl ([\d.]+)", train_log))
            row[f"{kind}_updates"] = _float(_find(r"num_updates (\d+)", train_log))
            row[f"{kind}_train_seconds"] = _float(_find(r"done training in ([\d.]+) seconds", train_log))
        rows.append(row)
    speed = {}
    for f in sorted((out / "eval").glob("speed*.json")):
        speed[f.stem] = json.loads(f.read_text())
    signature = _find(r"signature: (\S+)", out / "eval" / "t2r.mt.log")
    return {"rows": rows, "speed": speed, "sacrebleu_signature": signature}


def _fmt(x: Optional[float], spec: str) -> str:
    return "missing" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def to_markdown(res: dict) -> str:
    lines = ["| model | LM valid ppl | LM test ppl | MT valid ppl | MT test BLEU | LM updates | MT updates | LM train s | MT train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['description']} | {_fmt(r['lm_valid_ppl'], '.2f')} | {_fmt(r['lm_test_ppl'], '.2f')} | "
                     f"{_fmt(r['mt_valid_ppl'], '.2f')} | {_fmt(r['mt_test_bleu'], '.2f')} | "
                     f"{_fmt(r['lm_updates'], '.0f')} | {_fmt(r['mt_updates'], '.0f')} | "
                     f"{_fmt(r['lm_train_seconds'], '.0f')} | {_fmt(r['mt_train_seconds'], '.0f')} |")
    if res["sacrebleu_signature"]:
        lines += ["", f"sacreBLEU: `{res['sacrebleu_signature']}`"]
    for name, models in res["speed"].items():
        lines += ["", f"Decode ({name}): ms per token at context length (median of a 16-step window), state bytes at the end",
                  "", "| model | " + " | ".join(str(r["context"]) for r in next(iter(models.values()))) + " | state bytes |",
                  "|---|" + "---|" * (len(next(iter(models.values()))) + 1)]
        for model, rows in models.items():
            lines.append(f"| {model} | " + " | ".join(f"{r['ms_per_token']:.2f}" for r in rows) + f" | {rows[-1].get('state_bytes', 0):,} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, models in res["speed"].items():
        for model, rows in models.items():
            ax.plot([r["context"] for r in rows], [r["ms_per_token"] for r in rows], marker="o", label=f"{model} ({name})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode time per token (ms)")
    ax.set_title("Incremental decoding: softmax KV cache vs T2R recurrent state")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, force=True)  # keep library debug chatter out of the report
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    res = collect(args.out)
    results = args.out / "results"
    results.mkdir(parents=True, exist_ok=True)
    md = to_markdown(res)
    (results / "results.md").write_text(md)
    (results / "results.json").write_text(json.dumps(res, indent=2))
    if res["speed"]:
        plot(res, results / "decode_time.png")
    print(md)
    print(f"written: {results}/results.md, results.json" + (", decode_time.png" if res["speed"] else ""))


if __name__ == "__main__":
    main()
