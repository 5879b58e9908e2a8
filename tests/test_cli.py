"""End to end through fairseq's own CLIs on tiny data made here: preprocess -> softmax teacher ->
swap-finetune T2R -> eval-lm / generate (sacreBLEU) / interactive / hydra-train, and the error paths."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import LM_TASK, MT_TASK, TRAIN, USER_DIR, VOCAB, run


def _swap_line(proc: subprocess.CompletedProcess) -> str:
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "T2R swap:" in l]
    assert len(lines) == 1, lines
    return lines[0]


def _swap_finetune(work: Path, kind: str, task: list, arch: str) -> subprocess.CompletedProcess:
    """Swap the KIND teacher and finetune 20 updates into work/KIND-t2r (the checkpoint several tests read)."""
    return run("fairseq-train", work / f"bin-{kind}", "--user-dir", USER_DIR, *task, "--arch", arch,
               "--feature-size", "8", *TRAIN, "--max-update", "20", "--save-dir", work / f"{kind}-t2r",
               "--finetune-from-model", work / f"{kind}-teacher" / "checkpoint_last.pt")


# Module fixtures, so that every test reading work/lm-t2r or work/mt-t2r also runs alone (`pytest -k`), not only
# after the test that used to write it.
@pytest.fixture(scope="module")
def lm_t2r(work) -> subprocess.CompletedProcess:
    return _swap_finetune(work, "lm", LM_TASK, "t2r_transformer_lm")


@pytest.fixture(scope="module")
def mt_t2r(work) -> subprocess.CompletedProcess:
    return _swap_finetune(work, "mt", MT_TASK, "t2r_transformer")


def test_lm_swap_finetune_then_eval_lm(work, lm_t2r):
    line = _swap_line(lm_t2r)
    # the default map, t2r_qk: a query layer (weight, bias) and a key layer (key_weight, key_bias) per swapped layer
    assert re.search(r"new 8 tensors .*self_attn\.feature_map\.key_weight x2.*self_attn\.feature_map\.weight x2.*; "
                     r"dropped 0", line), line
    ev = run("fairseq-eval-lm", work / "bin-lm", "--user-dir", USER_DIR, "--path", work / "lm-t2r" / "checkpoint_last.pt",
             "--cpu", "--tokens-per-sample", "64", "--max-tokens", "2048")
    ppl = float(re.search(r"Perplexity: ([\d.]+)", ev.stdout + ev.stderr).group(1))
    assert math.isfinite(ppl) and 1 < ppl < len(VOCAB) + 4  # better than uniform over the vocabulary

    # Resuming the T2R run is a plain strict load: no swap line, training continues.
    resumed = run("fairseq-train", work / "bin-lm", "--user-dir", USER_DIR, *LM_TASK, "--arch", "t2r_transformer_lm",
                  "--feature-size", "8", *TRAIN, "--max-update", "25", "--save-dir", work / "lm-t2r")
    out = resumed.stdout + resumed.stderr
    assert "T2R swap:" not in out and "num_updates 25" in out


def test_lm_python_hub_generation(work, lm_t2r):
    """fairseq's hub interface on a T2R checkpoint: beam search through the recurrent state."""
    code = (
        "import t2r_fairseq, torch\n"
        "from t2r_fairseq.models.t2r_transformer_lm import T2RTransformerLanguageModel as M\n"
        f"hub = M.from_pretrained({str(work / 'lm-t2r')!r}, 'checkpoint_last.pt', {str(work / 'bin-lm')!r})\n"
        "out = hub.generate(hub.encode('w1 w2 w3'), beam=3, max_len_b=6)\n"
        "print('N_HYPS', len(out), 'LEN', len(out[0]['tokens']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"N_HYPS 3 LEN \d+", proc.stdout), proc.stdout


def test_lm_swap_through_restore_file_with_resets(work):
    proc = run("fairseq-train", work / "bin-lm", "--user-dir", USER_DIR, *LM_TASK, "--arch", "t2r_transformer_lm",
               "--feature-map", "performer", *TRAIN, "--max-update", "5", "--save-dir", work / "lm-performer",
               "--restore-file", work / "lm-teacher" / "checkpoint_last.pt",
               "--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler")
    # Performer's random projections are buffers: new tensors that the checkpoint will carry.
    assert "new 2 tensors (decoder.layers.*.self_attn.feature_map.projection x2)" in _swap_line(proc)
    assert (work / "lm-performer" / "checkpoint_last.pt").exists()


def test_mt_swap_finetune_generate_sacrebleu_and_interactive(work, mt_t2r):
    assert "encoder_attn.feature_map" in _swap_line(mt_t2r)
    ckpt = work / "mt-t2r" / "checkpoint_last.pt"
    gen = run("fairseq-generate", work / "bin-mt", "--user-dir", USER_DIR, "--path", ckpt, "--beam", "4",
              "--scoring", "sacrebleu", "--cpu", "--max-tokens", "2048")
    out = gen.stdout + gen.stderr
    assert re.search(r"Generate test with beam=4: BLEU = [\d.]+", out), out[-2000:]
    n_src = len(re.findall(r"^S-\d+", gen.stdout, flags=re.M))
    assert n_src > 0 and len(re.findall(r"^H-\d+", gen.stdout, flags=re.M)) == n_src
    # Alignments come from the linear cross-attention weights, computed in generation only when asked.
    aligned = run("fairseq-generate", work / "bin-mt", "--user-dir", USER_DIR, "--path", ckpt, "--beam", "2",
                  "--print-alignment", "--cpu", "--max-tokens", "2048", "--max-len-b", "8")
    src_len = {int(i): len(s.split()) for i, s in re.findall(r"^S-(\d+)\t(.*)$", aligned.stdout, flags=re.M)}
    alignments = re.findall(r"^A-(\d+)\t(.*)$", aligned.stdout, flags=re.M)
    assert len(alignments) == len(src_len) > 0, aligned.stdout[-2000:]
    for i, pairs in alignments:
        src_positions = [int(p.split("-")[0]) for p in pairs.split()]
        assert src_positions and all(0 <= p <= src_len[int(i)] for p in src_positions)
    inter = run("fairseq-interactive", work / "bin-mt", "--user-dir", USER_DIR, "--path", ckpt, "--beam", "2",
                "-s", "src", "-t", "tgt", "--cpu", stdin="w1 w2 w3\nw4 w5\n")
    assert len(re.findall(r"^H-\d+\t", inter.stdout, flags=re.M)) == 2


def test_mt_python_hub_translate(work, mt_t2r):
    """The README's MT hub example: from_pretrained + translate on a T2R translation checkpoint (recurrent beam
    search with the cached source state)."""
    code = (
        "import t2r_fairseq\n"
        "from t2r_fairseq.models.t2r_transformer import T2RTransformerModel\n"
        f"mt = T2RTransformerModel.from_pretrained({str(work / 'mt-t2r')!r}, 'checkpoint_last.pt', "
        f"{str(work / 'bin-mt')!r}, source_lang='src', target_lang='tgt')\n"
        "out = mt.translate(['w1 w2 w3', 'w4 w5'], beam=4)\n"
        "print('N_OUT', len(out), 'WORDS', all(w in mt.tgt_dict.indices for o in out for w in o.split()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "N_OUT 2 WORDS True" in proc.stdout, proc.stdout


def test_forgotten_user_dir_fails_as_the_readme_says(work, lm_t2r):
    """Without --user-dir fairseq cannot know the plugin's models (nothing of ours runs): the README's
    troubleshooting quotes this exact last line, and the fix."""
    proc = run("fairseq-eval-lm", work / "bin-lm", "--path", work / "lm-t2r" / "checkpoint_last.pt", "--cpu",
               "--tokens-per-sample", "64", ok=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == """KeyError: "'_name'\"""", proc.stderr[-1000:]
    readme = (Path(USER_DIR).parent / "README.md").read_text()
    assert """KeyError: "'_name'\"""" in readme and "--user-dir" in readme


def test_hydra_train_with_user_dir(work):
    cfg_dir = work / "hydra"
    cfg_dir.mkdir(exist_ok=True)
    (cfg_dir / "t2r_lm.yaml").write_text(f"""
common: {{user_dir: {USER_DIR}, cpu: true, seed: 1, log_format: simple, log_interval: 1}}
task: {{_name: language_modeling, data: {work / 'bin-lm'}, tokens_per_sample: 64}}
model:
  _name: t2r_transformer_lm
  decoder_layers: 2
  decoder_embed_dim: 32
  decoder_input_dim: 32
  decoder_output_dim: 32
  decoder_ffn_embed_dim: 64
  decoder_attention_heads: 4
  feature_map: t2r
  feature_size: 8
criterion: cross_entropy
optimizer: {{_name: adam}}
lr_scheduler: fixed
optimization: {{max_update: 3, lr: [0.001]}}
dataset: {{max_tokens: 2048, num_workers: 0}}
checkpoint: {{save_dir: {work / 'lm-hydra'}, no_epoch_checkpoints: true,
  finetune_from_model: {work / 'lm-teacher' / 'checkpoint_last.pt'}}}
""")
    proc = run("fairseq-hydra-train", "--config-dir", cfg_dir, "--config-name", "t2r_lm")
    assert "new 4 tensors" in _swap_line(proc)
    assert (work / "lm-hydra" / "checkpoint_last.pt").exists()


# -- bad input: one clear message, non-zero exit, nothing written ------------------------------


def _t2r_lm_train(work: Path, save_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("fairseq-train", work / "bin-lm", "--user-dir", USER_DIR, *LM_TASK, "--arch", "t2r_transformer_lm",
               *TRAIN, "--max-update", "2", "--save-dir", save_dir, *extra, ok=False)


def _assert_failed_cleanly(proc: subprocess.CompletedProcess, save_dir: Path, pattern: str) -> None:
    assert proc.returncode != 0
    assert re.search(pattern, proc.stderr), proc.stderr[-2000:]
    assert not list(save_dir.glob("*.pt")), "a checkpoint was written despite the error"


def test_shape_mismatch_fails_naming_tensor(work):
    save = work / "err-shape"
    proc = _t2r_lm_train(work, save, "--decoder-ffn-embed-dim", "48",
                         "--finetune-from-model", work / "lm-teacher" / "checkpoint_last.pt")
    _assert_failed_cleanly(proc, save, r"SwapError: checkpoint tensor 'decoder\.layers\.0\.fc1\.weight' has shape \(64, 32\) "
                                       r"but the T2R model expects \(48, 32\)")


def test_missing_teacher_path_is_named(work):
    save = work / "err-missing"
    proc = _t2r_lm_train(work, save, "--finetune-from-model", work / "nope" / "teacher.pt")
    _assert_failed_cleanly(proc, save, re.escape(str(work / "nope" / "teacher.pt")) + " does not exist")


def test_unreadable_teacher_path_is_named(work):
    bad = work / "corrupt.pt"
    bad.write_bytes(b"this is not a checkpoint")
    save = work / "err-corrupt"
    proc = _t2r_lm_train(work, save, "--finetune-from-model", bad)
    _assert_failed_cleanly(proc, save, r"CheckpointReadError: cannot read checkpoint " + re.escape(str(bad)))


def test_unknown_feature_map_lists_valid_ones(work):
    save = work / "err-fmap"
    proc = _t2r_lm_train(work, save, "--feature-map", "cosformer")
    _assert_failed_cleanly(proc, save, r"--feature-map: invalid choice: 'cosformer' \(choose from .*elu.*hedgehog.*performer.*rfa.*t2r")


def test_decode_step_override_generates_what_eager_generates(work, mt_t2r, lm_t2r):
    """--decode-step through fairseq-generate's --model-overrides (MT, beam 4) and the hub's from_pretrained
    keyword (LM): the static step is used (its log line says so) and every hypothesis equals the eager step's."""
    ckpt = work / "mt-t2r" / "checkpoint_last.pt"
    hyps, logs = {}, {}
    for mode in ("eager", "graph"):
        gen = run("fairseq-generate", work / "bin-mt", "--user-dir", USER_DIR, "--path", ckpt, "--beam", "4", "--cpu",
                  "--max-tokens", "2048", "--model-overrides", f"{{'decode_step': '{mode}'}}")
        hyps[mode] = sorted((i, text) for i, _, text in re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", gen.stdout, flags=re.M))
        logs[mode] = gen.stdout + gen.stderr
    assert hyps["eager"] and hyps["graph"] == hyps["eager"]
    assert "static step runs uncaptured on cpu" in logs["graph"] and "static step" not in logs["eager"]
    code = (
        "import t2r_fairseq\n"
        "from t2r_fairseq.models.t2r_transformer_lm import T2RTransformerLanguageModel as LM\n"
        "out = {}\n"
        "for mode in ('eager', 'graph'):\n"
        f"    lm = LM.from_pretrained({str(work / 'lm-t2r')!r}, 'checkpoint_last.pt', {str(work / 'bin-lm')!r}, decode_step=mode)\n"
        "    assert lm.models[0].decoder.decode_step == mode\n"
        "    out[mode] = lm.sample(['w1 w2', 'w3'], beam=3, max_len_b=8)\n"
        "print('SAME', out['eager'] == out['graph'], out['eager'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SAME True" in proc.stdout, proc.stdout


def test_generate_speed_and_long_sources(work, mt_t2r, tmp_path, capsys):
    """The generation benchmark times teacher and T2R in one run (rows, ratios against the first model, the
    attention-free bound), and concat_sources' joined split is read by the same models (both run in-process here;
    test_mt_speed_script_writes_every_row runs them as commands)."""
    from fairseq.data import Dictionary, data_utils

    from t2r_fairseq.tools import concat_sources, generate_speed

    long_bin = tmp_path / "bin-long"
    concat_sources.main([str(work / "bin-mt"), str(long_bin), "--src", "src", "--tgt", "tgt", "--join", "4"])
    assert "15 sentences of 4 joined pairs" in capsys.readouterr().out  # 60 test sentences
    d = Dictionary.load(str(work / "bin-mt" / "dict.src.txt"))
    short = data_utils.load_indexed_dataset(str(work / "bin-mt" / "test.src-tgt.src"), d)
    joined = data_utils.load_indexed_dataset(str(long_bin / "test.src-tgt.src"), d)
    want = [t for i in range(4) for t in short[i][:-1].tolist()] + [d.eos()]
    assert joined[0].tolist() == want  # one EOS, at the end

    out = tmp_path / "speed.md"
    models = [f"teacher={work / 'mt-teacher' / 'checkpoint_last.pt'}", f"t2r={work / 'mt-t2r' / 'checkpoint_last.pt'}"]
    generate_speed.main([str(long_bin), *models, "--batch-size", "8", "--max-batches", "1", "--reps", "1", "--bound",
                         "--beam", "3", "--min-len", "6", "--max-len-b", "6", "--out", str(out)])
    assert capsys.readouterr().out.strip().startswith("| model |")
    rows = {l.split("|")[1].strip(): l for l in out.read_text().splitlines() if l.startswith("| t")}
    assert set(rows) == {"teacher", "t2r"} and "| 1.00x |" in rows["teacher"]
    # forced lengths: every best hypothesis is 6 tokens plus EOS, for both models; the bound's columns are there
    assert all(row.split("|")[5].strip() == "7.0" and len(row.split("|")) == 9 for row in rows.values()), rows
    with pytest.raises(SystemExit) as refused:
        generate_speed.main([str(work / "bin-mt"), models[0], "--bound"])
    assert refused.value.code == 2
    assert "--bound needs forced lengths" in capsys.readouterr().err.strip().splitlines()[-1]


def test_mt_speed_script_writes_every_row(work, mt_t2r, tmp_path):
    """scripts/mt_speed.sh: sentence-level beam 4 and 1, forced long outputs, joined long sources, one table each."""
    import os

    env = dict(os.environ, SRC="src", TGT="tgt", REPS="1", JOIN="4", LONG="12", BATCH="8", BATCHES="1", THREADS="1",
               PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(Path(__file__).resolve().parents[1] / "scripts" / "mt_speed.sh"), str(work / "bin-mt"), str(tmp_path),
         f"teacher={work / 'mt-teacher' / 'checkpoint_last.pt'}", f"t2r={work / 'mt-t2r' / 'checkpoint_last.pt'}"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "mt_speed.md").read_text()
    sections = report.split("### ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "sentences, beam 4", "sentences, beam 1", "long outputs (12 tokens), beam 4", "long sources (4 sentences joined), beam 4"]
    for section in sections:
        assert "| teacher |" in section and "| t2r |" in section and "Command: python -m t2r_fairseq.tools.generate_speed" in section
        assert ("attention-free bound" in section) == section.startswith("long outputs")  # only where lengths are forced
    assert "| 13.0 |" in sections[2]  # forced: 12 tokens and EOS
    assert proc.stdout.startswith("### sentences, beam 4")


def _study(tmp_path: Path, kind: str, work: Path, rows: dict) -> Path:
    """A study directory as recipes/accuracy_study.sh leaves it: data-bin, checkpoints and evaluation logs.
    ``rows``: ROW -> (checkpoint, point, {subset: value})."""
    study = tmp_path / f"study-{kind}"
    (study / "data-bin").mkdir(parents=True)
    (study / "data-bin" / kind).symlink_to(work / f"bin-{kind}")
    (study / "eval").mkdir()
    for row, (checkpoint, point, values) in rows.items():
        name = "checkpoint_best.pt" if row == "teacher" else f"checkpoint_1_{point}.pt"
        folder = study / "checkpoints" / f"{row}.{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / name).exists():
            (folder / name).symlink_to(checkpoint)
        for subset, value in values.items():
            line = (f"Perplexity: {value}" if kind == "lm"
                    else f"sacreBLEU = {value} (60 sentences) signature: nrefs:1|case:mixed|tok:13a|v:2")
            (study / "eval" / f"{row}.{kind}.{point}.{subset}.log").write_text(line + "\n")
    return study


def test_tradeoff_reads_the_study_and_times_its_rows(work, mt_t2r, lm_t2r, tmp_path, capsys):
    """tools.tradeoff: quality is the mean over a row's seeds at the end of its budget, speed and state are measured
    on the row's checkpoint in the same run as the teacher's (the first row, ratio 1.00x)."""
    from t2r_fairseq.tools import tradeoff

    teacher, t2r = work / "mt-teacher" / "checkpoint_last.pt", work / "mt-t2r" / "checkpoint_last.pt"
    study = _study(tmp_path, "mt", work, {"teacher": (teacher, 0, {"test": 30.0, "valid": 31.0}),
                                          "t2r": (t2r, 8, {"test": 28.0, "valid": 29.5}),
                                          "t2r_s2": (t2r, 8, {"test": 29.0, "valid": 30.5})})
    tradeoff.main([str(study), "--task", "mt", "--reps", "1", "--batch-size", "8", "--max-batches", "2"])
    text = (study / "tradeoff_mt.md").read_text()
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in text.splitlines()
            if l.startswith("| t")}
    assert list(rows) == ["teacher", "t2r"]  # the seed variant is folded into its row
    # seeds, updates, BLEU test_2016 (the plotted subset first), BLEU val, sentences/s, ratio, state
    assert rows["t2r"][:4] == ["2", "8", "28.50", "30.00"] and rows["teacher"][:4] == ["1", "0", "30.00", "31.00"]
    assert rows["teacher"][5] == "1.00x" and float(rows["t2r"][4]) > 0
    assert all(r[6].endswith("KiB") or r[6].endswith("MiB") for r in rows.values())
    assert (study / "tradeoff_mt.png").stat().st_size > 1000
    assert "Command: `python -m t2r_fairseq.tools.tradeoff" in text

    lm = _study(tmp_path, "lm", work, {"teacher": (work / "lm-teacher" / "checkpoint_last.pt", 0, {"test": 60.0}),
                                       "t2r": (work / "lm-t2r" / "checkpoint_last.pt", 20, {"test": 58.0})})
    tradeoff.main([str(lm), "--task", "lm", "--reps", "1", "--contexts", "32,96", "--name", "lm"])
    lines = [l for l in (lm / "lm.md").read_text().splitlines() if l.startswith("| t")]
    assert [l.split("|")[1].strip() for l in lines] == ["teacher", "t2r"]
    assert "tokens/s (context 32)" in (lm / "lm.md").read_text() and "tokens/s (context 96)" in (lm / "lm.md").read_text()
    capsys.readouterr()

    # seeds of one row evaluated at different budgets are refused, in one line naming the row
    (study / "eval" / "t2r_s2.mt.16.test.log").write_text("sacreBLEU = 1.0 (60 sentences) signature: nrefs:1\n")
    with pytest.raises(SystemExit, match="the seeds of 't2r' end at different update counts"):
        tradeoff.main([str(study), "--task", "mt"])


def test_position_loss_reads_documents_in_each_models_window(work, lm_t2r, tmp_path, capsys):
    """tools.position_loss: the teacher restarts every trained length (64 positions), the T2R model reads each
    128-token document in one window; over the positions both read from a fresh start they agree with the same
    model read in 64-token windows, and a softmax model is refused a window beyond its positions."""
    from t2r_fairseq.tools import position_loss

    models = [f"teacher={work / 'lm-teacher' / 'checkpoint_last.pt'}", f"t2r={work / 'lm-t2r' / 'checkpoint_last.pt'}",
              f"t2r_blocks={work / 'lm-t2r' / 'checkpoint_last.pt'}"]
    position_loss.main([str(work / "bin-lm"), *models, "--doc-tokens", "128", "--buckets", "32,64",
                        "--window", "t2r_blocks=64", "--out-dir", str(tmp_path)])
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
            for l in (tmp_path / "position_loss.md").read_text().splitlines() if l.startswith("| t")}
    assert [rows[n][0] for n in ("teacher", "t2r", "t2r_blocks")] == ["64", "128", "64"]  # windows
    assert rows["t2r"][1:3] == rows["t2r_blocks"][1:3]  # positions 0-63: the same fresh start
    assert all(math.isfinite(float(c.split()[0])) for r in rows.values() for c in r[1:])
    assert (tmp_path / "position_loss.png").stat().st_size > 1000
    capsys.readouterr()
    with pytest.raises(SystemExit, match="'teacher' is not a linear-attention model; it reads at most its 64"):
        position_loss.main([str(work / "bin-lm"), models[0], "--doc-tokens", "128", "--window", "teacher=128"])
