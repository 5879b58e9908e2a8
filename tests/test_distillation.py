"""Word-level distillation (--criterion t2r_attention_transfer --distill-weight): the KL against a naive
oracle, the teacher rebuilt from its checkpoint equals fairseq's own loading of it, the criterion's logged
``distill`` is that KL between the two models' real outputs, and a real fairseq-train run optimises it."""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch
from fairseq import checkpoint_utils, tasks

import t2r_fairseq  # noqa: F401  (registration)
from helpers import MT_TASK, TRAIN, USER_DIR, run
from t2r_fairseq.checkpoint_errors import DictionaryMismatchError
from t2r_fairseq.criterions.attention_transfer import AttentionTransferCriterion, load_teacher_model
from t2r_fairseq.modules.softmax_teacher import TeacherLoadError
from t2r_fairseq.ops.distillation import token_kl


def test_token_kl_matches_naive_oracle_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    t = torch.log_softmax(torch.randn(3, 5, 7, generator=g), -1)
    s = torch.log_softmax(torch.randn(3, 5, 7, generator=g), -1)
    mask = torch.rand(3, 5, generator=g) > 0.3
    oracle = sum(
        sum(math.exp(t[b, i, v]) * (t[b, i, v] - s[b, i, v]) for v in range(7))
        for b in range(3) for i in range(5) if mask[b, i]
    )
    assert token_kl(t, s, mask).item() == pytest.approx(float(oracle), rel=1e-5)
    assert token_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert token_kl(t, s).item() > token_kl(t, s, mask).item() > 0  # KL >= 0, padding removed
    ruled_out = t.clone()
    ruled_out[..., 0] = float("-inf")  # a token the teacher gives probability 0: 0 log 0 = 0, not NaN
    ruled_out = torch.log_softmax(ruled_out, -1)
    assert torch.isfinite(token_kl(ruled_out, s))
    with pytest.raises(ValueError, match="differ in shape"):
        token_kl(t, s[..., :6])


def _valid_batch(task):
    task.load_dataset("valid")
    itr = task.get_batch_iterator(task.dataset("valid"), max_tokens=512).next_epoch_itr(shuffle=False)
    return next(iter(itr))


def test_distillation_trains_then_logs_the_kl_between_teacher_and_model(work, tmp_path):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(work / "mt-teacher" / "checkpoint_last.pt", teacher)
    save = tmp_path / "ckpt"
    # --distill-weight 1, --transfer-weight 0: the optimised loss is the distillation term alone.
    proc = run("fairseq-train", work / "bin-mt", "--user-dir", USER_DIR, *MT_TASK, "--arch", "t2r_transformer",
               "--feature-size", "8", *TRAIN, "--max-update", "6", "--log-interval", "1",
               "--criterion", "t2r_attention_transfer", "--transfer-weight", "0", "--distill-weight", "1",
               "--save-dir", save, "--finetune-from-model", teacher)
    log = proc.stdout + proc.stderr
    lines = [l for l in log.splitlines() if "| train_inner |" in l]
    assert len(lines) == 6
    for line in lines:  # fairseq logs loss in bits, distill in nats per token
        loss, kd = (float(re.search(rf"\b{k}=([\d.]+)", line).group(1)) for k in ("loss", "distill"))
        assert loss * math.log(2) == pytest.approx(kd, rel=2e-3, abs=2e-3), line
    assert re.search(r"\| valid on 'valid' subset \|.*\| distill [\d.]+ \|", log)

    # In-process: the teacher the criterion rebuilds is fairseq's own load of that checkpoint ...
    (student,), _cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(save / "checkpoint_last.pt")])
    (reference,), _ = checkpoint_utils.load_model_ensemble([str(teacher)], task=task)
    rebuilt = load_teacher_model(str(teacher), task)
    sample = _valid_batch(task)
    with torch.no_grad():
        expected_out = reference.eval()(**sample["net_input"])[0]
        assert torch.equal(rebuilt(**sample["net_input"])[0], expected_out)
        assert not rebuilt.training and not any(p.requires_grad for p in rebuilt.parameters())

        # ... and validation logs KL(teacher || model) over the real target tokens, with the task loss as "loss".
        crit = AttentionTransferCriterion(task, False, 0.1, transfer_weight=0.0, distill_weight=0.5,
                                          transfer_teacher=str(teacher))
        _, size, out = crit(student.eval(), sample)
        lt = reference.get_normalized_probs((expected_out, None), log_probs=True)
        ls = student.get_normalized_probs(student(**sample["net_input"]), log_probs=True)
        mask = sample["target"].ne(task.target_dictionary.pad())
        assert out["distill"].item() == pytest.approx(token_kl(lt, ls, mask).item(), rel=1e-5)
        plain = AttentionTransferCriterion(task, False, 0.1, transfer_weight=0.0)
        assert out["loss"].item() == pytest.approx(plain(student.eval(), sample)[2]["loss"].item(), rel=1e-6)

    # The whole teacher is never saved: the checkpoint holds the model's tensors only and no criterion state, so
    # generation needs no teacher (fairseq-generate without it: test_attention_transfer's MT test).
    saved = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert set(saved["model"]) == set(student.state_dict()) and not saved.get("criterion")


def test_distillation_teacher_must_fit_the_task(work, tmp_path):
    """A teacher of other data or another task is named before training, not met as a shape error in a step."""
    data = tmp_path / "other-data"
    data.mkdir()
    (data / "dict.txt").write_text((work / "bin-lm" / "dict.txt").read_text() + "unseen-word 1\n")
    cfg = checkpoint_utils.load_checkpoint_to_cpu(str(work / "lm-teacher" / "checkpoint_last.pt"))["cfg"].task
    cfg.data = str(data)
    lm_task = tasks.setup_task(cfg)
    with pytest.raises(DictionaryMismatchError, match=r"vocabulary has \d+ entries .* dictionary has \d+"):
        load_teacher_model(str(work / "lm-teacher" / "checkpoint_last.pt"), lm_task)
    with pytest.raises(TeacherLoadError, match=r"does not load as a model of this task"):  # an MT teacher
        load_teacher_model(str(work / "mt-teacher" / "checkpoint_last.pt"), lm_task)
