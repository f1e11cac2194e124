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

# canonization's conformance test (tests/conformance.rs) runs HAPI FHIR's offline validator
# through scripts/fhir-validate.sh, which needs Java 17+ and Maven (installed here when
# missing). Built first, so a Maven failure shows as such: the first build on a machine
# resolves HAPI FHIR from Maven Central, later ones run offline.
if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless maven >/dev/null
  fi
fi
"$here/fhir-validate.sh" --build-only

# Each end-to-end test pipeline that ran canonization writes its canonical resources here
# (at most 100 per resource type each; tests/src/lib.rs, `dump_canonical`), and the same
# validator checks them all once the tests have passed.
canonical_dump="$(mktemp -d)"
trap 'rm -rf "$canonical_dump"; cleanup' EXIT
export MEDPIPE_CANONICAL_DUMP="$canonical_dump/canonical"

# The end-to-end tests start the stage binaries as processes, so build them first.
cargo build --workspace --bins
# End-to-end tests share one broker on 2 cores: run test binaries' tests one at a time.
cargo test --workspace --all-targets -- --test-threads=1
cargo test --workspace --doc

echo "== FHIR conformance (HAPI's offline validator) of the canonical resources the end-to-end tests committed"
dumped=$(cat "$MEDPIPE_CANONICAL_DUMP"/*.ndjson 2>/dev/null | wc -l)
if [ "$dumped" -eq 0 ]; then
  echo "no canonical resources were dumped by the end-to-end tests" >&2
  exit 1
fi
echo "$dumped resources from $(ls "$MEDPIPE_CANONICAL_DUMP" | wc -l) test pipelines"
"$here/fhir-validate.sh" --report "$canonical_dump/report.json" "$MEDPIPE_CANONICAL_DUMP"
