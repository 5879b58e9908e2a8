"""How far is a converted model's attention from its softmax teacher? Per layer, on a data split.

    python -m t2r_fairseq.tools.attention_gap DATA --path t2r/checkpoint_last.pt --teacher teacher.pt \\
        [--subset valid] [--loss output_mse|attention_ce] [--max-tokens 4096] [--cpu]

Perplexity tells whether the converted model is good; it does not tell whether its
linear attention still behaves like the teacher's softmax attention. This runs the
model over a split with the ``t2r_attention_transfer`` criterion's hooks (in eval
mode, nothing trains) and prints the task loss and perplexity together with the
per-layer transfer losses (``at_dec0_self``, ...) and their mean ``transfer`` -- for
any T2R checkpoint, whether or not it was trained with attention transfer, so
models finetuned with and without it can be compared on the same footing.

It also prints each layer's mean attention entropy in nats, the teacher's
(``entropy_dec0_cross_teacher``) and the converted model's (``entropy_dec0_cross``)
on the same inputs: whether the converted attention is as sharp as the teacher's.
The converted layer's weights are its own ``attention_weights`` (for the
sliding-window hybrid: window, linear rest and mixing factor), the same source
that calibration (:mod:`t2r_fairseq.conversion.calibration`) fits, so right after
``tools.convert`` the per-layer KL here (``--loss attention_ce``) and the one
convert prints measure the same function (here on this split and on the
converted model's own layer inputs, there on the teacher's).
A swapped map that attends almost uniformly reads near ``log(#keys)``; translation
quality needs cross-attention about as sharp as the teacher's.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Dict, List

import torch
from fairseq import checkpoint_utils, metrics, utils

import t2r_fairseq  # noqa: F401  (registers the models and the criterion)
from t2r_fairseq.criterions.attention_transfer import AttentionTransferCriterion
from t2r_fairseq.hardening.checkpoint_errors import CheckpointReadError


def attention_gap(data: str, path: str, teacher: str, subset: str = "valid", loss: str = "output_mse",
                  max_tokens: int = 4096, cpu: bool = False) -> Dict[str, float]:
    """Task loss (base 2), perplexity and per-layer transfer losses of ``path`` against ``teacher`` on ``subset``."""
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    model = models[0].eval()
    if not cpu and torch.cuda.is_available():
        model = model.cuda()
    task.load_dataset(subset)
    criterion = AttentionTransferCriterion(task, sentence_avg=False, label_smoothing=0.0, transfer_loss=loss,
                                           transfer_teacher=teacher)
    criterion.report_entropy = True
    criterion.attach(model)
    batches = task.get_batch_iterator(
        dataset=task.dataset(subset), max_tokens=max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        required_batch_size_multiple=1, ignore_invalid_inputs=True,
    ).next_epoch_itr(shuffle=False)
    logs: List[dict] = []
    with torch.no_grad():
        for sample in batches:
            if not cpu and torch.cuda.is_available():
                sample = utils.move_to_cuda(sample)
            logs.append(criterion(model, sample)[2])
    with metrics.aggregate(new_root=True) as agg:
        criterion.reduce_metrics(logs)
        values = agg.get_smoothed_values()
    return {k: float(v) for k, v in values.items()}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, force=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--path", required=True, help="T2R checkpoint")
    ap.add_argument("--teacher", required=True, help="the softmax checkpoint it was swapped from")
    ap.add_argument("--subset", default="valid")
    ap.add_argument("--loss", choices=["output_mse", "attention_ce"], default="output_mse")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = ap.parse_args()
    try:
        res = attention_gap(args.data, args.path, args.teacher, args.subset, args.loss, args.max_tokens, args.cpu)
    except (CheckpointReadError, FileNotFoundError) as e:  # one line naming the file, not a traceback
        sys.exit(f"attention_gap: error: {e}")
    if args.json:
        print(json.dumps(res))
    else:
        for key, value in res.items():
            print(f"{key}\t{value:.5g}")


if __name__ == "__main__":
    main()
