"""Attention transfer (--criterion t2r_attention_transfer): the teacher equals fairseq's softmax attention,
the loss is zero when the student reproduces the teacher and falls under optimisation, and real
fairseq-train runs log per-layer losses, train only feature maps in the transfer-only stage and write
checkpoints that load for generation without the teacher."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from fairseq import utils
from fairseq.modules.multihead_attention import MultiheadAttention
from torch import Tensor, nn

import t2r_fairseq  # noqa: F401  (registration)
from helpers import LM_TASK, MT_TASK, TRAIN, USER_DIR, run
from t2r_fairseq.criterions.attention_transfer import AttentionTransferCriterion, metric_name
from t2r_fairseq.modules.attention_source import LayerAttention
from t2r_fairseq.modules.feature_maps import FeatureMap
from t2r_fairseq.modules.linear_multihead_attention import LinearAttentionOptions, LinearMultiheadAttention
from t2r_fairseq.modules.softmax_teacher import SoftmaxAttentionTeacher
from t2r_fairseq.tools.attention_gap import attention_gap

C, H = 32, 4


def _pad_mask(lengths: list[int], total: int) -> Tensor:
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def _criterion(loss: str) -> AttentionTransferCriterion:
    # task=None: no dictionary, padding handled by the masks given to layer_loss
    return AttentionTransferCriterion(None, sentence_avg=False, label_smoothing=0.0, transfer_loss=loss)


def _student(feature_map: str = "t2r", role: str = "causal", feature_size: int = 16) -> LinearMultiheadAttention:
    cross = role == "cross"
    return LinearMultiheadAttention(
        C, H, LinearAttentionOptions(feature_map=feature_map, feature_size=feature_size),
        kdim=24 if cross else None, vdim=24 if cross else None,
        self_attention=not cross, encoder_decoder_attention=cross, causal=role == "causal",
    )


# -- the teacher is fairseq's softmax attention -------------------------------------------------


@pytest.mark.parametrize("role", ["causal", "cross"])
def test_teacher_equals_fairseq_multihead_attention(role):
    torch.manual_seed(0)
    cross = role == "cross"
    kdim = 24 if cross else C
    mha = MultiheadAttention(C, H, kdim=kdim, vdim=kdim, self_attention=not cross,
                             encoder_decoder_attention=cross).eval()
    student = _student(role=role)
    teacher = SoftmaxAttentionTeacher.from_state_dict({f"l.{k}": v for k, v in mha.state_dict().items()}, "l", student)
    T, S, B = 7, (9 if cross else 7), 3
    x = torch.randn(T, B, C)
    mem = torch.randn(S, B, kdim) if cross else x
    kpm = _pad_mask([S, S - 2, S - 4], S)
    attn_mask = utils.fill_with_neg_inf(torch.zeros(T, T)).triu(1) if not cross else None
    ref, ref_w = mha(x, mem, mem, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=True, need_head_weights=True)
    attention = LayerAttention.of(teacher, x, mem, mem, kpm)
    out, w = attention.output(), attention.weights()
    rows = ~_pad_mask([T, T - 2, T - 4], T) if not cross else torch.ones(B, T, dtype=torch.bool)
    # rows whose keys are all padding are undefined in fairseq (NaN); compare the real ones
    assert torch.allclose(out.transpose(0, 1)[rows], ref.transpose(0, 1)[rows], atol=1e-5)
    # fairseq's fused path returns head-averaged weights [B, T, S]; its own path [H, B, T, S]
    ref_mean = ref_w if ref_w.dim() == 3 else ref_w.mean(dim=0)
    assert torch.allclose(w.mean(dim=1)[rows], ref_mean[rows], atol=1e-6)


# -- zero when the student reproduces the teacher ------------------------------------------------


class CodebookSoftmaxMap(FeatureMap):
    """A constructed feature map that reproduces softmax exactly when keys come from a known codebook.

    Queries: ``phi(q) = [exp(q . c_1), ..., exp(q . c_m)]``; keys: the one-hot index of the codebook
    entry they equal. Then ``phi(q) . phi(k_j) = exp(q . k_j)``: the softmax kernel, so linear attention
    is softmax attention.
    """

    def __init__(self, codebook_keys: Tensor) -> None:  # [H, m, d]
        super().__init__(codebook_keys.size(0), codebook_keys.size(2), codebook_keys.size(1))
        self.register_buffer("codes", codebook_keys)

    def forward(self, x: Tensor, is_query: bool) -> Tensor:
        if is_query:
            return torch.exp(torch.matmul(x, self.codes.transpose(-1, -2)))
        nearest = torch.cdist(x, self.codes.unsqueeze(0).expand(x.size(0), -1, -1, -1)).argmin(dim=-1)
        return nn.functional.one_hot(nearest, self.codes.size(1)).to(x.dtype)


@pytest.mark.parametrize("role", ["causal", "cross", "bidirectional"])
@pytest.mark.parametrize("loss", ["output_mse", "attention_ce"])
def test_loss_is_zero_when_student_reproduces_teacher(role, loss):
    torch.manual_seed(1)
    student = _student(role=role)
    kdim = student.kdim
    vocab = torch.randn(6, kdim)  # inputs drawn from 6 vectors -> keys from 6 codes per head
    codes = student._heads(student.k_proj(vocab).unsqueeze(1)).squeeze(0)  # [H, 6, d]
    teacher = SoftmaxAttentionTeacher.from_state_dict({f"a.{k}": v for k, v in student.state_dict().items()}, "a", student)
    T, S, B = 8, (10 if role == "cross" else 8), 2
    ids = torch.randint(0, 6, (S, B))
    key = vocab[ids]
    query = torch.randn(T, B, C) if role == "cross" else key
    kpm = _pad_mask([S, S - 3], S)
    call = {"query": query, "key": key, "value": key, "key_padding_mask": kpm}
    crit = _criterion(loss)
    baseline = crit.layer_loss(student, teacher, call).item()  # the T2R map: not softmax
    student.feature_map = CodebookSoftmaxMap(codes.detach())
    exact = crit.layer_loss(student, teacher, call).item()
    assert abs(exact) < 1e-5, exact
    assert baseline > 1e-3 and baseline > 100 * abs(exact)


# -- and decreases under optimisation --------------------------------------------------------------


@pytest.mark.parametrize("feature_map", ["t2r", "hedgehog"])
@pytest.mark.parametrize("loss", ["output_mse", "attention_ce"])
def test_loss_decreases_when_training_the_feature_map(feature_map, loss):
    torch.manual_seed(2)
    student = _student(feature_map, role="causal", feature_size=8)
    teacher = SoftmaxAttentionTeacher.from_student(student)
    x = torch.randn(16, 4, C)
    call = {"query": x, "key": x, "value": x, "key_padding_mask": _pad_mask([16, 16, 12, 9], 16)}
    crit = _criterion(loss)
    opt = torch.optim.Adam(student.feature_map.parameters(), lr=2e-2)
    losses = []
    for _ in range(30):
        value = crit.layer_loss(student, teacher, call, query_mask=~call["key_padding_mask"])
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_schedule_and_metric_names():
    crit = AttentionTransferCriterion(None, False, 0.0, transfer_weight=1.0, transfer_weight_end=0.0,
                                      transfer_anneal_updates=10, transfer_only_updates=5)
    assert crit.schedule(0) == (True, 1.0) and crit.schedule(4) == (True, 1.0)
    assert crit.schedule(5) == (False, 1.0)
    assert crit.schedule(10) == (False, 0.5) and crit.schedule(100) == (False, 0.0)
    assert metric_name("decoder.layers.3.encoder_attn") == "at_dec3_cross"
    assert metric_name("module.encoder.layers.0.self_attn") == "at_enc0_self"


# -- through fairseq-train / eval-lm / generate ----------------------------------------------------


def _values(log: str, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf"\b{key}=([-\d.e]+)", log)]


def test_lm_transfer_stage_then_task_finetune(work, tmp_path):
    teacher = tmp_path / "teacher.pt"  # a copy we delete afterwards: generation must not need it
    shutil.copy(work / "lm-teacher" / "checkpoint_last.pt", teacher)
    save, tb = tmp_path / "ckpt", tmp_path / "tb"
    proc = run("fairseq-train", work / "bin-lm", "--user-dir", USER_DIR, *LM_TASK, "--arch", "t2r_transformer_lm",
               "--feature-size", "8", *TRAIN, "--lr", "5e-3", "--log-interval", "1", "--max-update", "8",
               "--criterion", "t2r_attention_transfer", "--transfer-only-updates", "5", "--transfer-weight", "0.5",
               "--save-interval-updates", "5", "--save-dir", save, "--finetune-from-model", teacher,
               "--tensorboard-logdir", tb)
    log = proc.stdout + proc.stderr
    train_lines = [l for l in log.splitlines() if "| train_inner |" in l]
    assert len(train_lines) == 8 and all("at_dec0_self=" in l and "at_dec1_self=" in l for l in train_lines)
    transfer = _values("\n".join(train_lines), "transfer")
    assert transfer[4] < transfer[0], transfer  # the transfer-only stage lowers the transfer loss
    assert re.search(r"\| valid on 'valid' subset \|.*\| at_dec1_self [\d.]+ \|", log)
    events = b"".join(p.read_bytes() for p in tb.rglob("events.out.tfevents*"))
    assert b"at_dec0_self" in events and b"at_dec1_self" in events

    # Stage 1 trained only the feature maps: every other tensor is still the teacher's, bit for bit.
    (stage1_path,) = save.glob("checkpoint_*_5.pt")  # written after update 5, the last transfer-only one
    stage1 = torch.load(stage1_path, map_location="cpu", weights_only=False)["model"]
    final = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    teacher_state = torch.load(teacher, map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(stage1[k], v) for k, v in teacher_state.items())
    assert any(not torch.equal(final["model"][k], v) for k, v in teacher_state.items())  # stage 2: task loss
    assert set(final["model"]) == set(stage1) and not final.get("criterion")  # no teacher tensors saved

    # The gap tool re-measures, in eval mode, what the last validation logged.
    gap = attention_gap(str(work / "bin-lm"), str(save / "checkpoint_last.pt"), str(teacher), cpu=True)
    last_valid = [l for l in log.splitlines() if "valid on 'valid' subset" in l][-1]
    for key in ("at_dec0_self", "at_dec1_self", "transfer", "ppl"):
        logged = float(re.search(rf"\| {key} ([\d.]+)", last_valid).group(1))
        assert gap[key] == pytest.approx(logged, rel=0.05), (key, gap, last_valid)

    teacher.unlink()
    ev = run("fairseq-eval-lm", work / "bin-lm", "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
             "--cpu", "--tokens-per-sample", "64", "--max-tokens", "2048")
    assert re.search(r"Perplexity: [\d.]+", ev.stdout + ev.stderr)


def test_mt_attention_ce_hedgehog_all_roles_then_generate_without_teacher(work, tmp_path):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(work / "mt-teacher" / "checkpoint_last.pt", teacher)
    save = tmp_path / "ckpt"
    proc = run("fairseq-train", work / "bin-mt", "--user-dir", USER_DIR, *MT_TASK, "--arch", "t2r_transformer",
               "--feature-map", "hedgehog", "--feature-size", "8", "--swap-encoder", *TRAIN, "--max-update", "6",
               "--criterion", "t2r_attention_transfer", "--transfer-loss", "attention_ce", "--label-smoothing", "0.1",
               "--transfer-only-updates", "3", "--save-dir", save, "--finetune-from-model", teacher)
    log = proc.stdout + proc.stderr
    last = [l for l in log.splitlines() if "| train |" in l][-1]
    for key in ("at_enc0_self", "at_enc1_self", "at_dec0_self", "at_dec1_self", "at_dec0_cross", "at_dec1_cross"):
        assert re.search(rf"\| {key} [\d.]+ \|", last), last  # a KL: never negative
    teacher.unlink()
    gen = run("fairseq-generate", work / "bin-mt", "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
              "--beam", "2", "--cpu", "--max-tokens", "2048")
    assert re.search(r"Generate test with beam=2: BLEU4 = [\d.]+", gen.stdout + gen.stderr)


def test_t2r_checkpoint_as_teacher_is_refused(work, tmp_path):
    from t2r_fairseq.tools.convert import convert

    save = tmp_path / "ckpt"
    t2r = tmp_path / "t2r.pt"  # a T2R checkpoint (the swap, written by tools.convert in this process)
    convert(str(work / "lm-teacher" / "checkpoint_last.pt"), str(t2r), str(work / "bin-lm"), {"feature_size": 8},
            calibrate_steps=0, device="cpu")
    proc = run("fairseq-train", work / "bin-lm", "--user-dir", USER_DIR, *LM_TASK, "--arch", "t2r_transformer_lm",
               "--feature-size", "8", *TRAIN, "--max-update", "2", "--save-dir", save,
               "--criterion", "t2r_attention_transfer", "--transfer-teacher", t2r, ok=False)
    assert proc.returncode != 0
    assert re.search(r"TeacherLoadError: teacher checkpoint .*t2r\.pt is a T2R checkpoint", proc.stderr), proc.stderr[-2000:]
    assert not list(save.glob("*.pt"))


# -- the schedule reads fairseq's update count on every model the criterion accepts (top-k too) ----------------


@pytest.fixture
def trainer_metrics():
    """fairseq's metrics as fairseq-train starts them (``metrics.reset()``), and reset again afterwards: the trainer
    publishes its update count there, and no later test in this process should read this one's."""
    from fairseq.logging import metrics

    metrics.reset()
    yield
    metrics.reset()


def _topk_trainer(tmp_path, *criterion_args: str):
    """A tiny top-k LM (whose modules keep no update count), the criterion and fairseq's own Trainer over them."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer
    from helpers import build_lm

    args, task, model = build_lm(tmp_path, arch="topk_transformer_lm", extra=[
        "--topk-k", "2", "--optimizer", "adam", "--lr", "1e-3", "--criterion", "t2r_attention_transfer",
        "--transfer-teacher-projections", "student", *criterion_args])
    cfg = convert_namespace_to_omegaconf(args)
    criterion = task.build_criterion(cfg.criterion)
    assert not any(hasattr(m, "num_updates") for m in model.modules())  # nothing in the model keeps the count
    return task, model, criterion, Trainer(cfg, task, model, criterion)


def _lm_sample(task, batch: int = 2, length: int = 9) -> dict:
    from helpers import random_tokens

    tokens = random_tokens(task.dictionary, batch, length + 1)
    return {"id": torch.arange(batch), "nsentences": batch, "ntokens": batch * length,
            "net_input": {"src_tokens": tokens[:, :-1].contiguous(), "src_lengths": torch.full((batch,), length)},
            "target": tokens[:, 1:].contiguous()}


def test_transfer_only_stage_ends_on_a_topk_model(tmp_path, trainer_metrics):
    """``--transfer-only-updates 2`` on a top-k model: updates 0 and 1 are the transfer-only stage, update 2 on
    train on task + w * transfer. Driven as fairseq drives it: ``Trainer.set_num_updates`` (after every update and
    on resume), then ``FairseqTask.train_step``'s ``model.set_num_updates(n)`` and ``criterion(model, sample)``.
    The schedule read the count only from the T2R decoder, which top-k models lack: the stage never ended
    (stages [True, True, True, True], the loss the transfer loss alone and without gradient, for good)."""
    task, model, criterion, trainer = _topk_trainer(tmp_path, "--transfer-only-updates", "2",
                                                    "--transfer-weight", "0.5")
    sample = _lm_sample(task)
    stages = []
    for n in range(4):
        trainer.set_num_updates(n)
        model.train()
        model.set_num_updates(n)
        loss, _, log = criterion(model, sample)
        stages.append(torch.equal(log["loss"], log["transfer"]))  # the transfer-only stage's loss is transfer alone
    assert stages == [True, True, False, False]
    assert loss.requires_grad and log["loss"] > log["nll_loss"]  # task + 0.5 * transfer, trained


def test_transfer_weight_anneal_ends_on_a_topk_model_in_fairseqs_training_loop(tmp_path, trainer_metrics):
    """The same count in fairseq's own training loop (``Trainer.train_step``: forward, backward, Adam step): w
    anneals 1 -> 0 over 2 updates, after which training skips the transfer computation (no ``transfer`` logged).
    Before, w stayed at 1 on a top-k model."""
    task, _, _, trainer = _topk_trainer(tmp_path, "--transfer-weight", "1", "--transfer-weight-end", "0",
                                        "--transfer-anneal-updates", "2")
    sample = _lm_sample(task)
    logged = []
    for _ in range(4):
        logged.append("transfer" in trainer.train_step([sample]))
    assert trainer.get_num_updates() == 4
    assert logged == [True, True, False, False]
