"""Generation's static decode step (``--decode-step``) against fairseq's eager decoder, the oracle.

Everything here runs on CPU: the static buffers, the beam reorder and finished-hypothesis shrink as index copies
into them, the padding rows of power-of-two buckets, and torch.compile's step. The CUDA-graph capture itself runs
only where CUDA is (``test_graph_capture_on_cuda``, skipped here; ``scripts/gpu_check.sh`` runs it).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from helpers import build_lm, build_mt, random_tokens
from t2r_fairseq.models.config import T2ROptionError
from t2r_fairseq.modules.decode_step import AUTO_DECODE_STEP, StaticDecodeRunner, resolve_decode_step


def _pair(model, mode: str):
    """The model with the eager step and a deep copy with ``mode`` (same weights)."""
    model.make_generation_fast_()  # as fairseq-generate, -interactive and the hub API prepare a model
    for module in model.decoder.modules():  # the runner's source layout, so that the states compare name by name
        if getattr(module, "encoder_decoder_attention", False):
            module.source_form = "summary"
    other = copy.deepcopy(model)
    other.decoder.set_decode_step(mode)
    model.decoder.set_decode_step("eager")
    return model, other


def _encoder_out(model, dictionary, batch: int, seed: int):
    src = random_tokens(dictionary, batch, 7, seed)
    src[0, :3] = dictionary.pad()  # left padding, as fairseq batches sources
    src[:, -1] = dictionary.eos()
    lengths = src.ne(dictionary.pad()).sum(1)
    return model.encoder(src, src_lengths=lengths)


@pytest.mark.parametrize("task", ["lm", "mt"])
@pytest.mark.parametrize("bucketed", [False, True])
@torch.no_grad()
def test_static_step_equals_eager_through_reorders_and_shrinks(tmp_path, task, bucketed):
    """Step by step, the same calls into two copies of the model: logits equal at every step, through beam
    reorders (rows swapped), finished hypotheses (the batch shrinks) and padded target tokens."""
    _, t, model = (build_lm(tmp_path) if task == "lm" else build_mt(tmp_path))
    eager, static = _pair(model, "graph")  # uncaptured on CPU: the static step itself
    d = t.target_dictionary
    batch = 6
    enc_e = _encoder_out(eager, t.source_dictionary, batch, 1) if task == "mt" else None
    enc_s = _encoder_out(static, t.source_dictionary, batch, 1) if task == "mt" else None
    tokens = random_tokens(d, batch, 12, seed=2)
    tokens[:, 0] = d.eos()
    tokens[1, 3] = d.pad()  # a padded target position mid-sequence
    state_e: dict = {}
    state_s: dict = {}
    orders = {3: torch.tensor([1, 0, 2, 2, 5, 4]), 5: torch.tensor([0, 2, 3, 5]), 8: torch.tensor([3, 1, 1])}
    for step in range(tokens.size(1)):
        prefix = tokens[:, : step + 1]
        out_e, _ = eager.decoder(prefix, encoder_out=enc_e, incremental_state=state_e)
        out_s, _ = static.decoder(prefix, encoder_out=enc_s, incremental_state=state_s)
        torch.testing.assert_close(out_s, out_e, rtol=0, atol=1e-5)
        if step == 0:
            runner = static.decoder.static_runner
            assert runner is not None  # built, but the first step (no recurrent state yet) ran eagerly
            runner.bucketed = bucketed
        else:
            assert runner.owns(state_s)
        order = orders.get(step)
        if order is not None:
            tokens = tokens.index_select(0, order)
            eager.decoder.reorder_incremental_state_scripting(state_e, order)
            static.decoder.reorder_incremental_state_scripting(state_s, order)
            if enc_e is not None:
                enc_e = eager.encoder.reorder_encoder_out(enc_e, order)
                enc_s = static.encoder.reorder_encoder_out(enc_s, order)
    capacities = sorted(runner._buckets)
    assert capacities == ([4] if bucketed else [3])  # the live rows of the last batch, in its bucket
    # the user's incremental state holds the live state: views of the static buffers, equal to eager's
    for key, buffer in state_e.items():
        for name, value in buffer.items():
            torch.testing.assert_close(state_s[key][name], value, rtol=0, atol=1e-5)


def _generate(model, task, dictionary, sample, **kw):
    gen = SequenceGenerator([model], dictionary, **kw)
    hyps = gen.generate([model], sample, prefix_tokens=sample["net_input"]["src_tokens"][:, :2] if task == "lm" else None)
    return [[(h["tokens"].tolist(), float(h["score"]), h["positional_scores"]) for h in sent] for sent in hyps]


def _sample(t, task, batch=5):
    d = t.source_dictionary
    if task == "lm":
        src = random_tokens(d, batch, 4, seed=3)
    else:
        src = random_tokens(d, batch, 7, seed=3)
        src[1, :2] = d.pad()
        src[:, -1] = d.eos()
    return {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)}}


def _assert_same_hypotheses(a, b):
    assert len(a) == len(b)
    for sent_a, sent_b in zip(a, b):
        assert [h[0] for h in sent_a] == [h[0] for h in sent_b]
        for ha, hb in zip(sent_a, sent_b):
            torch.testing.assert_close(hb[2], ha[2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("task", ["lm", "mt"])
@torch.no_grad()
def test_beam_search_equal_with_finished_hypotheses(tmp_path, task):
    """fairseq's SequenceGenerator, beam 3: the same hypotheses and scores with the static step. EOS is made likely
    so that sentences finish at different steps and the generator shrinks the batch under the runner."""
    _, t, model = (build_lm(tmp_path) if task == "lm" else build_mt(tmp_path))
    with torch.no_grad():
        model.decoder.output_projection.weight[t.target_dictionary.eos()] *= 4
    eager, static = _pair(model, "graph")
    sample = _sample(t, task)
    kw = dict(beam_size=3, max_len_b=14, min_len=2)
    want = _generate(eager, task, t.target_dictionary, sample, **kw)
    got = _generate(static, task, t.target_dictionary, sample, **kw)
    lengths = {len(h[0]) for sent in want for h in sent[:1]}
    assert len(lengths) > 1, "every sentence finished at the same step: the shrink was not exercised"
    _assert_same_hypotheses(want, got)
    # A second batch reuses the runner: the first generation's buffers are handed over, results stay equal.
    _assert_same_hypotheses(want, _generate(static, task, t.target_dictionary, sample, **kw))


@pytest.mark.slow
@torch.no_grad()
def test_compiled_step_equals_eager(tmp_path):
    """torch.compile's step (inductor's CPU code here) through a beam search with finished hypotheses."""
    _, t, model = build_mt(tmp_path)
    with torch.no_grad():
        model.decoder.output_projection.weight[t.target_dictionary.eos()] *= 4
    eager, compiled = _pair(model, "compile")
    sample = _sample(t, "mt", batch=3)
    kw = dict(beam_size=2, max_len_b=8, min_len=2)
    _assert_same_hypotheses(_generate(eager, "mt", t.target_dictionary, sample, **kw),
                            _generate(compiled, "mt", t.target_dictionary, sample, **kw))
    assert compiled.decoder.static_runner is not None and compiled.decoder.static_runner.mode == "compile"


@torch.no_grad()
def test_hybrid_falls_back_to_eager_with_a_warning(tmp_path, caplog):
    """The sliding-window hybrid's ring buffer shifts: the static step refuses it, generation stays eager."""
    _, t, model = build_lm(tmp_path, extra=["--sliding-window", "2"])
    eager, static = _pair(model, "graph")
    sample = _sample(t, "lm")
    with caplog.at_level(logging.WARNING):
        got = _generate(static, "lm", t.target_dictionary, sample, beam_size=2, max_len_b=6)
    assert static.decoder.static_runner is None
    assert any("SlidingWindowAttention" in r.message and "eager" in r.message for r in caplog.records)
    _assert_same_hypotheses(_generate(eager, "lm", t.target_dictionary, sample, beam_size=2, max_len_b=6), got)


@torch.no_grad()
def test_training_and_scoring_stay_eager(tmp_path):
    """Only a plain generation step (eval, no grad, incremental) is routed; a full-sequence forward never is."""
    _, t, model = build_lm(tmp_path)
    model.decoder.set_decode_step("graph")
    tokens = random_tokens(t.target_dictionary, 2, 5)
    model.decoder(tokens)  # scoring: no incremental state
    assert model.decoder.static_runner is None
    state: dict = {}
    model.decoder(tokens[:, :1], incremental_state=state)
    model.decoder(tokens[:, :2], incremental_state=state, features_only=True)  # hub extract_features: eager
    assert model.decoder.static_runner is not None and not model.decoder.static_runner.owns(state)


def test_bad_decode_step_is_one_line(tmp_path):
    """A bad value (e.g. from --model-overrides, which skips argparse's choices) fails when the model is built."""
    args, t, _ = build_lm(tmp_path)
    args.decode_step = "bogus"
    with pytest.raises(T2ROptionError, match=r"--decode-step must be one of .*compile_graph, got .bogus."):
        t.build_model(args)


def test_auto_is_the_measured_choice():
    """``auto`` resolves per device from one table (eager everywhere until a GPU run measured otherwise)."""
    assert resolve_decode_step("auto", torch.device("cpu")) == AUTO_DECODE_STEP["cpu"]
    assert resolve_decode_step("auto", torch.device("cuda")) == AUTO_DECODE_STEP["cuda"]
    assert resolve_decode_step("compile_graph", torch.device("cpu")) == "compile_graph"
    with pytest.raises(ValueError):
        StaticDecodeRunner(torch.nn.Linear(2, 2), "eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.25)])
@pytest.mark.parametrize("mode", ["graph", "compile_graph"])
@torch.no_grad()
def test_graph_capture_on_cuda(tmp_path, dtype, atol, mode):
    """The captured step equals the eager one on CUDA (fp32 <= 1e-5; bf16 within bf16's resolution of the logits),
    through beam search with finished hypotheses, two batches (the second replays the first's graphs)."""
    _, t, model = build_mt(tmp_path)
    with torch.no_grad():
        model.decoder.output_projection.weight[t.target_dictionary.eos()] *= 4
    model = model.cuda().to(dtype)
    eager, captured = _pair(model, mode)
    sample = _sample(t, "mt")
    sample = {"net_input": {k: v.cuda() for k, v in sample["net_input"].items()}}
    kw = dict(beam_size=3, max_len_b=14, min_len=2)
    want = _generate(eager, "mt", t.target_dictionary, sample, **kw)
    for _ in range(2):
        got = _generate(captured, "mt", t.target_dictionary, sample, **kw)
        if dtype == torch.float32:
            _assert_same_hypotheses(want, got)
        else:  # bf16: near-ties may flip a beam; the best hypothesis' scores stay within bf16 resolution
            for sw, sg in zip(want, got):
                if sw[0][0] == sg[0][0]:
                    torch.testing.assert_close(sg[0][2].float(), sw[0][2].float(), rtol=0, atol=atol)
    runner = captured.decoder.static_runner
    assert runner.capture and all(b.graph is not None for b in runner._buckets.values())


def test_decode_step_override_reaches_checkpoints_older_than_the_option(tmp_path):
    """fairseq drops --model-overrides keys a dataclass config lacks; --decode-step must still reach a T2R LM
    checkpoint written before the option existed (and nothing else unknown may be added)."""
    from fairseq import checkpoint_utils

    import t2r_fairseq  # noqa: F401  (installs the wrapper)

    def save(path, name):  # the fields fairseq's reader upgrades, as fairseq-train writes them
        history = [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqAdam", "best_loss": None,
                    "lr_scheduler_state": {"best": None}, "num_updates": 0}]
        torch.save({"cfg": {"model": {"_name": name, "feature_size": 8}}, "model": {}, "args": None,
                    "optimizer_history": history, "extra_state": {"epoch": 1}}, path)

    path = tmp_path / "old.pt"
    save(path, "t2r_transformer_lm")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path), {"decode_step": "graph", "not_an_option": 1})
    assert state["cfg"]["model"]["decode_step"] == "graph" and "not_an_option" not in state["cfg"]["model"]
    softmax = tmp_path / "softmax.pt"
    save(softmax, "transformer_lm")
    assert "decode_step" not in checkpoint_utils.load_checkpoint_to_cpu(str(softmax), {"decode_step": "graph"})["cfg"]["model"]
