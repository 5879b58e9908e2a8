"""Shatter through fairseq: masked-LM (fairseq-train / fairseq-validate / hub) and translation encoders
(fairseq-train / fairseq-generate), option checks at build time. Tiny data made here (about 40 s on 2 cores)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import MT_ARCH, TRAIN, USER_DIR, build, build_mt, random_tokens, run, write_corpus, write_dict

MLM_ARCH = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
            "--encoder-attention-heads", "4"]
MLM_TASK = ["--task", "masked_lm", "--criterion", "masked_lm", "--tokens-per-sample", "32", *MLM_ARCH]
MT_TASK = ["--task", "translation", "--share-all-embeddings", *MT_ARCH, "--criterion", "label_smoothed_cross_entropy",
           "--label-smoothing", "0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shatter")
    for split, n, seed in [("train", 120, 1), ("valid", 30, 2), ("test", 12, 3)]:
        write_corpus(root / f"lm.{split}", n, seed)
        write_corpus(root / f"mt.{split}.src", n, seed + 10)
        (root / f"mt.{split}.tgt").write_text(
            "".join(" ".join(reversed(l.split())) + "\n" for l in (root / f"mt.{split}.src").read_text().splitlines()))
    run("fairseq-preprocess", "--only-source", "--trainpref", root / "lm.train", "--validpref", root / "lm.valid",
        "--destdir", root / "bin-mlm", "--workers", "1")
    run("fairseq-preprocess", "-s", "src", "-t", "tgt", "--joined-dictionary", "--trainpref", root / "mt.train",
        "--validpref", root / "mt.valid", "--testpref", root / "mt.test", "--destdir", root / "bin-mt", "--workers", "1")
    return root


@pytest.mark.slow
def test_masked_lm_train_validate_and_hub(data):
    save = data / "mlm"
    out = run("fairseq-train", data / "bin-mlm", "--user-dir", USER_DIR, *MLM_TASK, "--arch", "shatter_roberta_small",
              "--shatter-score", "softmax", *TRAIN, "--max-update", "4", "--save-dir", save)
    text = out.stdout + out.stderr
    assert "num_updates 4" in text and "ShatterAttention" in text, text[-2000:]
    val = run("fairseq-validate", data / "bin-mlm", "--user-dir", USER_DIR, "--task", "masked_lm", "--criterion",
              "masked_lm", "--tokens-per-sample", "32", "--path", save / "checkpoint_last.pt", "--cpu",
              "--max-tokens", "2048")
    loss = float(re.search(r"valid on 'valid' subset \| loss ([\d.]+)", val.stdout + val.stderr).group(1))
    assert 0 < loss < 20

    from t2r_fairseq.models.shatter_roberta import ShatterRobertaModel

    hub = ShatterRobertaModel.from_pretrained(str(save), "checkpoint_last.pt", str(data / "bin-mlm"), bpe=None)
    tokens = hub.task.source_dictionary.encode_line("w1 w2 w3 w4", append_eos=True).long()
    features = hub.extract_features(tokens)
    assert features.shape == (1, 5, 32) and torch.isfinite(features).all()


@pytest.mark.slow
def test_translation_shatter_encoder_with_t2r_decoder_train_and_generate(data):
    save = data / "mt"
    run("fairseq-train", data / "bin-mt", "--user-dir", USER_DIR, *MT_TASK, "--arch", "t2r_transformer",
        "--encoder-attention", "shatter", "--feature-size", "8", *TRAIN, "--max-update", "4", "--save-dir", save)
    gen = run("fairseq-generate", data / "bin-mt", "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
              "--beam", "2", "--cpu", "--max-tokens", "2048", "--required-batch-size-multiple", "1",
              "--distributed-world-size", "1")
    hyps = [l for l in gen.stdout.splitlines() if l.startswith("H-")]
    translated = int(re.search(r"Translated (\d+) sentences", gen.stdout + gen.stderr).group(1))
    assert len(hyps) == translated == 12, gen.stdout[-2000:]  # every test sentence (no partial batch dropped)


@pytest.mark.slow
def test_bad_option_one_line_at_build_nothing_written(data, tmp_path):
    save = tmp_path / "bad"
    bad = run("fairseq-train", data / "bin-mlm", "--user-dir", USER_DIR, *MLM_TASK, "--arch", "shatter_roberta_small",
              "--shatter-partitions", "0", *TRAIN, "--max-update", "4", "--save-dir", save, ok=False)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        "t2r_fairseq.shatter.config.ShatterOptionError: --shatter-partitions must be an integer >= 1 "
        "(relative-position partitions, e.g. 3), got 0")
    assert not list(save.rglob("*.pt")) if save.exists() else True


# -- in-process: building, options, shapes --------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--shatter-degree", "-1"], r"--shatter-degree must be an integer >= 0"),
    (["--shatter-max-distance", "0"], r"--shatter-max-distance must be an integer >= 1"),
    (["--encoder-attention", "shatter", "--swap-encoder"], r"--encoder-attention shatter and --swap-encoder"),
])
def test_bad_translation_options_raise_at_build(tmp_path, flags, message):
    from t2r_fairseq.models.shatter_config import ShatterOptionError

    extra = flags if "--encoder-attention" in flags else ["--encoder-attention", "shatter", *flags]
    with pytest.raises(ShatterOptionError, match=message):
        build_mt(tmp_path, "t2r_transformer", extra)


def test_translation_models_build_the_requested_encoder(tmp_path):
    from t2r_fairseq.models.shatter_layers import ShatterTransformerEncoder

    _, task, plain = build_mt(tmp_path, "shatter_transformer")
    _, _, multi = build_mt(tmp_path, "shatter_transformer", ["--encoder-attention", "multihead"])
    _, _, t2r = build_mt(tmp_path, "t2r_transformer")
    assert isinstance(plain.encoder, ShatterTransformerEncoder)
    assert not isinstance(multi.encoder, ShatterTransformerEncoder) and not isinstance(t2r.encoder, ShatterTransformerEncoder)
    src = random_tokens(task.source_dictionary, 2, 7)
    src[1, :2] = task.source_dictionary.pad()  # left padding, as fairseq batches sources
    logits, _ = plain(src, torch.tensor([7, 5]), random_tokens(task.target_dictionary, 2, 4))
    assert logits.shape == (2, 4, len(task.target_dictionary)) and torch.isfinite(logits).all()


def test_shatter_roberta_matches_roberta_small_in_size(tmp_path):
    write_dict(tmp_path)
    common = [str(tmp_path), "--task", "masked_lm", "--tokens-per-sample", "64", *MLM_ARCH]
    _, task, shatter = build([*common, "--arch", "shatter_roberta_small"])
    _, _, multi = build([*common, "--arch", "roberta_small"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    positions = multi.encoder.sentence_encoder.embed_positions.weight.numel()
    assert shatter.encoder.sentence_encoder.embed_positions is None
    assert abs(count(shatter) - (count(multi) - positions)) < 0.02 * count(multi)  # P = 3, no key projection
    x, _ = shatter(random_tokens(task.source_dictionary, 2, 9))
    assert x.shape == (2, 9, len(task.source_dictionary))


def test_bench_and_report_tools(tmp_path, capsys):
    from t2r_fairseq.tools import shatter_bench, shatter_report

    rows = shatter_bench.main(["--lengths", "16,24", "--dim", "16", "--heads", "2", "--batch", "2", "--warmup", "0",
                               "--repeats", "1", "--out", str(tmp_path / "bench.json")])
    assert [(r["variant"], r["length"]) for r in rows] == [("multihead_h2", 16), ("shatter_p3", 16),
                                                          ("multihead_h2", 24), ("shatter_p3", 24)]
    assert all(r["saved_activation_mib"] > 0 and r["median_ms"] > 0 for r in rows)
    log = tmp_path / "run.log"
    log.write_text(
        '2026-12-03 | INFO | train_inner | {"loss": "9.5", "num_updates": "25", "train_wall": "10"}\n'
        '2026-12-03 | INFO | train_inner | {"loss": "9.0", "num_updates": "50", "train_wall": "12"}\n'
        '2026-12-03 | INFO | valid | {"valid_loss": "8.750", "valid_num_updates": "50"}\n')
    shatter_report.main([str(log), "--bench", str(tmp_path / "bench.json")])
    out = capsys.readouterr().out
    assert "| 50 | 8.750 | 22 |" in out and "| 24 |" in out
