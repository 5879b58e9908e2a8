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
from t2r_fairseq.hardening.checkpoint_errors import DictionaryMismatchError
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


# -- memory over large vocabularies (docs/REHEARSAL.md): chunked losses, adaptive softmax -------------------------

ADAPTIVE = ["--adaptive-softmax-cutoff", "8,16", "--feature-size", "8", "--dropout", "0"]


def _adaptive_pair(tmp_path, adaptive: bool = True):
    """A tiny adaptive-softmax T2R LM (24 words: clusters 8 / 8 / 8) and an adaptive softmax teacher of its task
    (``adaptive=False``: the same two with a plain output projection)."""
    from helpers import build_lm

    extra = ADAPTIVE if adaptive else ADAPTIVE[2:]
    _, task, student = build_lm(tmp_path / "s", extra=extra, seed=0)
    _, _, teacher = build_lm(tmp_path / "t", arch="transformer_lm", extra=extra[:2] if adaptive else [], seed=1)
    assert (student.decoder.adaptive_softmax is not None) == adaptive == (teacher.decoder.adaptive_softmax is not None)
    return task, student, teacher.eval().requires_grad_(False)


def _lm_sample(task, batch: int = 2, length: int = 11):
    from helpers import random_tokens

    tokens = random_tokens(task.dictionary, batch, length)
    target = tokens[:, 1:].clone()
    target[1, -3:] = task.dictionary.pad()  # padding counts in neither loss
    return {"net_input": {"src_tokens": tokens[:, :-1].contiguous(), "src_lengths": torch.full((batch,), length - 1)},
            "target": target, "ntokens": int(target.ne(task.dictionary.pad()).sum())}


def _criterion(task, teacher, distill_weight: float, chunk_positions: int, label_smoothing: float = 0.1):
    crit = AttentionTransferCriterion(task, False, label_smoothing, transfer_weight=0.0, distill_weight=distill_weight,
                                      transfer_teacher_projections="student")
    crit.teachers.use_model(teacher)  # the teacher load_teacher_model would build (tested above), in-process
    crit.loss_chunk_elements = chunk_positions * len(task.target_dictionary)
    return crit


def test_chunked_losses_equal_fairseqs_whole_vocabulary_losses_on_an_adaptive_softmax(tmp_path):
    """Values: the chunked task loss and KL (3 positions per chunk) are fairseq's own whole-batch numbers, computed
    from AdaptiveSoftmax.get_log_prob over the full vocabulary, bit for bit."""
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    task, student, teacher = _adaptive_pair(tmp_path)
    sample = _lm_sample(task)
    pad = task.dictionary.pad()
    with torch.no_grad():
        _, _, out = _criterion(task, teacher, 0.5, chunk_positions=3)(student.eval(), sample)
        ls = student.get_normalized_probs(student(**sample["net_input"]), log_probs=True).view(-1, len(task.dictionary))
        lt = teacher.get_normalized_probs(teacher(**sample["net_input"]), log_probs=True).view(-1, len(task.dictionary))
        target = sample["target"].view(-1)
        loss, nll = label_smoothed_nll_loss(ls, target, 0.1, ignore_index=pad, reduce=True)
        kd = token_kl(lt, ls, target.ne(pad))
    assert torch.equal(out["loss"], loss) and torch.equal(out["nll_loss"], nll)
    assert torch.equal(out["distill"], kd) and kd > 0


def test_chunked_distillation_gradients_equal_the_unchunked_ones(tmp_path):
    """Gradients: chunks of 3 positions, each recomputed in the backward pass, give the gradients of the same loss
    computed over the whole batch at once (through the same out-of-place adaptive log-probabilities)."""
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
    from t2r_fairseq.criterions.attention_transfer import adaptive_log_probs

    task, student, teacher = _adaptive_pair(tmp_path)
    student.train()
    sample = _lm_sample(task)
    pad, a = task.dictionary.pad(), 0.5
    loss, _, out = _criterion(task, teacher, a, chunk_positions=3)(student, sample)
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()

    features = student(**sample["net_input"])[0]
    ls = adaptive_log_probs(student.decoder.adaptive_softmax, features.reshape(-1, features.size(-1)))
    with torch.no_grad():
        lt = teacher.get_normalized_probs(teacher(**sample["net_input"]), log_probs=True).view(ls.shape)
    target = sample["target"].view(-1)
    task_loss, _ = label_smoothed_nll_loss(ls, target, 0.1, ignore_index=pad, reduce=True)
    whole = (1 - a) * task_loss + a * token_kl(lt, ls, target.ne(pad))
    torch.testing.assert_close(loss, whole, rtol=1e-6, atol=0)
    whole.backward()
    assert chunked.keys() == {n for n, p in student.named_parameters() if p.grad is not None}
    assert "decoder.adaptive_softmax.head.weight" in chunked
    for name, grad in chunked.items():
        torch.testing.assert_close(grad, dict(student.named_parameters())[name].grad, rtol=1e-5, atol=1e-5, msg=name)


def test_an_adaptive_softmax_lm_trains_with_the_criterion(tmp_path):
    """fairseq's get_log_prob edits its log-softmax output in place: through it, the first backward failed."""
    task, student, teacher = _adaptive_pair(tmp_path)
    student.train()
    for distill_weight in (0.0, 1.0):
        loss, _, _ = _criterion(task, teacher, distill_weight, chunk_positions=4)(student, _lm_sample(task))
        loss.backward()
        assert torch.isfinite(loss) and student.decoder.adaptive_softmax.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive_softmax", "softmax"])
def test_distillation_never_keeps_a_whole_batch_of_vocabulary_log_probabilities(tmp_path, monkeypatch, adaptive):
    """Peak memory: no [positions, V] log-probability tensor larger than one chunk is computed (forward) or saved for
    the backward pass, for the model or the teacher; before, both whole-batch log-probabilities were (a plain
    softmax model's own logits, its output, stay what they are)."""
    import t2r_fairseq.criterions.task_loss as at  # where the criterion's chunked losses look it up

    task, student, teacher = _adaptive_pair(tmp_path, adaptive)
    student.train()
    sample = _lm_sample(task, batch=4, length=11)  # 40 positions, chunks of 4
    vocab, chunk = len(task.dictionary), 4
    rows: list[int] = []
    original = getattr(at, "adaptive_log_probs", None)
    monkeypatch.setattr(at, "adaptive_log_probs", lambda asm, x: rows.append(x.shape[0]) or original(asm, x),
                        raising=False)
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _, _ = _criterion(task, teacher, 0.5, chunk_positions=chunk)(student, sample)
    whole = [s for s in saved if s and s[-1] == vocab and math.prod(s[:-1]) == 40]  # a row per position: [40, V]
    assert not whole, whole
    loss.backward()
    if adaptive:
        assert rows and max(rows) <= chunk  # forward and the backward's recomputation, teacher and model
        assert len(rows) == 4 * (40 // chunk)  # each chunk: model and teacher, forward and again in the backward pass


def test_chunked_token_losses_are_the_whole_batch_formulas_for_any_chunk():
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
    from t2r_fairseq.ops.distillation import chunked_token_losses

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(13, 7, generator=g), torch.randn(13, 7, generator=g)
    target = torch.randint(0, 7, (13,), generator=g)
    target[[2, 5]] = 1  # the padding index
    lsm = lambda x: torch.log_softmax(x, -1)  # noqa: E731
    loss, nll = label_smoothed_nll_loss(lsm(student), target, 0.1, ignore_index=1, reduce=True)
    kl = token_kl(lsm(teacher), lsm(student), target.ne(1))
    for chunk in (1, 3, 13, 50):
        out = chunked_token_losses(student, target, lsm, 0.1, 1, chunk, teacher, lsm)
        assert torch.equal(out.loss, loss) and torch.equal(out.nll_loss, nll) and torch.equal(out.kl, kl), chunk
    assert chunked_token_losses(student, target, lsm, 0.1, 1, 4).kl is None
