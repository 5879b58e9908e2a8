"""The benchmark runs in its tiny configuration and writes well-formed output (no timing assertions)."""

from __future__ import annotations

import json
import math

from t2r_fairseq import bench


def test_bench_tiny_writes_tables_json_and_plot(tmp_path):
    bench.main(["--tiny", "--out", str(tmp_path), "--threads", "1"])
    res = json.loads((tmp_path / "results.json").read_text())
    models = {(r["model"], r["batch"], r["context"]) for r in res["decode"]}
    assert models == {(m, b, c) for m in ("softmax", "t2r", "no_attention") for b in (1, 2) for c in (8, 32)}
    for r in res["decode"]:
        assert r["median_ms"] > 0 and math.isfinite(r["tokens_per_s"])
    # The KV cache grows with the context; the T2R state does not.
    kv = {r["context"]: r["state_bytes"] for r in res["decode"] if r["model"] == "softmax" and r["batch"] == 1}
    rnn = {r["context"]: r["state_bytes"] for r in res["decode"] if r["model"] == "t2r" and r["batch"] == 1}
    assert kv[32] == 4 * kv[8] and rnn[32] == rnn[8] > 0
    assert {r["variant"] for r in res["train"]} >= {"chunkwise", "sdpa_softmax", "naive_quadratic", "chunkwise_c16"}
    assert all(math.isfinite(v) for v in res["summary"].values()) and "train_chunkwise_speedup_vs_sdpa_L128" in res["summary"]
    assert "| t2r | 2 | 32 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 1000
