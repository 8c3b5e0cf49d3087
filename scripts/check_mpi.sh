#!/usr/bin/env bash
# Data-parallel training over MPI, end to end: lints and builds `mamba` with the `mpi` feature and
# checks
#   - 2 ranks (`mpirun -np 2`) with global batch 8 report the losses of 1 process with batch 8
#     (every evaluation's train and validation loss, 1e-5 relative),
#   - the 2-rank run's checkpoint resumes on 1 process exactly as the 1-process run's does,
#   - only rank 0 writes (one metrics line per evaluation),
#   - a run on more ranks than its batch has rows is refused.
#
# usage: scripts/check_mpi.sh
# Needs an MPI library, mpirun and libclang (Debian: libopenmpi-dev openmpi-bin libclang-dev);
# installs them when run as root.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# What the build needs: mpicc and mpirun (OpenMPI or MPICH), and libclang for the bindings.
missing() {
    command -v mpirun >/dev/null && command -v mpicc >/dev/null || return 0
    if command -v dpkg-query >/dev/null; then
        dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q "ok installed" || return 0
    fi
    return 1
}
if missing; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing OpenMPI and libclang"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q libopenmpi-dev openmpi-bin libclang-dev >/dev/null
    else
        echo "needs mpirun, an MPI library and libclang: apt-get install libopenmpi-dev openmpi-bin libclang-dev" >&2
        exit 1
    fi
fi

cargo clippy --locked -p mamba-train -p mamba-cli --all-targets --features mpi -- -D warnings
cargo build --release --locked -p mamba-cli --features mpi
bin=$root/target/release/mamba
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# OpenMPI refuses root without the flag, and more ranks than cores without --oversubscribe.
mpi=(mpirun --oversubscribe)
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)

small=(--steps 10 --eval-every 5 --batch-size 8 --seq-len 64 --d-model 32 --n-layer 2 --lr 3e-3 --threads 1)
"$bin" train --out "$work/one" "${small[@]}" >/dev/null 2>"$work/one.log" || { cat "$work/one.log" >&2; exit 1; }
"${mpi[@]}" -np 2 "$bin" train --out "$work/two" "${small[@]}" >/dev/null 2>"$work/two.log" \
    || { cat "$work/two.log" >&2; exit 1; }
grep -q "2 ranks of 4 rows" "$work/two.log" || { echo "FAIL: the run did not say it trains on 2 ranks" >&2; cat "$work/two.log" >&2; exit 1; }

# The values of field $2 in metrics file $1, one per line.
values_of() {
    grep -o "\"$2\":[-0-9.e]*" "$1" | cut -d: -f2
}

# Every evaluation's losses of run $1 against run $2 (labelled $3), 1e-5 relative.
compare() {
    for field in train_loss val_loss; do
        paste <(values_of "$work/$1/metrics.jsonl" "$field") <(values_of "$work/$2/metrics.jsonl" "$field") |
            awk -v f="$field" -v what="$3" '
                { n++; d = $1 - $2; if (d < 0) d = -d; r = d / ($1 < 0 ? -$1 : $1);
                  printf "  %s %s #%d: %.9f vs %.9f (rel %.1e)\n", what, f, n, $1, $2, r;
                  if (r > 1e-5) bad = 1 }
                END { if (n == 0) { print "  FAIL: no " f " values"; exit 1 } if (bad) { print "  FAIL: beyond 1e-5"; exit 1 } }'
    done
}
echo "2 ranks against 1 process (global batch 8):"
compare one two "step-5/10"
[ "$(wc -l < "$work/two/metrics.jsonl")" = 2 ] || { echo "FAIL: metrics.jsonl of the 2-rank run is not 2 lines" >&2; exit 1; }

# Resume both runs on one process for 5 more steps: the 2-rank checkpoint continues like the other.
for r in one two; do
    "$bin" train --out "$work/$r" --resume --steps 15 --threads 1 >/dev/null 2>"$work/$r-resume.log" \
        || { cat "$work/$r-resume.log" >&2; exit 1; }
done
echo "resumed on 1 process for 5 more steps:"
compare one two "step-5/10/15"

# More ranks than rows: refused on every rank with a message naming the batch.
if "${mpi[@]}" -np 3 "$bin" train --out "$work/three" --steps 1 --batch-size 2 --threads 1 >/dev/null 2>"$work/three.log"; then
    echo "FAIL: 3 ranks over a batch of 2 rows ran" >&2
    exit 1
fi
grep -q -- "--batch-size 2 gives some rank no rows" "$work/three.log" || { cat "$work/three.log" >&2; exit 1; }
echo "3 ranks over a batch of 2 rows: refused"
echo "MPI checks passed"
