"""Decode time per token and incremental-state size vs context length, softmax vs T2R.

Loads fairseq checkpoints (softmax teacher and T2R student) and drives each
decoder through fairseq's own incremental interface, one token per step, as
``fairseq-generate`` does, timing the steps around chosen context lengths and
measuring the bytes of the incremental state (KV cache vs (S, z)).

    python -m t2r_fairseq.tools.decode_speed --path NAME=CKPT [--path ...] --data DATA_BIN \
        --lengths 64,256,1024 --batch 1 --out speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, List

import torch
from fairseq import checkpoint_utils

import t2r_fairseq  # noqa: F401  (registers models, safe-load allow-list)
from t2r_fairseq.bench import state_bytes


@torch.no_grad()
def profile_decoder(model: torch.nn.Module, lengths: List[int], batch: int, window: int = 16) -> List[dict]:
    """Step the decoder to max(lengths); time the ``window`` steps ending at each length."""
    decoder = model.decoder
    max_pos = decoder.max_positions()
    dictionary_size = decoder.embed_tokens.num_embeddings if hasattr(decoder.embed_tokens, "num_embeddings") else 100
    g = torch.Generator().manual_seed(0)
    total = min(max(lengths), max_pos)
    tokens = torch.randint(4, dictionary_size, (batch, total), generator=g)
    encoder_out = None
    if hasattr(model, "encoder"):
        src = torch.randint(4, dictionary_size, (batch, 32), generator=g)
        encoder_out = model.encoder(src, torch.full((batch,), 32))
    state: dict = {}
    times: Dict[int, float] = {}
    targets = {L for L in lengths if L <= total}
    for t in range(total):
        start = time.perf_counter()
        decoder(tokens[:, : t + 1], encoder_out=encoder_out, incremental_state=state)
        times[t + 1] = time.perf_counter() - start
    rows = []
    for L in sorted(targets):
        window_times = [times[i] for i in range(max(1, L - window + 1), L + 1)]
        rows.append({"context": L, "batch": batch, "ms_per_token": 1000 * statistics.median(window_times),
                     "spread_ms": 1000 * (max(window_times) - min(window_times))})
    # state size at the end of the run (KV cache grows with context; (S, z) does not)
    rows[-1]["state_bytes"] = state_bytes(state)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", action="append", required=True, help="NAME=CHECKPOINT (repeatable)")
    ap.add_argument("--data", required=True, help="the data-bin directory the checkpoints were trained on")
    ap.add_argument("--lengths", default="64,256,1024")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    result = {}
    for item in args.path:
        name, path = item.split("=", 1)
        models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": args.data})
        model = models[0].eval()
        model.make_generation_fast_()
        result[name] = profile_decoder(model, lengths, args.batch)
        for row in result[name]:
            print(f"{name:>10} context {row['context']:>6} batch {row['batch']}: {row['ms_per_token']:.2f} ms/token"
                  + (f", state {row['state_bytes'] / 1024:.0f} KiB" if "state_bytes" in row else ""))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
