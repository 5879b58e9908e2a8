"""The benchmark runs in its tiny configuration and writes well-formed output (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest

from t2r_fairseq import bench
from t2r_fairseq.bench.report import generation_ms


def test_bench_tiny_writes_tables_json_and_plot(tmp_path):
    res = bench.main(["--tiny", "--out", str(tmp_path), "--threads", "1", "--compare-unfused", "--compare-qk"])
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(res))
    rows = {(r["task"], r["model"], r["batch"], r["context"]): r for r in res["decode"]}
    assert set(rows) == {(t, m, b, c) for t in ("lm", "mt") for m in ("softmax", "t2r", "t2r_qk", "t2r_unfused", "no_attention")
                         for b in (1, 2) for c in (8, 32)}
    for r in res["decode"]:
        assert r["median_ms"] > 0 and r["spread_ms"] >= 0 and math.isfinite(r["tokens_per_s"])
        assert r["peak_mem_mib"] > 0 and r["peak_is_per_row"]  # Linux: each row has its own peak window
        assert r["source_length"] == (r["context"] if r["task"] == "mt" else 0)

    def state(task, model, batch, ctx):
        return rows[(task, model, batch, ctx)]["state_bytes"]

    # The KV cache grows with the context (MT: self KV + the source's KV, both 4x); the T2R state does not.
    layers, dim = 2, 32
    for task in ("lm", "mt"):
        assert state(task, "softmax", 1, 32) == 4 * state(task, "softmax", 1, 8)
        assert state(task, "t2r", 1, 32) == state(task, "t2r", 1, 8) > 0
        assert state(task, "t2r", 2, 8) == 2 * state(task, "t2r", 1, 8)
        assert state(task, "no_attention", 1, 32) == 0
        assert state(task, "t2r_unfused", 2, 32) == state(task, "t2r", 2, 32)
        assert state(task, "t2r_qk", 2, 32) == state(task, "t2r", 2, 32)  # untying q/k leaves the state as it is
    assert state("lm", "softmax", 1, 8) == layers * 2 * 8 * dim * 4  # K and V, fp32
    assert state("mt", "softmax", 1, 8) == 2 * state("lm", "softmax", 1, 8)
    # self (S, z) with --feature-size 8, plus the cross-attention's (S, z) with the plugin's default 128 features
    heads, head_dim = 4, 8
    assert state("mt", "t2r", 1, 8) == state("lm", "t2r", 1, 8) + layers * heads * 128 * (head_dim + 1) * 4

    variants = {r["variant"] for r in res["train"]}
    assert variants >= {"chunkwise", "sdpa_softmax", "naive_quadratic", "chunkwise_c16", "chunkwise_c32"}
    assert all(r["saved_activation_bytes"] > 0 for r in res["train"] if r["variant"] != "sdpa_softmax")
    summary = res["summary"]
    assert all(math.isfinite(v) for v in summary.values())
    for key in ("lm_b2_t2r_over_attention_free_ctx32", "mt_b1_t2r_unfused_over_attention_free_ctx8", "mt_b1_kv_cache_over_t2r_state_ctx32",
                "mt_b2_t2r_over_softmax_tokens_per_s_generating_32", "lm_b1_t2r_qk_step_over_t2r_ctx8", "train_chunkwise_speedup_vs_sdpa_L128"):
        assert key in summary
    md = (tmp_path / "results.md").read_text()
    assert "| mt | t2r | eager | 2 | 32 | 32 |" in md and "| chunkwise_c16 | 128 |" in md
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_generation_time_integrates_the_step_time_over_the_context():
    rows = [{"task": "lm", "model": "m", "batch": 1, "context": c, "median_ms": t} for c, t in ((10, 1.0), (30, 3.0))]
    # 10 tokens at 1 ms, then 20 tokens ramping linearly 1 -> 3 ms: 10 + 40
    assert generation_ms(rows, "lm", "m", 1, 30) == pytest.approx(50.0)
    assert generation_ms(rows, "lm", "m", 1, 20) == pytest.approx(10 + 10 * 1.5)
    assert generation_ms(rows, "lm", "m", 1, 5) == pytest.approx(5.0)
    assert generation_ms(rows, "lm", "m", 1, 31) is None  # beyond what was measured: no extrapolation


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cuda"], "sees no CUDA device"),
        (["--device", "gpu0"], "is not a device"),
        (["--dtype", "bfloat16"], "CPU runs are float32"),
        (["--contexts", "64,x"], "comma-separated integers"),
        (["--tasks", "lm,asr"], "lm and/or mt"),
        (["--dim", "30", "--heads", "4"], "divisible"),
        (["--cross-feature-size", "-1"], "--cross-feature-size >= 0"),
    ],
)
def test_bench_refuses_bad_configuration_before_running(tmp_path, capsys, argv, message):
    if argv[:2] == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as err:
        bench.main(["--tiny", "--out", str(tmp_path / "out"), *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_topk_decode_rows_keep_a_kv_cache(tmp_path):
    res = bench.main(["--tiny", "--out", str(tmp_path), "--threads", "1", "--skip", "train", "--topk-decode-k", "4"])
    rows = {(r["task"], r["model"], r["batch"], r["context"]): r for r in res["decode"]}
    for task in ("lm", "mt"):
        for ctx in (8, 32):  # top-k reads the same KV cache as softmax: the same state, growing with the context
            assert rows[(task, "topk_k4", 1, ctx)]["state_bytes"] == rows[(task, "softmax", 1, ctx)]["state_bytes"]
            assert rows[(task, "topk_k4", 1, ctx)]["median_ms"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--out", str(tmp_path), "--topk-decode-k", "-1"])


def test_bench_cross_feature_size_rows_time_the_larger_cross_attention_map(tmp_path):
    res = bench.main(["--tiny", "--out", str(tmp_path), "--threads", "1", "--skip", "train", "--cross-feature-size", "16"])
    rows = {(r["task"], r["model"], r["batch"], r["context"]): r for r in res["decode"]}
    assert {k for k in rows if k[1] == "t2r_xk16"} == {("mt", "t2r_xk16", b, c) for b in (1, 2) for c in (8, 32)}
    # Only the cross-attention's (S, z) differs from the t2r row's (the plugin's default, 128 features): per layer
    # and head, 16 - 128 features of (head dim + 1) fp32 values.
    layers, heads, head_dim = 2, 4, 8
    for b in (1, 2):
        extra = rows[("mt", "t2r_xk16", b, 32)]["state_bytes"] - rows[("mt", "t2r", b, 32)]["state_bytes"]
        assert extra == b * layers * heads * (16 - 128) * (head_dim + 1) * 4
        assert rows[("mt", "t2r_xk16", b, 32)]["state_bytes"] == rows[("mt", "t2r_xk16", b, 8)]["state_bytes"]
    summary = res["summary"]
    assert summary["mt_b1_t2r_xk16_step_over_t2r_ctx32"] > 0 and "mt_b2_t2r_xk16_step_speedup_vs_softmax_ctx8" in summary
    assert "| mt | t2r_xk16 | eager | 1 | 8 | 8 |" in (tmp_path / "results.md").read_text()


def test_bench_static_paths_and_memory_budget_rows(tmp_path):
    """--decode-steps graph: T2R (generation's runner), softmax (static KV cache) and the bound get a static row
    beside eager; kinds without one stay eager. --memory-budget-gib: the largest batch whose state fits."""
    budget = 0.0001  # GiB: a few sequences of the tiny models
    res = bench.main(["--tiny", "--out", str(tmp_path), "--threads", "1", "--skip", "train", "--compare-unfused",
                      "--decode-steps", "eager,graph", "--memory-budget-gib", str(budget), "--budget-contexts", "32"])
    grid = [r for r in res["decode"] if "budget_gib" not in r]
    paths = {(r["task"], r["model"]): set() for r in grid}
    for r in grid:
        paths[(r["task"], r["model"])].add(r["path"])
    for task in ("lm", "mt"):
        assert paths[(task, "t2r")] == paths[(task, "softmax")] == paths[(task, "no_attention")] == {"eager", "graph"}
        assert paths[(task, "t2r_unfused")] == {"eager"}
        for model in ("t2r", "softmax"):
            rows = [r for r in res["decode"] if r.get("budget_gib") == budget and (r["task"], r["model"]) == (task, model)]
            assert {r["path"] for r in rows} == {"eager", "graph"}
            per_sequence = next(r for r in grid if (r["task"], r["model"], r["batch"], r["context"], r["path"])
                                == (task, model, 1, 32, "eager"))["state_bytes"]
            assert all(r["batch"] == min(int(budget * 2**30 // per_sequence), 4096) for r in rows)
            assert all(r["state_bytes"] <= budget * 2**30 for r in rows)
        t2r_batch = next(r["batch"] for r in res["decode"] if r.get("budget_gib") and (r["task"], r["model"]) == (task, "t2r"))
        sm_batch = next(r["batch"] for r in res["decode"] if r.get("budget_gib") and (r["task"], r["model"]) == (task, "softmax"))
        if task == "lm":  # (tiny MT: the 128-feature cross state outweighs a 32-token source's KV)
            assert t2r_batch > sm_batch  # the constant state fits more sequences
        summary = res["summary"]
        assert f"{task}_b2_best_t2r_over_attention_free_ctx32" in summary
        assert f"{task}_budget{budget:g}GiB_ctx32_t2r_tokens_per_s_over_softmax" in summary
    assert "| lm | softmax | graph | 2 | 32 |" in (tmp_path / "results.md").read_text()


def test_static_kv_softmax_equals_fairseq_kv_cache_step():
    """The benchmark's softmax opponent computes fairseq's softmax step: same cache contents, same logits."""
    import argparse
    import copy

    import torch

    from t2r_fairseq.bench.decode import build_model, prefill_state
    from t2r_fairseq.bench.static_decode import StaticHarness, use_static_kv_cache

    cfg = argparse.Namespace(vocab=40, dim=16, heads=2, layers=2, feature_size=4, cross_feature_size=0,
                             sliding_window=0, topk_decode_k=0)
    torch.manual_seed(0)
    model = build_model("lm", "softmax", cfg, 64)
    batch, context = 3, 9
    state = prefill_state(model, "softmax", batch, context)
    tokens = torch.randint(4, cfg.vocab, (batch, context + 1))
    static = copy.deepcopy(model)
    use_static_kv_cache(static, batch, context, 0)
    for layer, fair in zip(static.decoder.layers, model.decoder.layers):
        buffer = fair.self_attn._get_input_buffer(state)
        layer.self_attn.k_cache[:, :, :context].copy_(buffer["prev_key"])
        layer.self_attn.v_cache[:, :, :context].copy_(buffer["prev_value"])
    with torch.no_grad():
        want, _ = model.decoder(tokens, incremental_state=state)
        got = StaticHarness(static, "graph", batch).step(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
