"""The full-size rehearsal (recipes/rehearse.sh) at test size: the same code path -- synthetic data of a recipe's
dictionary, the recipe's own teacher / finetune / eval stages, calibration through tools.convert, the report --
with 2-layer d = 32 models on a 600-word dictionary; and the report's pass criterion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2r_fairseq.tools.rehearsal import RehearsalError, VOCAB, check_curve, training_curve, write_data

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

HYDRA_LINES = """\
[2026-12-03 15:16:23,979][train_inner][INFO] - epoch 001:      1 / 84 loss=10.812, ppl=1798.22, num_updates=1, lr=1, wall=2
[2026-12-03 15:16:24,352][train_inner][INFO] - epoch 001:      2 / 84 loss=10.701, ppl=1664.26, num_updates=2, lr=0.75, wall=2
[2026-12-03 15:16:25,852][train_inner][INFO] - epoch 001:      3 / 84 loss=9.313, ppl=1272.13, num_updates=3, lr=0.25, wall=3
"""


def test_curve_from_hydra_and_plain_logs() -> None:
    curve = training_curve(HYDRA_LINES)
    assert [(u, l) for u, l, _ in curve] == [(1, 10.812), (2, 10.701), (3, 9.313)]
    assert curve[2][2] - curve[0][2] == pytest.approx(1.873)
    plain = "2026-12-03 15:16:23 | INFO | train_inner | epoch 001:  1 / 9 loss=5.5, nll_loss=5, num_updates=1, wall=1\n"
    assert [(u, l) for u, l, _ in training_curve(plain)] == [(1, 5.5)]
    check_curve(curve)


@pytest.mark.parametrize("losses, why", [([10.0, float("nan")], "not finite"), ([9.0, 9.5], "did not fall"),
                                         ([9.0], "one train_inner line per update")])
def test_report_refuses_a_bad_run(losses, why) -> None:
    with pytest.raises(RehearsalError, match=why):
        check_curve([(i + 1, loss, float(i)) for i, loss in enumerate(losses)])


def test_synthetic_dictionaries_have_the_recipes_sizes(tmp_path) -> None:
    from fairseq.data import Dictionary

    assert write_data("wmt17_zhen", tmp_path / "zh") == VOCAB["wmt17_zhen"]
    for lang in ("zh", "en"):  # separate vocabularies, as the recipe's SentencePiece pipeline
        assert len(Dictionary.load(str(tmp_path / "zh" / f"dict.{lang}.txt"))) == VOCAB["wmt17_zhen"]
    write_data("wmt14_ende", tmp_path / "de", train_lines=100)
    assert len(Dictionary.load(str(tmp_path / "de" / "dict.joined.txt"))) == 32_768
    assert (tmp_path / "de" / "ref" / "test.de").read_text() == (tmp_path / "de" / "test.de").read_text()


def test_rehearsal_at_test_size(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "T2R_"))}
    env.update(SIZE="tiny", UPDATES="8", CAL_STEPS="20", TRAIN_LINES="300", OMP_NUM_THREADS="1", FAIRSEQ_BIN=str(BIN))
    # one recipe through the rehearsal's code path (separate dictionaries, SentencePiece): ZH-EN's calibrate,
    # finetune and eval stages run here only (test_recipes runs its data and teacher, and EN-DE and the LM end to
    # end); the synthetic dictionaries' sizes are test_synthetic_dictionaries_have_the_recipes_sizes
    recipes = ["wmt17_zhen"]
    proc = subprocess.run(["bash", str(REPO / "recipes" / "rehearse.sh"), "--out", str(tmp_path), "--recipes",
                           ",".join(recipes)], capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    table = (tmp_path / "rehearsal.md").read_text().splitlines()
    assert [line.split(" | ")[0].lstrip("| ") for line in table[2:]] == recipes
    for recipe in recipes:
        row = json.loads((tmp_path / recipe / "rehearsal.json").read_text())
        assert row["updates"] == 8 and row["loss_last"] < row["loss_first"]
        for stage in ("teacher", "calibrate", "finetune", "eval"):
            assert 0 < row[f"{stage}_peak_rss_gib"] < 8 and row[f"{stage}_seconds"] > 0
        work = tmp_path / recipe
        assert not (work / "checkpoints").exists()  # KEEP_CHECKPOINTS=0
        log = (work / "logs" / "finetune.log").read_text()
        assert "calibrated.pt" in log and "feature_map_lr_scale" in log
        if recipe == "wikitext103_lm":  # fairseq-eval-lm loaded the finetuned checkpoint
            assert "Perplexity:" in (work / "eval" / "t2r.test.eval-lm.txt").read_text()
        else:  # fairseq-generate translated every test sentence and the recipe scored it
            assert "sacreBLEU" in (work / "eval" / "t2r.bleu.txt").read_text()
