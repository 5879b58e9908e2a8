"""The accuracy study's tooling: its report (tables and curves from the evaluation logs) and the refusals of
recipes/accuracy_study.sh, which run before anything is trained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from t2r_fairseq.tools.study_report import dev_markdown, markdown, read_dev_curves, read_results

SIGNATURE = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"


def _lm_log(ppl: float) -> str:
    return f"INFO:fairseq_cli.eval_lm:Evaluated 1000 tokens\nINFO:fairseq_cli.eval_lm:Loss (base 2): 6.1, Perplexity: {ppl}\n"


def _mt_log(bleu: float) -> str:
    return (f"H-0\t-0.5\tein Haus\nGenerate test with beam=4: BLEU4 = 1.0\n"
            f"sacreBLEU = {bleu:.2f} (1000 sentences; signature: {SIGNATURE})\n")


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """An --out directory as the eval stage leaves it: ROW.KIND.POINT.SUBSET.log, complete or not."""
    ev = tmp_path / "eval"
    ev.mkdir()
    logs = {
        "teacher.lm.0.test": _lm_log(68.77), "t2r.lm.0.test": _lm_log(74.10), "t2r.lm.136.test": _lm_log(68.78),
        "t2r_cal_lr8.lm.0.test": _lm_log(69.73), "t2r_cal_lr8.lm.136.test": _lm_log(67.89),
        "teacher.mt.0.test": _mt_log(34.54), "t2r.mt.0.test": _mt_log(8.30), "t2r.mt.480.test": _mt_log(33.19),
        "teacher.mt.0.test1": _mt_log(26.06), "t2r.mt.480.test1": _mt_log(24.08),
        "t2r.mt.240.test": "fairseq-generate was killed here\n",  # an incomplete log: no number, no cell
    }
    for name, text in logs.items():
        (ev / f"{name}.log").write_text(text)
    (ev / "notes.txt").write_text("not a log of the study")
    train = tmp_path / "train"
    train.mkdir()
    # the MT teacher was killed at 300 and resumed (the resumed run validates update 300 again), then hit --max-update
    (train / "teacher.mt.log").write_text(
        _valid(7, 100, 5.1) + _valid(7, 200, 4.6) + _valid(8, 300, 4.5) + "killed\n"
        + _valid(8, 300, 4.52) + _valid(9, 400, 4.4) + "fairseq_cli.train | done training in 99.0 seconds\n")
    (train / "teacher.lm.log").write_text(
        _valid(1, 77, 7.4) + _valid(2, 154, 6.7) + _valid(3, 231, 6.8)
        + "early stop since valid performance hasn't improved for last 1 runs\ndone training in 9.0 seconds\n")
    (train / "t2r.mt.log").write_text(_valid(1, 40, 4.9) + _valid(1, 80, 4.7))
    (train / "t2r.mt.convert.log").write_text(_valid(1, 1, 0.1))  # not a training log
    return tmp_path


def _valid(epoch: int, updates: int, loss: float) -> str:
    return (f"2026-11-30 09:36:09 | INFO | valid | epoch {epoch:03d} | valid on 'valid' subset | loss {loss} | "
            f"nll_loss 2.4 | ppl 5.4 | wps 6835.2 | wpb 2179.1 | bsz 126 | num_updates {updates} | best_loss {loss}\n")


def test_report_tables_hold_every_point_and_the_gap_to_the_teacher(study: Path) -> None:
    results, signature = read_results(study)
    assert signature == SIGNATURE
    assert results["lm"]["test"]["t2r_cal_lr8"] == {0: 69.73, 136: 67.89}
    assert 240 not in results["mt"]["test"]["t2r"]  # the killed evaluation is not a number
    text = markdown(results, signature)
    assert "### LM test perplexity, `test.txt` (teacher: 68.77)" in text
    assert "| t2r_cal_lr8 | 69.73 | 67.89 | -1.3% |" in text  # perplexity: relative to the teacher
    assert "| t2r | 74.10 | 68.78 | +0.0% |" in text
    assert "### MT BLEU, `test_2016_flickr` (teacher: 34.54)" in text
    assert "| t2r | 8.30 | 33.19 | -1.35 |" in text  # BLEU: points below the teacher
    assert "### MT BLEU, `test_2017_flickr` (teacher: 26.06)" in text and "| t2r | 24.08 | -1.98 |" in text
    assert f"sacreBLEU signature: `{SIGNATURE}`" in text


def test_report_reads_dev_curves_and_how_each_teacher_stopped(study: Path) -> None:
    curves, stopped = read_dev_curves(study)
    assert curves["mt"]["teacher"] == {100: 5.1, 200: 4.6, 300: 4.52, 400: 4.4}  # the resumed line wins
    assert set(curves["mt"]) == {"teacher", "t2r"}  # the convert log is not a training log
    assert stopped == {"mt": "--max-update reached",
                       "lm": "patience (no dev improvement for --patience validations)"}
    text = dev_markdown(curves, stopped)
    assert "teacher: 231 updates run, best dev loss 6.700 at update 154, stopped: patience" in text
    assert "teacher: 400 updates run, best dev loss 4.400 at update 400, stopped: --max-update reached" in text
    assert "| t2r | 80 | 4.700 | 4.700 |" in text


def test_report_cli_writes_report_and_curves(study: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    proc = subprocess.run([sys.executable, "-m", "t2r_fairseq.tools.study_report", str(study), "--docs", str(docs)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (study / "report.md").read_text() in proc.stdout
    for folder in (study, docs):
        for kind in ("lm", "mt"):
            assert (folder / f"accuracy_{kind}.png").stat().st_size > 1000
            assert (folder / f"teacher_{kind}.png").stat().st_size > 1000
    assert "### MT dev loss (training logs)" in proc.stdout


def test_report_without_logs_says_which_stage_to_run(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "t2r_fairseq.tools.study_report", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"study_report: no evaluation logs under {tmp_path / 'eval'}: run the eval stage first")


@pytest.mark.parametrize("args, last_line", [
    (["--tasks", "mt", "--stages", "data"], "accuracy_study: --multi30k DIR is required for the data stage"),
    (["--tasks", "lm", "--stages", "data"], "accuracy_study: --wikitext2 DIR is required for the data stage"),
    (["--tasks", "mt", "--stages", "eval"],
     "accuracy_study: --multi30k DIR is required for MT evaluation (references)"),
    (["--stages", "finetune", "--tasks", "lm"], "no teacher"),
    (["--frobnicate"], "accuracy_study: unknown option --frobnicate (see --help)"),
    (["--device", "tpu"], "accuracy_study: --device must be cpu or cuda, not 'tpu'"),
    (["--size", "large"], "accuracy_study: --size must be small or base, not 'large'"),
])
def test_study_script_refuses_before_anything_runs(tmp_path: Path, args: list, last_line: str) -> None:
    out = tmp_path / "study"
    proc = subprocess.run(["bash", str(REPO / "recipes" / "accuracy_study.sh"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert last_line in proc.stderr.strip().splitlines()[-1]
    assert not (out / "checkpoints").exists() and not (out / "data-bin").exists()


def test_study_script_help_lists_its_options() -> None:
    proc = subprocess.run(["bash", str(REPO / "recipes" / "accuracy_study.sh"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for option in ("--multi30k", "--wikitext2", "--stages", "--rows", "--tasks", "--device", "--size"):
        assert option in proc.stdout
