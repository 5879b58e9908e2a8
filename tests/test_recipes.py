"""The paper recipes (recipes/*.sh, recipes/configs, recipes/slurm) through their real entry points.

* dry runs: each recipe prints the exact commands (hydra config names and overrides, the calibrate stage's
  tools.convert, generate/eval-lm settings, launchers) and creates nothing; env overrides and bad input; the
  plain swap (SWAP=plain); markers; nodes other than node 0;
* the hydra configs: parse, and the architectures match the public teachers they must load;
* the scorer's compound-split / detokenised / reference-file modes;
* the recipes on the tiny upstream-layout fixture (tests/fixtures/make_fixtures.py) served as T2R_DATA_MIRROR,
  with tiny model overrides: EN-DE and the LM end to end, through the calibrate stage, ending in BLEU / perplexity
  lines; EN-FR's and ZH-EN's own data (ZH-EN's later stages run in tests/test_rehearsal.py); the public-checkpoint
  path with a fake "public" archive packed from a tiny teacher; re-runs that skip finished stages and resume
  training from checkpoint_last.pt;
* a 2-process CPU (gloo) distributed finetune through the recipe's own launcher path (the plain swap).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPES = ["wikitext103_lm", "wmt14_ende", "wmt14_enfr", "wmt17_zhen"]
MT_TINY = ("model.encoder_layers=2 model.decoder_layers=2 model.encoder_embed_dim=32 model.decoder_embed_dim=32 "
           "model.encoder_ffn_embed_dim=64 model.decoder_ffn_embed_dim=64 model.encoder_attention_heads=4 "
           "model.decoder_attention_heads=4 common.log_interval=10 dataset.num_workers=0 "
           "lr_scheduler.warmup_updates=10 checkpoint.save_interval_updates=0 dataset.required_batch_size_multiple=1")
LM_TINY = ("model.decoder_embed_dim=32 model.decoder_input_dim=32 model.decoder_output_dim=32 "
           "model.decoder_ffn_embed_dim=64 model.decoder_attention_heads=4 model.adaptive_input_cutoff='20,40' "
           "model.adaptive_softmax_cutoff='20,40' common.log_interval=10 dataset.num_workers=0 "
           "checkpoint.save_interval_updates=0 dataset.required_batch_size_multiple=1")
BLEU_LINE = r"sacreBLEU = [\d.]+ \(30 sentences\) signature: nrefs:1\|case:mixed\|eff:no\|tok:13a\|smooth:exp\|version:\S+ \[{} {}\]"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "T2R_DATA_"))}
    for k in ("WORK", "STAGES", "FORCE", "DRY_RUN", "TEACHER", "TEACHER_CKPT", "NUM_GPUS", "NUM_NODES", "NODE_RANK",
              "LAUNCHER", "CPU", "CPU_PROCS", "UPDATE_FREQ", "MAX_UPDATE", "FEATURE_SIZE", "CROSS_FEATURE_SIZE",
              "CROSS_ATTENTION", "MASTER_PORT", "RANK", "WORLD_SIZE", "SWAP", "CALIBRATE_STEPS", "CALIBRATE_WAIT", "CALIBRATE_ARGS"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", FAIRSEQ_BIN=str(BIN))
    env.update(extra)
    return env


def recipe(name: str, *args: str, ok: bool = True, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(REPO / "recipes" / f"{name}.sh"), *args], capture_output=True, text=True,
                          env=_env(**env), timeout=timeout, cwd=REPO)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{name} {args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ---- dry runs -------------------------------------------------------------------------------------------------


def _dry(name: str, tmp_path: Path, *args: str, **env: str) -> list[str]:
    out = tmp_path / "work"
    proc = recipe(name, "--dry-run", "--out", str(out), *args, **env)
    assert not out.exists(), "a dry run created the work dir"
    lines = proc.stdout.splitlines()
    assert lines, proc.stderr
    first = {"bash", "mkdir", "tar", "rm"}
    for line in lines:  # one complete command per line, nothing else on stdout
        tool = line.split()[0]
        assert tool in first or Path(tool).name in {"python", "torchrun"} or Path(tool).name.startswith("fairseq-"), line
    return lines


def _one(lines: list[str], *needles: str) -> str:
    hits = [l for l in lines if all(n in l for n in needles)]
    assert len(hits) == 1, (needles, lines)
    return hits[0]


def test_dry_run_wmt14_ende_public_teacher(tmp_path):
    lines = _dry("wmt14_ende", tmp_path)
    work = tmp_path / "work"
    public = f"{work}/teacher/public/wmt16.en-de.joined-dict.transformer"
    _one(lines, "data-prep/download.py", "--url https://dl.fbaipublicfiles.com/fairseq/models/wmt16.en-de.joined-dict.transformer.tar.bz2")
    _one(lines, "data-prep/wmt14_ende.sh", f"--bpe-codes {public}/bpecodes")
    _one(lines, "fairseq-preprocess", f"--srcdict {public}/dict.en.txt --tgtdict {public}/dict.de.txt")
    cal = _one(lines, "-m t2r_fairseq.tools.convert")
    assert cal == (f"{BIN}/python -m t2r_fairseq.tools.convert {public}/model.pt {work}/checkpoints/calibrated.pt "
                   f"--data {work}/data-bin --feature-map t2r_qk --feature-size 32 --softmax-cross-attention "
                   f"--calibrate-steps 300 --seed 1 --device cuda 2>&1 | tee -a {work}/logs/calibrate.log")
    ft = _one(lines, "fairseq-hydra-train", f"--config-dir {REPO}/recipes/configs --config-name wmt14_ende_finetune")
    assert lines.index(cal) < lines.index(ft)
    for part in [f"common.user_dir={REPO}/t2r_fairseq", f"checkpoint.finetune_from_model={work}/checkpoints/calibrated.pt "
                 "model.feature_map=t2r_qk model.feature_map_lr_scale=8.0",
                 "model.feature_size=32 model.softmax_cross_attention=true optimization.max_update=30000",
                 "dataset.max_tokens=3584",
                 "'optimization.update_freq=[1]'", "distributed_training.distributed_world_size=8",
                 f"| tee -a {work}/logs/finetune.log"]:
        assert part in ft, (part, ft)
    assert "cross_feature_size" not in ft  # fairseq's cross-attention: no cross feature map
    assert not any("--config-name wmt14_ende_teacher" in l for l in lines)  # the public teacher is not retrained
    gen = _one(lines, "fairseq-generate", "checkpoints/t2r/checkpoint_best.pt")
    assert "--beam 4 --lenpen 0.6" in gen and "--remove-bpe" in gen and "--required-batch-size-multiple 1" in gen
    assert "--distributed-world-size 1" in gen  # else fairseq-generate translates 1/#GPUs of the test set
    _one(lines, "sacrebleu_from_generate", "t2r.generate.txt", f"--ref {work}/data/ref/test.de", "--detok-lang de")
    _one(lines, "sacrebleu_from_generate", "t2r.generate.txt", "--compound-split")
    _one(lines, "fairseq-generate", f"--path {public}/model.pt")  # the teacher is scored too


def test_dry_run_wmt14_ende_train_teacher_and_env_overrides(tmp_path):
    lines = _dry("wmt14_ende", tmp_path, TEACHER="train", NUM_GPUS="4", MAX_UPDATE="123", FEATURE_SIZE="16",
                 CROSS_ATTENTION="linear", CROSS_FEATURE_SIZE="4", BPE_TOKENS="500", BEAM="5", LENPEN="1.0", CALIBRATE_STEPS="50",
                 CALIBRATE_ARGS="--calibrate-batches 8 --max-tokens 2048")
    work = tmp_path / "work"
    assert not any("download.py" in l for l in lines)
    _one(lines, "data-prep/wmt14_ende.sh", "--bpe-tokens 500")
    _one(lines, "fairseq-preprocess", "--joined-dictionary")
    teacher = _one(lines, "--config-name wmt14_ende_teacher")
    assert "optimization.max_update=300000" in teacher and "'optimization.update_freq=[2]'" in teacher  # 8x1 GPU-batches on 4 GPUs
    ft = _one(lines, "--config-name wmt14_ende_finetune")
    cal = _one(lines, "tools.convert")
    assert cal.startswith(f"{BIN}/python -m t2r_fairseq.tools.convert {work}/checkpoints/teacher/checkpoint_best.pt "
                          f"{work}/checkpoints/calibrated.pt --data {work}/data-bin ")
    assert ("--feature-size 16 --cross-feature-size 4 --calibrate-steps 50 --seed 1 --device cuda "
            "--calibrate-batches 8 --max-tokens 2048 2>&1") in cal
    for part in [f"checkpoint.finetune_from_model={work}/checkpoints/calibrated.pt", "model.feature_size=16",
                 "model.softmax_cross_attention=false model.cross_feature_size=4", "optimization.max_update=123", "distributed_training.distributed_world_size=4"]:
        assert part in ft, (part, ft)
    assert "--beam 5 --lenpen 1.0" in _one(lines, "fairseq-generate", "t2r/checkpoint_best.pt")


def test_dry_run_wmt14_enfr(tmp_path):
    lines = _dry("wmt14_enfr", tmp_path)
    public = f"{tmp_path}/work/teacher/public/wmt14.en-fr.joined-dict.transformer"
    _one(lines, "download.py", "https://dl.fbaipublicfiles.com/fairseq/models/wmt14.en-fr.joined-dict.transformer.tar.bz2")
    _one(lines, "fairseq-preprocess", f"--srcdict {public}/dict.en.txt --tgtdict {public}/dict.fr.txt")
    _one(lines, "--config-name wmt14_enfr_finetune", f"checkpoint.finetune_from_model={tmp_path}/work/checkpoints/calibrated.pt")
    _one(lines, "fairseq-generate", "t2r/checkpoint_best.pt", "--beam 4 --lenpen 0.6")
    _one(lines, "sacrebleu_from_generate", "t2r.generate.txt", "--detok-lang fr")
    _one(lines, "sacrebleu_from_generate", "t2r.generate.txt", "--tokenised")
    assert not any("--compound-split" in l for l in lines)


def test_dry_run_wmt17_zhen(tmp_path):
    lines = _dry("wmt17_zhen", tmp_path)
    _one(lines, "data-prep/wmt17_zhen.sh", "--spm-vocab 32000")
    _one(lines, "--config-name wmt17_zhen_teacher", "optimization.max_update=300000")
    _one(lines, "--config-name wmt17_zhen_finetune", "checkpoint.finetune_from_model=", "checkpoints/calibrated.pt")
    gen = _one(lines, "fairseq-generate", "t2r/checkpoint_best.pt")
    assert "--beam 5 --lenpen 1.0" in gen and "--post-process sentencepiece" in gen
    score = _one(lines, "sacrebleu_from_generate", "t2r.generate.txt")
    assert "--ref" in score and "test.en" in score and "--tokenize 13a" in score and "--detok-lang" not in score
    proc = recipe("wmt17_zhen", "--dry-run", "--out", str(tmp_path / "w"), ok=False, TEACHER="download")
    assert proc.returncode == 2 and "no public WMT17 ZH-EN checkpoint" in proc.stderr


def test_dry_run_wikitext103_lm(tmp_path):
    lines = _dry("wikitext103_lm", tmp_path)
    public = f"{tmp_path}/work/teacher/public/adaptive_lm_wiki103.v2"
    _one(lines, "download.py", "https://dl.fbaipublicfiles.com/fairseq/models/lm/adaptive_lm_wiki103.v2.tar.bz2")
    _one(lines, "fairseq-preprocess", "--only-source", f"--srcdict {public}/dict.txt")
    ft = _one(lines, "--config-name wikitext103_lm_finetune")
    for part in [f"checkpoint.finetune_from_model={tmp_path}/work/checkpoints/calibrated.pt", "task.tokens_per_sample=512",
                 "model.feature_map=t2r_qk model.feature_map_lr_scale=8.0", "model.decoder_layers=16",
                 "optimization.max_update=50000", "lr_scheduler.lr_period_updates=46000", "'optimization.update_freq=[3]'"]:
        assert part in ft, (part, ft)
    t2r = [l for l in lines if "fairseq-eval-lm" in l and "t2r/checkpoint_best.pt" in l]
    assert len(t2r) == 2 and all("--tokens-per-sample 512 --context-window 480" in l for l in t2r)
    assert all("--distributed-world-size 1" in l and "--required-batch-size-multiple 1" in l for l in t2r)
    assert {re.search(r"--gen-subset (\w+)", l).group(1) for l in t2r} == {"valid", "test"}
    teacher = _one(lines, "fairseq-eval-lm", f"--path {public}/model.pt", "--gen-subset test")
    assert "--tokens-per-sample 3072 --context-window 2560" in teacher


# The teacher checkpoint each recipe's dry run names (under the work dir), and whether tools.convert gets a
# cross-attention feature size (translation).
TEACHERS = {
    "wikitext103_lm": ("teacher/public/adaptive_lm_wiki103.v2/model.pt", False),
    "wmt14_ende": ("teacher/public/wmt16.en-de.joined-dict.transformer/model.pt", True),
    "wmt14_enfr": ("teacher/public/wmt14.en-fr.joined-dict.transformer/model.pt", True),
    "wmt17_zhen": ("checkpoints/teacher/checkpoint_best.pt", True),
}
CALIBRATED_START = ("checkpoint.finetune_from_model={work}/checkpoints/calibrated.pt model.feature_map=t2r_qk "
                    "model.feature_map_lr_scale=8.0")
PLAIN_START = "checkpoint.finetune_from_model={teacher} model.feature_map=t2r model.feature_map_lr_scale=1.0"


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_calibrate_stage(name, tmp_path):
    """The default (SWAP=calibrated): between teacher and finetune, tools.convert swaps and calibrates the teacher
    with the recipe's feature sizes into checkpoints/calibrated.pt; finetune starts from it with t2r_qk and the
    maps' 8x learning rate; on the GPU unless CPU=1."""
    work = tmp_path / "work"
    teacher, mt = TEACHERS[name]
    lines = _dry(name, tmp_path, FEATURE_SIZE="24", **({"CROSS_ATTENTION": "linear", "CROSS_FEATURE_SIZE": "64"} if mt else {}))
    cal = _one(lines, "tools.convert")
    cross = " --cross-feature-size 64" if mt else ""
    assert cal == (f"{BIN}/python -m t2r_fairseq.tools.convert {work}/{teacher} {work}/checkpoints/calibrated.pt "
                   f"--data {work}/data-bin --feature-map t2r_qk --feature-size 24{cross} --calibrate-steps 300 "
                   f"--seed 1 --device cuda 2>&1 | tee -a {work}/logs/calibrate.log")
    ft = _one(lines, f"--config-name {name}_finetune")
    assert lines.index(cal) < lines.index(ft)
    assert CALIBRATED_START.format(work=work) in ft and "model.feature_size=24" in ft and f"{work}/{teacher}" not in ft
    assert ("model.cross_feature_size=64" in ft) == mt
    if name != "wmt17_zhen":  # a public teacher: fetched before it is calibrated
        assert lines.index(_one(lines, "download.py")) < lines.index(cal)
    cpu = _dry(name, tmp_path, "--stages", "calibrate", CPU="1", CALIBRATE_STEPS="0")
    assert len(cpu) == 1 and cpu[0].endswith(f"--calibrate-steps 0 --seed 1 --device cpu 2>&1 | tee -a {work}/logs/calibrate.log")


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_plain_swap_restores_the_papers_commands(name, tmp_path):
    """SWAP=plain: no tools.convert, and the finetune loads the teacher itself with the paper's tied map and one
    learning rate; every other command is the default's, unchanged."""
    work = tmp_path / "work"
    teacher = f"{work}/{TEACHERS[name][0]}"
    # the paper's swap makes the cross-attention linear too (CROSS_ATTENTION's default follows SWAP)
    default = _dry(name, tmp_path, **({"CROSS_ATTENTION": "linear"} if TEACHERS[name][1] else {}))
    proc = recipe(name, "--dry-run", "--out", str(work), SWAP="plain")
    plain = proc.stdout.splitlines()
    assert "calibrate: nothing to do with SWAP=plain" in proc.stderr and "calibrated.pt" not in proc.stdout
    assert plain == [l.replace(CALIBRATED_START.format(work=work), PLAIN_START.format(teacher=teacher))
                     for l in default if "tools.convert" not in l]
    assert PLAIN_START.format(teacher=teacher) in _one(plain, f"--config-name {name}_finetune")
    # the switch alone: calibrate's marker and --force do not matter to it
    forced = recipe(name, "--dry-run", "--out", str(work), "--stages", "calibrate", "--force", SWAP="plain")
    assert forced.stdout == "" and "nothing to do with SWAP=plain" in forced.stderr


@pytest.mark.parametrize("name", [r for r in RECIPES if TEACHERS[r][1]])
def test_dry_run_cross_attention_follows_the_switch(name, tmp_path):
    """CROSS_ATTENTION: fairseq's softmax cross-attention by default (tools.convert and the finetune both told, no
    cross feature map), the paper's linear one with SWAP=plain or CROSS_ATTENTION=linear; each switch alone."""
    runs = {
        ("calibrated", ""): ("--softmax-cross-attention", "model.softmax_cross_attention=true"),
        ("calibrated", "linear"): ("--cross-feature-size 128", "model.softmax_cross_attention=false model.cross_feature_size=128"),
        ("plain", ""): (None, "model.softmax_cross_attention=false model.cross_feature_size=128"),
        ("plain", "softmax"): (None, "model.softmax_cross_attention=true"),
    }
    for (swap, cross), (convert, override) in runs.items():
        lines = _dry(name, tmp_path, SWAP=swap, **({"CROSS_ATTENTION": cross} if cross else {}))
        ft = _one(lines, f"--config-name {name}_finetune")
        assert f"model.feature_size=32 {override} optimization.max_update=" in ft, (swap, cross, ft)
        assert ft.count("cross_feature_size") == ("cross_feature_size" in override), ft
        if convert is None:
            assert not any("tools.convert" in l for l in lines)
        else:
            cal = _one(lines, "tools.convert")
            assert f"--feature-size 32 {convert} --calibrate-steps" in cal, cal
            assert ("--softmax-cross-attention" in cal) != ("--cross-feature-size" in cal), cal


def test_calibrate_marker_skips_and_force_redoes(tmp_path):
    work = tmp_path / "work"
    (work / ".done").mkdir(parents=True)
    (work / ".done" / "calibrate").touch()
    proc = recipe("wmt14_ende", "--dry-run", "--out", str(work), "--stages", "calibrate,finetune")
    assert "calibrate: done (marker" in proc.stderr and "tools.convert" not in proc.stdout
    _one(proc.stdout.splitlines(), "--config-name wmt14_ende_finetune", CALIBRATED_START.format(work=work))
    forced = recipe("wmt14_ende", "--dry-run", "--out", str(work), "--stages", "calibrate", "--force").stdout.splitlines()
    assert forced[:2] == [f"rm -rf {work}/checkpoints/calibrated.pt {work}/logs/calibrate.log", f"rm -f {work}/.done/calibrate"]
    assert "tools.convert" in forced[-1] and len(forced) == 3
    assert (work / ".done" / "calibrate").exists()  # a dry run deletes nothing


def test_calibrate_runs_on_node_0_only(tmp_path):
    """Several nodes: node 0 (or Slurm rank 0) runs the calibrate stage, as prep and eval; every other node skips
    it, never deletes its output (--force), and starts its finetune from the calibrated checkpoint."""
    work = tmp_path / "work"
    multi = dict(NUM_NODES="2", MASTER_ADDR="node0", MASTER_PORT="12345")
    args = ("--dry-run", "--out", str(work), "--stages", "calibrate,finetune")
    node0 = recipe("wikitext103_lm", *args, NODE_RANK="0", **multi).stdout.splitlines()
    assert len(node0) == 2 and "tools.convert" in node0[0] and node0[0].endswith(f"--device cuda 2>&1 | tee -a {work}/logs/calibrate.log")
    assert node0[1].startswith(f"{BIN}/torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 ")
    node1 = recipe("wikitext103_lm", *args, "--force", NODE_RANK="1", **multi)
    assert "calibrate: runs on node 0 only (NODE_RANK=1)" in node1.stderr
    lines = [l for l in node1.stdout.splitlines() if not l.startswith("rm ")]
    assert "calibrated.pt" not in "".join(l for l in node1.stdout.splitlines() if l.startswith("rm "))
    assert len(lines) == 1 and lines[0].startswith(f"{BIN}/torchrun --nnodes 2 --nproc_per_node 8 --node_rank 1 ")
    assert CALIBRATED_START.format(work=work) in lines[0]
    task3 = recipe("wmt14_ende", *args, LAUNCHER="srun", SLURM_PROCID="3", SLURM_NTASKS="16", **multi)
    assert "calibrate: runs on node 0 only (NODE_RANK=0 SLURM_PROCID=3)" in task3.stderr
    assert task3.stdout == "" and "finetune" in task3.stderr  # its finetune command goes to /dev/null (srun task)


def test_other_nodes_wait_for_the_calibrated_checkpoint(tmp_path):
    """NODE_RANK>0 (no dry run): the finetune waits up to CALIBRATE_WAIT seconds for node 0's checkpoint, then
    starts (here a stand-in torchrun records its arguments), or ends with one clear line."""
    work = tmp_path / "work"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "torchrun").write_text('#!/usr/bin/env bash\necho "$@" > "$(dirname "$0")/args"\n')
    (fake / "torchrun").chmod(0o755)
    env = dict(FAIRSEQ_BIN=str(fake), NUM_NODES="2", NODE_RANK="1", TEACHER="train")
    args = ("--out", str(work), "--stages", "calibrate,finetune")
    late = recipe("wmt14_ende", *args, ok=False, CALIBRATE_WAIT="0", **env)
    assert late.returncode == 2 and not (fake / "args").exists()
    assert late.stderr.strip().splitlines()[-1] == (
        f"wmt14_ende: error: missing {work}/checkpoints/calibrated.pt (node 0's calibrate stage did not write it "
        "within CALIBRATE_WAIT=0s; run --stages calibrate on node 0, or SWAP=plain)")
    proc = subprocess.Popen(["bash", str(REPO / "recipes" / "wmt14_ende.sh"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(CALIBRATE_WAIT="60", **env))
    time.sleep(2)
    assert proc.poll() is None  # waiting
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "calibrated.pt").write_bytes(b"node 0's")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "waiting up to 60s (CALIBRATE_WAIT) for node 0's calibrate stage" in err
    started = (fake / "args").read_text()
    assert started.startswith("--nnodes 2 --nproc_per_node 8 --node_rank 1 ") and CALIBRATED_START.format(work=work) in started
    assert not (work / ".done").exists()  # only node 0 writes markers


@pytest.mark.parametrize("name", ["wmt17_zhen", "wikitext103_lm"])
def test_finetune_without_the_calibrated_checkpoint_ends_with_one_clear_line(name, tmp_path):
    work = tmp_path / "work"
    proc = recipe(name, "--out", str(work), "--stages", "finetune", ok=False, TEACHER="train")
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{name}: error: missing {work}/checkpoints/calibrated.pt (run the calibrate stage first, or SWAP=plain to "
        "finetune from the teacher itself)")


def test_dry_run_launchers(tmp_path):
    multi = _dry("wikitext103_lm", tmp_path, "--stages", "finetune", NUM_NODES="2", NODE_RANK="1",
                 MASTER_ADDR="node0", MASTER_PORT="12345")
    assert len(multi) == 1 and multi[0].startswith(f"{BIN}/torchrun --nnodes 2 --nproc_per_node 8 --node_rank 1 "
                                                   f"--master_addr node0 --master_port 12345 {BIN}/fairseq-hydra-train ")
    assert "distributed_world_size=16" in multi[0] and "'optimization.update_freq=[2]'" in multi[0]  # 3x8/16 rounded up
    cpu = _dry("wmt14_ende", tmp_path, "--stages", "finetune", CPU="1", CPU_PROCS="2")
    assert cpu[0].startswith(f"{BIN}/torchrun --nnodes 1 --nproc_per_node 2 ")
    for part in ["distributed_training.distributed_backend=gloo", "distributed_training.distributed_init_method=env://",
                 "distributed_training.distributed_no_spawn=true", "distributed_training.distributed_rank=-1",
                 "distributed_training.ddp_backend=legacy_ddp", "common.cpu=true", "common.fp16=false"]:
        assert part in cpu[0], part
    srun = _dry("wmt14_ende", tmp_path, "--stages", "finetune", LAUNCHER="srun", NUM_NODES="2", MASTER_PORT="23456")
    assert srun[0].startswith(f"{BIN}/fairseq-hydra-train ") and "distributed_training.distributed_port=23456" in srun[0]


def test_dry_run_sbatch_templates(tmp_path):
    for name in RECIPES:
        work = tmp_path / name
        proc = subprocess.run(["bash", str(REPO / "recipes" / "slurm" / f"{name}.sbatch")], capture_output=True, text=True,
                              env=_env(DRY_RUN="1", WORK=str(work), SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="4"),
                              cwd=REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert not work.exists()
        sruns = [l for l in lines if l.startswith("srun ")]
        assert [l.split("--stages ")[1] for l in sruns] == ["teacher", "finetune"]
        assert all("--nodes 2 --ntasks-per-node 4" in l and "LAUNCHER=srun" in l for l in sruns)
        ft = _one(lines, "fairseq-hydra-train", f"--config-name {name}_finetune")
        assert "distributed_world_size=8" in ft and "distributed_training.distributed_port=" in ft
        # calibration: once, one process on the first node, between the teacher and the finetune
        once = _one(lines, "--stages calibrate")
        assert once == f"env NUM_GPUS=1 NUM_NODES=1 bash recipes/{name}.sh --out {work} --stages calibrate"
        cal = _one(lines, "tools.convert")
        assert lines.index(once) < lines.index(cal) < lines.index(ft) and "--device cuda" in cal
        assert CALIBRATED_START.format(work=work) in ft
        assert any("--stages eval" in l for l in lines)


def test_stage_markers_skip_and_force(tmp_path):
    work = tmp_path / "work"
    (work / ".done").mkdir(parents=True)
    (work / ".done" / "prep").touch()
    proc = recipe("wmt17_zhen", "--dry-run", "--out", str(work), "--stages", "prep,teacher")
    assert "prep: done" in proc.stderr and "data-prep" not in proc.stdout and "wmt17_zhen_teacher" in proc.stdout
    forced = recipe("wmt17_zhen", "--dry-run", "--out", str(work), "--stages", "prep", "--force")
    assert f"rm -rf {work}/data {work}/data-bin" in forced.stdout and "data-prep/wmt17_zhen.sh" in forced.stdout
    assert (work / ".done" / "prep").exists()  # a dry run deletes nothing either


@pytest.mark.parametrize("args,env,message", [
    (["--bogus"], {}, "unknown option '--bogus'"),
    (["--stages", "prep,train"], {}, "unknown stage 'train' in --stages; valid: prep,teacher,calibrate,finetune,eval"),
    ([], {"SWAP": "paper"}, "SWAP must be 'calibrated' (the default) or 'plain' (the paper's swap) (got 'paper')"),
    ([], {"CALIBRATE_STEPS": "many"}, "CALIBRATE_STEPS must be a non-negative integer (got 'many')"),
    ([], {"TEACHER": "hub"}, "TEACHER must be 'download' or 'train'"),
    ([], {"NUM_GPUS": "eight"}, "NUM_GPUS must be a non-negative integer"),
    ([], {"LAUNCHER": "mpirun"}, "LAUNCHER must be auto, spawn, torchrun or srun"),
    ([], {"CROSS_ATTENTION": "kernel"}, "CROSS_ATTENTION must be 'softmax' (the default) or 'linear'"),
    ([], {"CROSS_FEATURE_SIZE": "64"}, "CROSS_FEATURE_SIZE sizes the linear cross-attention, but CROSS_ATTENTION is "
                                      "softmax: unset CROSS_FEATURE_SIZE, or set CROSS_ATTENTION=linear"),
    ([], {"CROSS_ATTENTION": "linear", "CROSS_FEATURE_SIZE": "0"}, "CROSS_FEATURE_SIZE must be a positive integer"),
])
def test_bad_input_one_clear_message(tmp_path, args, env, message):
    proc = recipe("wmt14_ende", "--dry-run", "--out", str(tmp_path / "w"), *args, ok=False, **env)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1] and not proc.stdout, proc.stderr
    assert len([l for l in proc.stderr.splitlines() if "error" in l]) == 1


def test_help_documents_the_environment():
    for name in RECIPES:
        out = recipe(name, "--help").stdout
        for word in ["--dry-run", "--stages", "NUM_GPUS", "MAX_UPDATE", "FEATURE_SIZE", "TRAIN_OVERRIDES", "T2R_DATA_MIRROR",
                     f"recipes/slurm/{name}.sbatch", "calibrate", "SWAP [calibrated] | plain", "CALIBRATE_STEPS",
                     "CALIBRATE_WAIT", "CALIBRATE_ARGS", "model.feature_map=t2r model.feature_map_lr_scale=1.0"]:
            assert word in out, (name, word)
        assert ("CROSS_ATTENTION [softmax] | linear" in out) == (name != "wikitext103_lm"), name


# ---- configs and scorer -----------------------------------------------------------------------------------------


def test_configs_parse_and_match_the_teachers():
    from omegaconf import OmegaConf

    import t2r_fairseq  # noqa: F401  (registers the t2r archs)
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.models.transformer_lm import transformer_lm_baevski_wiki103
    from argparse import Namespace

    cfgs = {p.stem: OmegaConf.load(p) for p in sorted((REPO / "recipes" / "configs").glob("*.yaml"))}
    assert set(cfgs) == {f"{r}_{k}" for r in RECIPES for k in ("teacher", "finetune")}
    for name, cfg in cfgs.items():
        assert OmegaConf.is_missing(cfg.common, "user_dir") and OmegaConf.is_missing(cfg.task, "data"), name
        assert cfg.model._name in ARCH_MODEL_REGISTRY, name
        text = (REPO / "recipes" / "configs" / f"{name}.yaml").read_text()
        assert "Sources:" in text and "our choice" in text, name
        if name.endswith("_finetune"):
            teacher = cfgs[name.replace("_finetune", "_teacher")]
            assert OmegaConf.is_missing(cfg.checkpoint, "finetune_from_model")
            sizes = {k: v for k, v in teacher.model.items() if k != "_name"}
            assert {k: cfg.model[k] for k in sizes} == sizes, name  # same shapes as the teacher: the swap loads it
            assert cfg.model._name in {"t2r_" + teacher.model._name, "t2r_transformer_lm"}, name
    # The LM configs spell out fairseq's transformer_lm_wiki103 preset (hydra does not apply presets to
    # dataclass models), so the public adaptive_lm_wiki103.v2 checkpoint loads into the T2R model.
    preset = Namespace()
    transformer_lm_baevski_wiki103(preset)
    for key, value in cfgs["wikitext103_lm_finetune"].model.items():
        if hasattr(preset, key) and key not in {"decoder_layerdrop"}:
            assert getattr(preset, key) == value, key


def test_scorer_modes(tmp_path, capsys):
    from t2r_fairseq.tools.sacrebleu_from_generate import compound_split, main, moses_detokenize

    assert compound_split("ein weit-bekannt Haus a @-@ b") == "ein weit ##AT##-##AT## bekannt Haus a @ ##AT##-##AT## @ b"
    assert moses_detokenize(["Das ist &quot; gut &quot; , weit @-@ bekannt ."], "de") == ['Das ist "gut", weit-bekannt.']
    log = tmp_path / "gen.txt"
    log.write_text("S-1\tx\nT-1\tdas ist weit @-@ bekannt .\nH-1\t-0.1\tdas ist weit @-@ bekannt .\n"
                   "D-1\t-0.1\tdas ist weit @-@ bekannt .\nT-0\tein Haus .\nD-0\t-0.2\tein Haus .\n")
    ref = tmp_path / "ref.de"
    ref.write_text("ein Haus.\ndas ist weit-bekannt.\n")
    for args, expected in [([], "sacreBLEU = 100.00 (2 sentences) signature: nrefs:1|case:mixed|eff:no|tok:13a"),
                           (["--ref", str(ref), "--detok-lang", "de"], "sacreBLEU = 100.00 (2 sentences)"),
                           (["--compound-split"], "compound-split BLEU = 100.00 (2 sentences"),
                           (["--tokenised", "--label", "x y"], "tokenised BLEU = 100.00")]:
        main([str(log), *args])
        out = capsys.readouterr().out
        assert expected in out, (args, out)
    assert out.rstrip().endswith("[x y]")
    ref.write_text("ein Haus.\ndas ist weit-bekannt.\nein drittes.\n")
    with pytest.raises(SystemExit, match=r"2 hypotheses but the reference file has 3 lines \(missing ids: \[2\]"):
        main([str(log), "--ref", str(ref)])


# ---- end to end on the upstream-layout fixture ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    from make_fixtures import make_fixtures

    root = tmp_path_factory.mktemp("mirror")
    make_fixtures(root)
    return root


def _mirror_env(mirror: Path, **extra: str) -> dict[str, str]:
    env = dict(T2R_DATA_MIRROR=f"file://{mirror}", T2R_DATA_CHECKSUMS=str(mirror / "SHA256SUMS"), CPU="1",
               PREP_WORKERS="1", MASTER_PORT=_free_port())
    env.update(extra)
    return env


def _mt_env(mirror: Path, **extra: str) -> dict[str, str]:
    env = dict(TEACHER="train", BPE_TOKENS="200", SPM_VOCAB="200", TEACHER_MAX_UPDATE="30", MAX_UPDATE="15",
               MAX_TOKENS="1024", FEATURE_SIZE="8", CALIBRATE_STEPS="2", TRAIN_OVERRIDES=MT_TINY)
    env.update(extra)
    return _mirror_env(mirror, **env)


@pytest.fixture(scope="module")
def ende(mirror, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("ende")
    return work, recipe("wmt14_ende", "--out", str(work), **_mt_env(mirror))


def test_wmt14_ende_end_to_end_and_rerun_skips(ende, mirror):
    work, proc = ende
    for name in ("teacher", "t2r"):
        assert re.search(BLEU_LINE.format("wmt14_ende", name), proc.stdout), proc.stdout[-3000:]
        assert re.search(rf"compound-split BLEU = [\d.]+ \(30 sentences; .*tok:none.*\) \[wmt14_ende {name}\]", proc.stdout)
    assert "T2R swap: reused" in (work / "logs" / "calibrate.log").read_text()  # tools.convert swapped the teacher
    assert re.search(r"calibrat\w+: \d+ layers", (work / "logs" / "calibrate.log").read_text())
    assert f"{work}/checkpoints/calibrated.pt" in (work / "logs" / "finetune.log").read_text()
    assert sorted(p.name for p in (work / ".done").iterdir()) == ["calibrate", "eval", "finetune", "prep", "teacher"]
    again = recipe("wmt14_ende", "--out", str(work), **_mt_env(mirror))
    assert again.stderr.count("done (marker") == 5 and "fairseq" not in again.stdout and "convert" not in again.stdout


def _pack_public_archive(dest: Path, name: str, files: dict[str, Path]) -> None:
    """A stand-in for a fairseq model archive: NAME.tar.bz2 holding NAME/{model.pt,dict*.txt,bpecodes}."""
    with tarfile.open(dest / f"{name}.tar.bz2", "w:bz2") as tar:
        for member, src in files.items():
            tar.add(src, arcname=f"{name}/{member}")


def test_wmt14_ende_public_checkpoint_path(ende, mirror, tmp_path):
    """TEACHER=download: the archive's BPE codes segment the data, its dictionaries binarise it, its model.pt is
    the teacher; served through the mirror like every other download."""
    trained, _ = ende
    served = tmp_path / "mirror"
    served.mkdir()
    for f in mirror.iterdir():
        (served / f.name).symlink_to(f)
    name = "wmt16.en-de.joined-dict.transformer"
    _pack_public_archive(served, name, {"model.pt": trained / "checkpoints/teacher/checkpoint_best.pt",
                                        "dict.en.txt": trained / "data-bin/dict.en.txt",
                                        "dict.de.txt": trained / "data-bin/dict.de.txt",
                                        "bpecodes": trained / "data/code"})
    work = tmp_path / "work"
    # the stages that read the archive; finetune and eval run the same commands as with a trained teacher (above),
    # and the dry run checks that eval scores the archive's model.pt
    proc = recipe("wmt14_ende", "--out", str(work), "--stages", "prep,calibrate", **_mt_env(served, TEACHER="download"))
    public = work / "teacher/public" / name
    assert (work / "data-bin/dict.en.txt").read_text() == (public / "dict.en.txt").read_text()
    assert (work / "data/code").read_text() == (public / "bpecodes").read_text()
    assert not (work / "checkpoints/teacher").exists()  # nothing retrained
    assert f"tools.convert {public}/model.pt {work}/checkpoints/calibrated.pt" in proc.stderr
    assert "T2R swap: reused" in (work / "logs/calibrate.log").read_text()
    assert (work / "checkpoints/calibrated.pt").exists()


def test_wmt14_enfr_prep(mirror, tmp_path):
    """EN-FR's own part of the pipeline, its data (corpora, BPE learned on them, a joined dictionary): the stages
    after it are wmt14_ende's with other paths (the dry runs check those commands, test_scorer_modes its scorer)."""
    recipe("wmt14_enfr", "--out", str(tmp_path), "--stages", "prep", **_mt_env(mirror))
    from fairseq.data import Dictionary

    en, fr = (Dictionary.load(str(tmp_path / "data-bin" / f"dict.{lang}.txt")) for lang in ("en", "fr"))
    assert en.symbols == fr.symbols and len(en) > 4  # joined
    for split in ("train", "valid", "test"):
        assert (tmp_path / "data-bin" / f"{split}.en-fr.fr.bin").stat().st_size > 0
    assert (tmp_path / ".done" / "prep").exists()


@pytest.fixture(scope="module")
def zhen(mirror, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """ZH-EN's own data (SentencePiece, separate dictionaries) and teacher; its calibrate, finetune and eval
    stages run in tests/test_rehearsal.py (the same recipe code on synthetic data of its dictionary shape)."""
    work = tmp_path_factory.mktemp("zhen")
    return work, recipe("wmt17_zhen", "--out", str(work), "--stages", "prep,teacher", **_mt_env(mirror))


def test_wmt17_zhen_prep_and_teacher(zhen):
    from fairseq.data import Dictionary

    work, _ = zhen
    assert (work / "data/spm.model").exists()
    zh, en = (Dictionary.load(str(work / "data-bin" / f"dict.{lang}.txt")) for lang in ("zh", "en"))
    assert zh.symbols != en.symbols  # separate vocabularies
    assert (work / "checkpoints/teacher/checkpoint_best.pt").exists()
    assert sorted(p.name for p in (work / ".done").iterdir()) == ["prep", "teacher"]


def test_two_process_cpu_distributed_finetune(zhen, tmp_path):
    """CPU_PROCS=2: torchrun starts two gloo workers of fairseq-hydra-train; rank 0 loads the teacher and
    broadcasts it (the swap) to rank 1; both train on their shard of each batch. SWAP=plain: the paper's swap,
    the teacher loaded by the finetune itself with the tied map."""
    trained, _ = zhen
    work = tmp_path / "work"
    (work / ".done").mkdir(parents=True)
    (work / "data-bin").symlink_to(trained / "data-bin")
    (work / ".done" / "prep").touch()
    proc = recipe("wmt17_zhen", "--out", str(work), "--stages", "finetune", CPU="1", CPU_PROCS="2",
                  MASTER_PORT=_free_port(), TEACHER_CKPT=str(trained / "checkpoints/teacher/checkpoint_best.pt"),
                  MAX_UPDATE="6", MAX_TOKENS="1024", FEATURE_SIZE="8", TRAIN_OVERRIDES=MT_TINY, SWAP="plain")
    log = (work / "logs" / "finetune.log").read_text()
    assert "model.feature_map=t2r model.feature_map_lr_scale=1.0" in proc.stderr
    assert len(re.findall(r"distributed init \(rank -1\): env://", log)) == 2, log[-3000:]
    assert "training on 2 devices" in log and "T2R swap: reused" in log
    assert re.search(r"\| train \| .*num_updates 6 ", log) or "num_updates 6" in log
    assert "done training" in log and (work / "checkpoints/t2r/checkpoint_last.pt").exists()
    assert f"torchrun --nnodes 1 --nproc_per_node 2" in proc.stderr


@pytest.fixture(scope="module")
def lm(mirror, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("lm")
    env = _mirror_env(mirror, TEACHER="train", LAYERS="2", TOKENS_PER_SAMPLE="64", EVAL_TOKENS_PER_SAMPLE="64",
                      EVAL_CONTEXT_WINDOW="32", TEACHER_MAX_UPDATE="20", MAX_UPDATE="10", WARMUP_UPDATES="2",
                      MAX_TOKENS="1024", FEATURE_SIZE="8", CALIBRATE_STEPS="2", EVAL_SUBSETS="test", TRAIN_OVERRIDES=LM_TINY,
                      TEACHER_OVERRIDES="lr_scheduler.warmup_updates=5")
    return work, recipe("wikitext103_lm", "--out", str(work), **env)


def test_wikitext103_lm_end_to_end(lm):
    work, proc = lm
    for name in ("teacher", "t2r"):
        assert re.search(rf"^wikitext103_lm {name} test: Perplexity: [\d.]+ \(tokens per sample 64, context window 32\)$",
                         proc.stdout, flags=re.M), proc.stdout[-3000:]
    assert "--context-window 32" in (work / "eval/t2r.test.eval-lm.txt").read_text() or "context_window': 32" in (
        work / "eval/t2r.test.eval-lm.txt").read_text()


def test_wikitext103_lm_public_checkpoint_path(lm, mirror, tmp_path):
    """TEACHER=download (the default): adaptive_lm_wiki103.v2.tar.bz2 -> its dict.txt binarises the corpus and
    its model.pt (adaptive input/softmax) is swapped into the T2R model and calibrated."""
    trained, _ = lm
    served = tmp_path / "mirror"
    served.mkdir()
    for f in mirror.iterdir():
        (served / f.name).symlink_to(f)
    name = "adaptive_lm_wiki103.v2"
    _pack_public_archive(served, name, {"model.pt": trained / "checkpoints/teacher/checkpoint_best.pt",
                                        "dict.txt": trained / "data-bin/dict.txt"})
    work = tmp_path / "work"
    env = _mirror_env(served, LAYERS="2", TOKENS_PER_SAMPLE="64", MAX_TOKENS="1024", FEATURE_SIZE="8",
                      CALIBRATE_STEPS="2", TRAIN_OVERRIDES=LM_TINY)
    # the stages that read the archive; finetune and eval run the same commands as with a trained teacher (above),
    # and the dry run checks the public teacher's own evaluation settings
    recipe("wikitext103_lm", "--out", str(work), "--stages", "prep,calibrate", **env)
    assert (work / "checkpoints/calibrated.pt").exists()
    assert (work / "data-bin/dict.txt").read_text() == (trained / "data-bin/dict.txt").read_text()
    assert not (work / "checkpoints/teacher").exists()
    assert "T2R swap: reused" in (work / "logs/calibrate.log").read_text()


def test_interrupted_finetune_resumes_from_checkpoint_last(lm, mirror):
    """No marker (as after a crash or a time-out): the stage re-issues the same command and fairseq continues
    from checkpoint_last.pt instead of swapping the teacher in again."""
    work, _ = lm
    (work / ".done" / "finetune").unlink()
    log = work / "logs" / "finetune.log"
    before = len(log.read_text())
    env = _mirror_env(mirror, TEACHER="train", LAYERS="2", TOKENS_PER_SAMPLE="64", MAX_UPDATE="14",
                      WARMUP_UPDATES="2", MAX_TOKENS="1024", FEATURE_SIZE="8", TRAIN_OVERRIDES=LM_TINY)
    recipe("wikitext103_lm", "--out", str(work), "--stages", "finetune", **env)
    new = log.read_text()[before:]
    assert "T2R swap:" not in new and re.search(r"loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 10 updates\)", new, flags=re.I), new[-3000:]
    assert "num_updates 14" in new and (work / ".done" / "finetune").exists()
