"""Ratios the targets are stated in, and the Markdown / JSON / PNG outputs of a benchmark run.

Every ratio divides two figures of the same run (same machine, load and threads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional


def _pick(rows: List[dict], **match: object) -> Optional[dict]:
    """The first grid row (not a memory-budget row) matching ``match``; the eager path unless ``path`` is given."""
    match = {"path": "eager", **match}
    return next((r for r in rows if "budget_gib" not in r and all(r.get(k, "eager") == v for k, v in match.items())),
                None)


def best_rows(rows: List[dict]) -> Dict[tuple, dict]:
    """Per (task, model, batch, context, budget or None): the row of the fastest path."""
    best: Dict[tuple, dict] = {}
    for r in rows:
        key = (r["task"], r["model"], r["batch"], r["context"], r.get("budget_gib"))
        if key not in best or r["median_ms"] < best[key]["median_ms"]:
            best[key] = r
    return best


def best_path_ratios(decode: List[dict]) -> Dict[str, float]:
    """Best path against best path (docs/BENCHMARKS.md, "Decode paths"): T2R over the attention-free bound per step,
    and T2R's tokens/s over softmax's, on the grid and at the memory budget (each side at its own largest batch)."""
    out: Dict[str, float] = {}
    best = best_rows(decode)
    for (task, model, batch, context, budget), r in sorted(best.items(), key=lambda kv: str(kv[0])):
        if model != "t2r":
            continue
        if budget is None:
            bound = best.get((task, "no_attention", batch, context, None))
            sm = best.get((task, "softmax", batch, context, None))
            p = f"{task}_b{batch}_best"
            if bound:
                out[f"{p}_t2r_over_attention_free_ctx{context}"] = r["median_ms"] / bound["median_ms"]
            if sm:
                out[f"{p}_t2r_tokens_per_s_over_softmax_ctx{context}"] = r["tokens_per_s"] / sm["tokens_per_s"]
        else:
            sm = next((s for (t, m, _, c, b), s in best.items() if (t, m, c, b) == (task, "softmax", context, budget)), None)
            if sm:
                out[f"{task}_budget{budget:g}GiB_ctx{context}_t2r_tokens_per_s_over_softmax"] = (
                    r["tokens_per_s"] / sm["tokens_per_s"])
    return out


def generation_ms(rows: List[dict], task: str, model: str, batch: int, tokens: int, path: str = "eager") -> Optional[float]:
    """Time to generate ``tokens`` tokens one by one: the step time integrated over the context.

    Step times are measured at a few contexts; between them the step time is
    interpolated linearly (trapezoids), and below the shortest measured context
    it is taken as constant. None when ``tokens`` exceeds the measured contexts.
    """
    pts = sorted((r["context"], r["median_ms"]) for r in rows
                 if r["task"] == task and r["model"] == model and r["batch"] == batch
                 and r.get("path", "eager") == path and "budget_gib" not in r)
    if not pts or tokens > pts[-1][0]:
        return None
    total = min(tokens, pts[0][0]) * pts[0][1]
    for (c1, t1), (c2, t2) in zip(pts, pts[1:]):
        if c1 >= tokens:
            break
        c_end = min(c2, tokens)
        t_end = t1 + (t2 - t1) * (c_end - c1) / (c2 - c1)
        total += (c_end - c1) * (t1 + t_end) / 2
    return total


def summarise(decode: List[dict], train: List[dict], cfg) -> Dict[str, float]:  # noqa: ANN001 - argparse namespace
    """The figures the speed targets are stated in (docs/BENCHMARKS.md, "Targets"), keyed by a self-describing name."""
    out: Dict[str, float] = {}
    lo, hi = min(cfg.contexts), max(cfg.contexts)
    mid = max([c for c in cfg.contexts if c <= 4096] or [hi])  # the targets' "context 4096" where measured
    gen = sorted({c for c in (2048, hi) if c in cfg.contexts})
    for task in cfg.tasks:
        for b in cfg.batches:
            p = f"{task}_b{b}"

            def ms(model: str, ctx: int) -> Optional[float]:
                r = _pick(decode, task=task, model=model, batch=b, context=ctx)
                return r["median_ms"] if r else None

            t2r_lo, t2r_mid, sm_mid = ms("t2r", lo), ms("t2r", mid), ms("softmax", mid)
            if None in (t2r_lo, t2r_mid, sm_mid):
                continue
            out[f"{p}_t2r_step_ctx{mid}_over_ctx{lo}"] = t2r_mid / t2r_lo
            out[f"{p}_t2r_step_speedup_vs_softmax_ctx{mid}"] = sm_mid / t2r_mid
            for ctx in cfg.contexts:
                bound, unfused = ms("no_attention", ctx), ms("t2r_unfused", ctx)
                if bound:
                    out[f"{p}_t2r_over_attention_free_ctx{ctx}"] = ms("t2r", ctx) / bound
                if bound and unfused:
                    out[f"{p}_t2r_unfused_over_attention_free_ctx{ctx}"] = unfused / bound
            hybrid = f"t2r_hybrid_w{getattr(cfg, 'sliding_window', 0)}"
            if ms(hybrid, mid):
                out[f"{p}_{hybrid}_step_over_t2r_ctx{mid}"] = ms(hybrid, mid) / t2r_mid
            xk = f"t2r_xk{getattr(cfg, 'cross_feature_size', 0)}"
            for ctx in cfg.contexts:  # what the larger cross-attention map costs per step, at each length
                if ms(xk, ctx) and ms("t2r", ctx):
                    out[f"{p}_{xk}_step_over_t2r_ctx{ctx}"] = ms(xk, ctx) / ms("t2r", ctx)
                if ms(xk, ctx) and ms("softmax", ctx):
                    out[f"{p}_{xk}_step_speedup_vs_softmax_ctx{ctx}"] = ms("softmax", ctx) / ms(xk, ctx)
                if ms("t2r_qk", ctx) and ms("t2r", ctx):  # untied q/k maps: same shapes, so ~1.0
                    out[f"{p}_t2r_qk_step_over_t2r_ctx{ctx}"] = ms("t2r_qk", ctx) / ms("t2r", ctx)
            kv = _pick(decode, task=task, model="softmax", batch=b, context=mid)
            rnn = _pick(decode, task=task, model="t2r", batch=b, context=mid)
            out[f"{p}_kv_cache_over_t2r_state_ctx{mid}"] = kv["state_bytes"] / max(rnn["state_bytes"], 1)
            for n in gen:
                sm, t2r = generation_ms(decode, task, "softmax", b, n), generation_ms(decode, task, "t2r", b, n)
                if sm and t2r:
                    out[f"{p}_t2r_over_softmax_tokens_per_s_generating_{n}"] = sm / t2r
    if any(r.get("path", "eager") != "eager" or "budget_gib" in r for r in decode):
        out.update(best_path_ratios(decode))
    for L in cfg.train_lengths:
        sd = _pick(train, variant="sdpa_softmax", length=L)
        for variant in ("chunkwise", "fla_chunk", f"topk_k{getattr(cfg, 'topk_k', 0)}"):
            ck = _pick(train, variant=variant, length=L)
            if sd and ck:
                out[f"train_{variant}_speedup_vs_sdpa_L{L}"] = sd["median_ms"] / ck["median_ms"]
    return out


def write_report(res: dict, out: Path) -> None:
    """``results.json`` (everything), ``results.md`` (tables) and ``bench.png`` (plots) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    mem = "peak GPU MiB" if res["config"]["device"].startswith("cuda") else "peak RSS MiB"
    lines = [f"# Benchmark results\n\nCommand: `{res['command']}`  \nMachine: {res['machine']}\n"]
    if res["decode"]:
        lines += ["## Decode (one incremental step; median of repeats)\n",
                  "Path: eager = fairseq's forward (KV cache / recurrent step); compile, graph, compile_graph = the "
                  "static step (T2R: generation's --decode-step runner; softmax: SDPA over a static KV cache; graph "
                  "is captured on CUDA only). Budget: the largest batch whose state fits that many GiB.\n",
                  f"| task | model | path | batch | context | source | ms/step | spread ms | tokens/s | state MiB | "
                  f"{mem} | budget |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["decode"]:
            budget = f"{r['budget_gib']:g} GiB" + (" (capped)" if r.get("budget_capped") else "") if "budget_gib" in r else "-"
            lines.append(f"| {r['task']} | {r['model']} | {r.get('path', 'eager')} | {r['batch']} | {r['context']} | "
                         f"{r['source_length'] or '-'} | {r['median_ms']:.2f} | {r['spread_ms']:.2f} | "
                         f"{r['tokens_per_s']:.0f} | {r['state_bytes'] / 2**20:.3f} | {r['peak_mem_mib']:.0f} | {budget} |")
    if res["train"]:
        lines += ["", "## Training (attention core, forward + backward)\n",
                  f"| variant | L | ms | spread ms | saved activations MiB | {mem} |", "|---|---|---|---|---|---|"]
        for r in res["train"]:
            lines.append(f"| {r['variant']} | {r['length']} | {r['median_ms']:.2f} | {r['spread_ms']:.2f} | "
                         f"{r['saved_activation_bytes'] / 2**20:.1f} | {r['peak_mem_mib']:.0f} |")
    if res["summary"]:
        lines += ["", "## Ratios (same run)\n", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in res["summary"].items()]
    lines += ["", f"Peak resident memory of the benchmark process: {res['peak_rss_mib']:.0f} MiB"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plots(res, out)


def _plots(res: dict, out: Path) -> None:
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in res["decode"]})
    panels = [("decode", t) for t in tasks] + [("state", None)] * bool(tasks) + [("train", None)] * bool(res["train"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    styles = {"softmax": "C0", "t2r": "C1", "no_attention": "C2", "t2r_unfused": "C3", "t2r_qk": "C6"}  # colour per model, line style per batch
    styles.update({m: "C5" for m in {r["model"] for r in res["decode"]} if m.startswith("t2r_xk")})
    styles.update({m: "C4" for m in {r["model"] for r in res["decode"]} if m.startswith("t2r_hybrid")})
    for ax, (panel, task) in zip(axes[0], panels):
        if panel == "decode":
            for b, dash in zip(sorted({r["batch"] for r in res["decode"]}), ["-", "--", ":", "-."] * 8):
                for model, colour in styles.items():
                    for path, marker in zip(("eager", "compile", "graph", "compile_graph"), "osD^"):
                        pts = [(r["context"], r["median_ms"]) for r in res["decode"]
                               if r["task"] == task and r["batch"] == b and r["model"] == model
                               and r.get("path", "eager") == path and "budget_gib" not in r]
                        if pts:
                            ax.plot(*zip(*pts), dash, color=colour, marker=marker, label=f"{model} {path}, batch {b}")
            ax.set(xscale="log", yscale="log", xlabel="context length", ylabel="ms per decode step",
                   title=f"Decode step time ({task.upper()})")
        elif panel == "state":
            for model in ["softmax", "t2r"] + sorted(m for m in styles if m.startswith(("t2r_hybrid", "t2r_xk"))):
                for task_, dash in zip(tasks, ["-", "--"]):
                    pts = [(r["context"], r["state_bytes"] / 2**20) for r in res["decode"]
                           if r["task"] == task_ and r["model"] == model and r["batch"] == min(res["config"]["batches"])]
                    if pts:
                        ax.plot(*zip(*pts), dash, color=styles[model], marker="o", label=f"{model} {task_.upper()}")
            ax.set(xscale="log", yscale="log", xlabel="context length", ylabel="MiB per sequence batch",
                   title=f"Decode state (batch {min(res['config']['batches'])})")
        else:
            for variant in sorted({r["variant"] for r in res["train"] if "_c" not in r["variant"]}):
                pts = [(r["length"], r["median_ms"]) for r in res["train"] if r["variant"] == variant]
                ax.plot(*zip(*pts), marker="o", label=variant)
            ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms fwd+bwd",
                   title="Training attention core")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)
