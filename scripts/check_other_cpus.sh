#!/usr/bin/env bash
# Runs the release `mamba` binary built on this machine on emulated older CPUs (qemu user mode):
# an AVX2 machine (Haswell, no AVX-512) and one without AVX (Nehalem). On each it must
#   - say which kernels it runs (`mamba info`: avx2, then portable),
#   - generate the same greedy tokens as this machine from the same model,
#   - evaluate the same loss (within 1e-4, relative),
#   - train a few steps.
# A binary built with `-C target-cpu=native` on an AVX-512 machine dies here with SIGILL.
#
# usage: scripts/check_other_cpus.sh [MAMBA_BINARY]   (default: target/release/mamba)
# Needs qemu-x86_64 (Debian: apt-get install qemu-user); installs it when run as root.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(realpath "${1:-$root/target/release/mamba}")
[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release -p mamba-cli)" >&2; exit 1; }
if ! command -v qemu-x86_64 >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing qemu-user (for qemu-x86_64)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user >/dev/null
    else
        echo "qemu-x86_64 not found: apt-get install qemu-user" >&2
        exit 1
    fi
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A small, regular corpus, so that a briefly trained model predicts its next tokens with
# margins far above the rounding differences between instruction sets.
for i in $(seq 1 400); do
    echo "line $((i % 7)): the cat sat on the mat and the dog sat on the log."
done > "$work/data.txt"

small=(--d-model 32 --n-layer 2 --seq-len 64 --batch-size 4 --eval-tokens 1024 --threads 2)
"$bin" train --data "$work/data.txt" --out "$work/model" --steps 150 --eval-every 150 "${small[@]}" \
    >/dev/null 2>"$work/train.log" || { cat "$work/train.log" >&2; exit 1; }

gen=(generate --model "$work/model" --prompt "line 3: the" --max-new-tokens 40 --temperature 0 --json --threads 2)
ev=(eval --model "$work/model" --data "$work/data.txt" --json --threads 2)
tokens() { grep -o '"tokens":\[[0-9,]*\]'; }
loss() { grep -o '"loss":[-0-9.e]*' | cut -d: -f2; }
want_tokens=$("$bin" "${gen[@]}" | tokens)
want_loss=$("$bin" "${ev[@]}" | loss)
echo "this machine: $("$bin" info)"
echo "  greedy $want_tokens"
echo "  eval loss $want_loss"

status=0
for cpu in Haswell:avx2 Nehalem:portable; do
    model=${cpu%%:*}
    expect=${cpu##*:}
    # qemu warns about every CPUID bit of the model it does not emulate; those lines say nothing
    # about the binary.
    q() { qemu-x86_64 -cpu "$model" "$@" 2> >(grep -v "TCG doesn't support" >&2); }
    info=$(q "$bin" info)
    echo "$model: $info"
    case "$info" in
        *"kernels      $expect "*) ;;
        *) echo "  FAIL: expected the $expect kernels" >&2; status=1 ;;
    esac
    got_tokens=$(q "$bin" "${gen[@]}" | tokens)
    if [ "$got_tokens" != "$want_tokens" ]; then
        echo "  FAIL: greedy tokens differ: $got_tokens" >&2
        status=1
    else
        echo "  greedy tokens equal"
    fi
    got_loss=$(q "$bin" "${ev[@]}" | loss)
    if awk -v a="$got_loss" -v b="$want_loss" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 1e-4 * b) }'; then
        echo "  eval loss $got_loss (equal within 1e-4)"
    else
        echo "  FAIL: eval loss $got_loss, this machine $want_loss" >&2
        status=1
    fi
    if q "$bin" train --data "$work/data.txt" --out "$work/m-$model" --steps 3 --eval-every 3 "${small[@]}" \
        >/dev/null 2>"$work/train.log"; then
        echo "  trained 3 steps"
    else
        cat "$work/train.log" >&2
        echo "  FAIL: training failed" >&2
        status=1
    fi
done
exit $status
