#!/usr/bin/env bash
# The whole test suite: unit, property and end-to-end tests against a real Kafka broker
# and Schema Registry. Starts the dev stack if it is not running, and stops it again
# afterwards if this script started it. `.ci/run` calls exactly this.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${MEDPIPE_CACHE:-$HOME/.cache/medpipe}/target}"

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

# The Python client test reads the canonical topics with the standard Confluent client
# (confluent-kafka from PyPI), in a virtualenv kept in the cache.
venv="${MEDPIPE_CACHE:-$HOME/.cache/medpipe}/venv"
if ! "$venv/bin/python" -c 'import confluent_kafka.schema_registry.avro' >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "confluent-kafka[avro,schemaregistry]==2.*"
fi
export MEDPIPE_PYTHON="$venv/bin/python"

# The end-to-end tests start the stage binaries as processes, so build them first.
cargo build --workspace --bins
# End-to-end tests share one broker on 2 cores: run test binaries' tests one at a time.
cargo test --workspace --all-targets -- --test-threads=1
cargo test --workspace --doc
