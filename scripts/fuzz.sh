#!/usr/bin/env bash
# Runs the parser fuzz targets of ingestion/fuzz (cargo-fuzz: libFuzzer with
# AddressSanitizer) until each has had a CPU-time budget, counted across sessions, so a
# long campaign can be run in pieces: `bash scripts/fuzz.sh [--goal CPU_SECONDS] [--jobs N]
# [TARGET...]` (default: 3660 s, 2 jobs, all five targets). Not part of the test suite.
#
# Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly` and
# `cargo install cargo-fuzz`); builds the targets once into the cache (`--rebuild` to build
# again after the parsers change). Everything lives outside the clone, in
# $MEDPIPE_CACHE (default ~/.cache/medpipe):
#   fuzz-target/     the built binaries
#   fuzz-corpus/T/   each target's corpus, seeded from the synthetic fixtures
#   fuzz-artifacts/T/ what libFuzzer keeps: crash-*, timeout-*, slow-unit-*, oom-*
#   fuzz-logs/       one .out (libFuzzer's output), .time (/usr/bin/time -v) and .meta per
#                    session; `prior-T.cpu` holds CPU seconds of sessions run before this
#                    script kept logs (optional)
# A target's CPU so far is its prior-T.cpu plus the user + system time of every finished
# session. Sessions run in the idle scheduling class (they take only CPU nothing else
# wants), at most 600 s wall each, the target closest to its goal first.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cache="${MEDPIPE_CACHE:-$HOME/.cache/medpipe}"
goal=3660 jobs=2 rebuild=0 targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --goal) goal="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --rebuild) rebuild=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(csv ndjson bundle hl7 detect)
bins="$cache/fuzz-target/x86_64-unknown-linux-gnu/release"
logs="$cache/fuzz-logs"
mkdir -p "$logs"

for t in "${targets[@]}"; do
  if [ "$rebuild" = 1 ] || [ ! -x "$bins/$t" ]; then
    (cd "$root/ingestion/fuzz" && CARGO_TARGET_DIR="$cache/fuzz-target" cargo +nightly fuzz build "$t")
  fi
  corpus="$cache/fuzz-corpus/$t"
  if [ ! -d "$corpus" ] || [ -z "$(ls -A "$corpus")" ]; then
    mkdir -p "$corpus"
    find "$root/ingestion/fixtures" "$root/samples" -type f -size -1M -exec cp {} "$corpus/" \;
  fi
  mkdir -p "$cache/fuzz-artifacts/$t"
done

# CPU seconds a target has had: its prior sessions plus every finished logged session.
spent() {
  python3 - "$logs" "$1" <<'PY'
import glob, re, sys
logs, t = sys.argv[1], sys.argv[2]
total = 0.0
try:
    total += float(open(f"{logs}/prior-{t}.cpu").read().split()[0])
except FileNotFoundError:
    pass
for f in glob.glob(f"{logs}/{t}-*.time"):
    text = open(f).read()
    if "Exit status" not in text:
        continue  # still running
    for what in ("User", "System"):
        total += float(re.search(rf"{what} time \(seconds\): ([\d.]+)", text).group(1))
print(int(total))
PY
}

# One worker: picks the unlocked target closest to its goal, runs one session, repeats.
worker() {
  local slot=$1 n=0 t best need bestneed session wall
  while :; do
    best="" bestneed=999999999
    for t in "${targets[@]}"; do
      need=$(( goal - $(spent "$t") ))
      if [ "$need" -gt 0 ] && [ ! -d "$logs/lock-$t" ] && [ "$need" -lt "$bestneed" ]; then
        best=$t bestneed=$need
      fi
    done
    [ -n "$best" ] || return 0
    mkdir "$logs/lock-$best" 2>/dev/null || { sleep 1; continue; }
    n=$((n + 1))
    session="$logs/$best-$(date -u +%Y%m%dT%H%M%S)-$slot-$n"
    wall=$(( bestneed < 570 ? bestneed + 30 : 600 ))
    echo "start $(date -u +%FT%TZ) need=${bestneed}s wall=${wall}s" >"$session.meta"
    chrt --idle 0 /usr/bin/time -v -o "$session.time" "$bins/$best" -max_total_time="$wall" \
      -artifact_prefix="$cache/fuzz-artifacts/$best/" -print_final_stats=1 -rss_limit_mb=2048 \
      -timeout=60 "$cache/fuzz-corpus/$best" >"$session.out" 2>&1 || true
    echo "end $(date -u +%FT%TZ)" >>"$session.meta"
    echo "fuzz: $best: $(spent "$best") of $goal CPU s" >&2
    rmdir "$logs/lock-$best"
  done
}

for i in $(seq 1 "$jobs"); do worker "$i" & done
wait
for t in "${targets[@]}"; do
  echo "$t: $(spent "$t") CPU s; artifacts: $(ls "$cache/fuzz-artifacts/$t" | wc -l)"
done
