#!/usr/bin/env bash
# The game day: GAMEDAY_RUNS runs (default 20) of GAMEDAY_RECORDS records (default
# 100000) through the four real stages, release build, with one broker SIGKILL and
# restart at a random moment and GAMEDAY_STAGE_KILLS (default 4) random stage SIGKILLs
# per run. Every record is counted at every stage (lost, duplicated, exactly once), every
# batch must close exactly once, and the audit chain is verified after each run.
# The table goes to GAMEDAY_REPORT (default docs/gameday-<date>.md) and to stderr.
#
#   GAMEDAY_RUNS=20 bash scripts/gameday.sh
#   GAMEDAY_SEED=1234 GAMEDAY_RUNS=1 bash scripts/gameday.sh    # repeat one run
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${MEDPIPE_CACHE:-$HOME/.cache/medpipe}/target}"
export GAMEDAY_RUNS="${GAMEDAY_RUNS:-20}"
export GAMEDAY_REPORT="${GAMEDAY_REPORT:-$root/docs/gameday-$(date -u +%Y-%m-%d).md}"

started_stack=0
if ! "$here/devstack.sh" status >/dev/null 2>&1; then
  # The tests need no data of earlier runs, and a broker holding thousands of their
  # partitions takes minutes to restart (the broker-fault tests restart it): start empty.
  "$here/devstack.sh" reset
  "$here/devstack.sh" start
  started_stack=1
fi
cleanup() {
  if [ "$started_stack" = 1 ]; then
    "$here/devstack.sh" stop || true
  fi
}
trap cleanup EXIT

cargo build --release --workspace --bins
cargo test --release -p tests --test gameday -- --ignored --nocapture --test-threads=1
echo "game day report: $GAMEDAY_REPORT"
