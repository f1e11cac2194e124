#!/usr/bin/env bash
# Validates FHIR R4 resources with HAPI FHIR's offline instance validator
# (tools/fhir-validator): `scripts/fhir-validate.sh [--report FILE] [--list N]
# [--best-practice] PATH...`, where a PATH is a file (one resource, a JSON array of
# resources, NDJSON, or a golden mapping output) or a directory of *.json / *.ndjson files.
# Writes a JSON report (stdout, or FILE) and a summary on stderr; exits 1 when an error
# remains after classification, 2 when the input cannot be read. Terminology that cannot be
# checked offline (LOINC, SNOMED CT, RxNorm, CVX, ICD, ...) is counted apart and never
# fails. See canonization/schema/README.md.
#
# `--build-only` just builds. The jar and its libraries are built with Maven into the cache
# (outside the repository), offline once the first build has resolved HAPI from Maven
# Central, and rebuilt when the helper's sources change. Needs Java 17+ and Maven.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
src="$root/tools/fhir-validator"
build="${MEDPIPE_CACHE:-$HOME/.cache/medpipe}/fhir-validator"
jar="$build/fhir-validator.jar"

for tool in java mvn; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "fhir-validate: $tool not found: the validator needs Java 17+ and Maven" \
      "(Debian: apt-get install openjdk-17-jdk-headless maven)" >&2
    exit 2
  fi
done

# The build is current when the digest of the helper's sources matches the one it was
# built from.
digest="$(cd "$src" && find pom.xml src -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
if [ ! -f "$jar" ] || [ "$(cat "$build/sources.sha256" 2>/dev/null)" != "$digest" ]; then
  echo "== building tools/fhir-validator into $build" >&2
  mkdir -p "$build"
  mvn_args=(-B -q -f "$src/pom.xml" -Dmedpipe.build.dir="$build" package)
  # Offline first; the first build on a machine resolves HAPI from Maven Central.
  if ! mvn -o "${mvn_args[@]}" >"$build/build.log" 2>&1; then
    if ! mvn "${mvn_args[@]}" >"$build/build.log" 2>&1; then
      cat "$build/build.log" >&2
      echo "fhir-validate: the Maven build failed (log above)" >&2
      exit 2
    fi
  fi
  echo "$digest" >"$build/sources.sha256"
fi

if [ "${1:-}" = "--build-only" ]; then
  exit 0
fi
# A bounded heap: the R4 definitions need about 1 GB; the machine is shared.
exec java -Xmx${MEDPIPE_FHIR_VALIDATOR_HEAP:-2g} -XX:+UseSerialGC -jar "$jar" "$@"
