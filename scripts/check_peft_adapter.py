#!/usr/bin/env python3
"""Check that LoRA adapters cross between `mamba` and Hugging Face PEFT in both directions, with
the same loss to 1e-5.

Usage (the environment of scripts/requirements.txt, plus `peft`):

    python scripts/check_peft_adapter.py BASE_DIR [--mamba target/release/mamba]
        [--targets in_proj,x_proj] [--rank 4] [--alpha 8] [--sequences 4]
        [--seq-len 64] [--seed 0]

BASE_DIR is a model directory that transformers loads (a `mamba train` run, or a fixture of
crates/mamba-nn/tests/fixtures). With a byte-level vocabulary (256 tokens) the script:

1. ours → PEFT: trains an adapter with `mamba train --from BASE_DIR --lora-rank R
   --lora-targets T` for a few steps on generated text, loads it with
   `PeftModel.from_pretrained` on the transformers model, and compares the loss on random token
   sequences with `mamba eval --model BASE_DIR --adapter RUN --tokens FILE --json`;
2. PEFT → ours: builds a PEFT adapter with random A and B (`init_lora_weights=False`), saves it
   with `save_pretrained`, and compares PEFT's loss with `mamba eval --adapter` on it.

The loss is transformers' with labels = inputs, summed over the sequences and divided by the
number of predicted tokens, as `mamba eval` reports it. Exit status 0 when both |Δloss| ≤ 1e-5.
PEFT refuses `out_proj` and `conv1d` on Mamba models, and transformers' Mamba-1 forward reads
`dt_proj.weight` directly (bypassing the module PEFT wraps), so an unmerged `dt_proj` adapter
has no effect there: --targets must avoid all three (`in_proj`, `x_proj` for Mamba-1; `in_proj`
for Mamba-2).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from check_transformers_eval import loss_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def mamba_loss(mamba: str, base: str, adapter: str, tokens_path: str) -> dict:
    res = subprocess.run(
        [mamba, "eval", "--model", base, "--adapter", adapter, "--tokens", tokens_path, "--json"],
        check=True, capture_output=True, text=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base_dir")
    ap.add_argument("--mamba", default="target/release/mamba", help="path of the mamba binary")
    ap.add_argument("--targets", default="in_proj,x_proj")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    targets = args.targets.split(",")
    work = tempfile.mkdtemp(prefix="check-peft-")
    failures = 0
    try:
        base = AutoModelForCausalLM.from_pretrained(args.base_dir, dtype=torch.float32)
        vocab = base.config.vocab_size
        gen = torch.Generator().manual_seed(args.seed)
        seqs = torch.randint(0, vocab, (args.sequences, args.seq_len), generator=gen)
        tokens_path = os.path.join(work, "tokens.json")
        with open(tokens_path, "w") as f:
            json.dump(seqs.tolist(), f)

        # 1. An adapter trained by `mamba train`, loaded in PEFT.
        text_path = os.path.join(work, "text.txt")
        with open(text_path, "w") as f:
            f.write("".join(["to be or not. ", "the rest is silence\n", "so it goes; "][i % 3] for i in range(900)))
        run = os.path.join(work, "run")
        subprocess.run(
            [args.mamba, "train", "--from", args.base_dir, "--data", text_path, "--out", run,
             "--lora-rank", str(args.rank), "--lora-alpha", str(args.alpha), "--lora-targets", args.targets,
             "--steps", "6", "--eval-every", "6", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2"],
            check=True, capture_output=True, text=True,
        )
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(args.base_dir, dtype=torch.float32), run)
        model.eval()
        want, count = loss_of(model, seqs)
        ours = mamba_loss(args.mamba, args.base_dir, run, tokens_path)
        base_loss, _ = loss_of(base, seqs)
        diff = abs(ours["loss"] - want)
        print(f"ours → PEFT: PEFT loss {want:.6f}  mamba eval --adapter {ours['loss']:.6f}  |diff| {diff:.2e}  "
              f"(base without adapter {base_loss:.6f}; {count} predicted tokens)")
        failures += diff > 1e-5 or ours["tokens"] != count or abs(want - base_loss) < 1e-6

        # 2. An adapter made and saved by PEFT, loaded in ours.
        cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets, lora_dropout=0.0,
                         init_lora_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.base_dir, dtype=torch.float32), cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.1)  # random B, at a scale that keeps the loss finite and near the base
        model.eval()
        saved = os.path.join(work, "peft-adapter")
        model.save_pretrained(saved)
        want, count = loss_of(model, seqs)
        ours = mamba_loss(args.mamba, args.base_dir, saved, tokens_path)
        diff = abs(ours["loss"] - want)
        print(f"PEFT → ours: PEFT loss {want:.6f}  mamba eval --adapter {ours['loss']:.6f}  |diff| {diff:.2e}  "
              f"(base without adapter {base_loss:.6f})")
        failures += diff > 1e-5 or ours["tokens"] != count or abs(want - base_loss) < 1e-6
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
