#!/usr/bin/env python3
"""Check that a `mamba train` run directory loads in Hugging Face transformers and gives the
same loss that `mamba eval` prints, to 1e-4.

Usage (with the pinned environment of scripts/requirements.txt):

    python scripts/check_transformers_eval.py RUN_DIR [--mamba target/release/mamba]
        [--sequences 4] [--seq-len 128] [--seed 0]

It draws random token sequences (uniform over the model's vocabulary, seeded), writes them to a
JSON file, runs `mamba eval --model RUN_DIR --tokens FILE --json`, and computes in transformers
(`AutoModelForCausalLM.from_pretrained(RUN_DIR)`, float32, CPU) the loss with labels = inputs,
summed over every sequence and divided by the number of predicted tokens. Exit status 0 when
|Δloss| ≤ 1e-4, 1 otherwise.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def loss_of(model, seqs) -> tuple[float, int]:
    """transformers' loss with labels = inputs, summed over the rows of `seqs` (a 2-D tensor of
    token ids) and divided by the number of predicted tokens, as `mamba eval` reports it; and
    that number."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for row in seqs:
            ids = row.unsqueeze(0)
            out = model(input_ids=ids, labels=ids, use_cache=False)
            n = ids.shape[1] - 1
            total += float(out.loss) * n
            count += n
    return total / count, count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--mamba", default="target/release/mamba", help="path of the mamba binary")
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(args.run_dir, torch_dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    seqs = torch.randint(0, vocab, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(args.seed))

    hf_loss, count = loss_of(model, seqs)

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(seqs.tolist(), f)
        tokens_path = f.name
    try:
        res = subprocess.run(
            [args.mamba, "eval", "--model", args.run_dir, "--tokens", tokens_path, "--json"],
            check=True, capture_output=True, text=True,
        )
    finally:
        os.unlink(tokens_path)
    ours = json.loads(res.stdout.strip().splitlines()[-1])
    diff = abs(ours["loss"] - hf_loss)
    print(f"transformers loss {hf_loss:.6f}  mamba eval loss {ours['loss']:.6f}  "
          f"|diff| {diff:.2e}  ({count} predicted tokens, {model.__class__.__name__})")
    if ours["tokens"] != count:
        print(f"token counts differ: mamba {ours['tokens']} vs transformers {count}")
        return 1
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
