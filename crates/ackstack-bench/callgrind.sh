#!/usr/bin/env bash
# Instructions per message of ackstack's own code on the in-memory broker, no-op handler:
# the bare runner and all layers (retry, dead-letter, batch ack, lease keeper, in-memory dedup),
# measured with valgrind's callgrind, which counts instructions (repeatable on a busy machine).
#
# Each mode runs twice, with N1 and N2 messages; instructions per message are
# (Ir(N2) - Ir(N1)) / (N2 - N1), which cancels start-up and fixed costs. The `publish` mode only
# fills the broker, so "bare - publish" is the runner plus the broker's receive and ack, and
# "full - bare" is what the layers add.
#
# Usage: crates/ackstack-bench/callgrind.sh            (N1=2000, N2=12000)
#        N1=1000 N2=5000 crates/ackstack-bench/callgrind.sh
#        RECORDER=prometheus crates/ackstack-bench/callgrind.sh   (with a Prometheus recorder
#                                                      installed: what recording metrics costs)
#        crates/ackstack-bench/callgrind.sh --check    (exit 1 when a target is missed: bare
#                                                      runner <= 6000, all layers <= 10000
#                                                      instructions/msg, publishing subtracted)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/ackstack/target}"
CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1
N1="${N1:-2000}"
N2="${N2:-12000}"
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
cargo build --release -p ackstack-bench >&2
BIN="$CARGO_TARGET_DIR/release/ackstack-bench"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

ir() { # mode n -> total instructions
    local file="$OUT/callgrind.$1.$2"
    valgrind --tool=callgrind --callgrind-out-file="$file" "$BIN" --callgrind "$1" --messages "$2" ${RECORDER:+--recorder "$RECORDER"} >&2 2>"$OUT/log.$1.$2" \
        || { cat "$OUT/log.$1.$2" >&2; exit 1; }
    awk '/^(summary|totals):/ { print $2; exit }' "$file"
}

declare -A PER
for mode in publish bare full; do
    a=$(ir "$mode" "$N1")
    b=$(ir "$mode" "$N2")
    PER[$mode]=$(( (b - a) / (N2 - N1) ))
    echo "$mode: Ir($N1)=$a Ir($N2)=$b" >&2
done
echo
echo "instructions per message (callgrind, in-memory broker, no-op handler, $N1 vs $N2 messages, recorder: ${RECORDER:-none}):"
echo "| run | instructions/msg |"
echo "|---|---|"
echo "| publish only (broker fill) | ${PER[publish]} |"
echo "| bare runner (incl. publish) | ${PER[bare]} |"
echo "| all layers (incl. publish) | ${PER[full]} |"
echo "| bare runner − publish | $(( PER[bare] - PER[publish] )) |"
echo "| all layers − publish | $(( PER[full] - PER[publish] )) |"
echo "| layers' own cost (full − bare) | $(( PER[full] - PER[bare] )) |"
if [ "$CHECK" = 1 ]; then
    missed=0
    bare=$(( PER[bare] - PER[publish] ))
    full=$(( PER[full] - PER[publish] ))
    if [ "$bare" -le 6000 ]; then echo "met    bare runner <= 6000 ($bare)"; else echo "MISSED bare runner <= 6000 ($bare)"; missed=1; fi
    if [ "$full" -le 10000 ]; then echo "met    all layers <= 10000 ($full)"; else echo "MISSED all layers <= 10000 ($full)"; missed=1; fi
    exit "$missed"
fi
