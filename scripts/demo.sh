#!/usr/bin/env bash
# The main job with the embedded default: starts the dev stack if needed, starts the four
# stages, drops the bundled synthetic sample, waits for it to flow through, prints a
# summary (events per stage, a few canonical records, the audit chain verified), then
# stops everything it started.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${MEDPIPE_CACHE:-$HOME/.cache/medpipe}/target}"
work="${MEDPIPE_DEMO_DIR:-$(mktemp -d -t medpipe-demo-XXXXXX)}"
mkdir -p "$work"

started_stack=0
if ! "$here/devstack.sh" status >/dev/null 2>&1; then
  "$here/devstack.sh" start
  started_stack=1
fi

cargo build --workspace --bins
bin="$CARGO_TARGET_DIR/debug"

# Demo-only keys, generated per run and kept in the work folder. Production keys come
# from a secret store through MEDPIPE_*_KEY_FILE.
[ -f "$work/master.key" ] || python3 -c 'import secrets; print(secrets.token_hex(32))' > "$work/master.key"
[ -f "$work/pseudonym.key" ] || python3 -c 'import secrets; print(secrets.token_hex(32))' > "$work/pseudonym.key"
export MEDPIPE_MASTER_KEY_FILE="$work/master.key"
[ -f "$work/audit.key" ] || python3 -c 'import secrets; print(secrets.token_hex(32))' > "$work/audit.key"
export MEDPIPE_PSEUDONYM_KEY_FILE="$work/pseudonym.key"
export MEDPIPE_AUDIT_KEY_FILE="$work/audit.key"
export MEDPIPE_TOPIC_PREFIX="${MEDPIPE_TOPIC_PREFIX:-medpipe-demo-$(date +%s)}"
export MEDPIPE_INGESTION_DIR="$work/ingestion"
export MEDPIPE_AUDIT_DIR="$work/audit"
export MEDPIPE_METRICS_ADDR="127.0.0.1:0"
export NO_COLOR=1

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
  if [ "$started_stack" = 1 ]; then "$here/devstack.sh" stop || true; fi
}
trap stop_all EXIT

"$bin/medpipe" setup
for stage in ingestion anonymization canonization auditing; do
  "$bin/medpipe-$stage" > "$work/$stage.log" 2>&1 &
  pids+=("$!")
done

mkdir -p "$work/ingestion/landing"
# Four synthetic samples: Synthea CSV patients, a Synthea-style FHIR Bundle, Synthea's
# providers Bundle (a practitioner, their role, organisation and location) and an HL7 ORU.
for f in patients.csv synthea_bundle.json synthea_providers.json oru_mixed.hl7; do
  cp "samples/$f" "$work/ingestion/landing/.$f.part"
  mv "$work/ingestion/landing/.$f.part" "$work/ingestion/landing/$f"
done
# Canonical records to expect: a Patient per CSV row, a resource per Bundle entry of a
# canonical type (its Coverage is not one), a DiagnosticReport per OBR and an Observation
# per OBX.
records=$(python3 - <<'PY'
import json
rows = sum(1 for _ in open("samples/patients.csv")) - 1
types = {"Patient", "Encounter", "Observation", "Condition", "MedicationRequest", "Procedure",
         "DiagnosticReport", "AllergyIntolerance", "Immunization", "Practitioner",
         "PractitionerRole", "Organization", "Location", "Medication", "Device"}
entries = [e for f in ("samples/synthea_bundle.json", "samples/synthea_providers.json")
           for e in json.load(open(f))["entry"]]
bundle = sum(1 for e in entries if e["resource"]["resourceType"] in types)
oru = sum(1 for s in open("samples/oru_mixed.hl7", newline="").read().split("\r") if s[:3] in ("OBR", "OBX"))
print(rows + bundle + oru)
PY
)
echo "Dropped samples/patients.csv, synthea_bundle.json, synthea_providers.json and oru_mixed.hl7 into $work/ingestion/landing; expecting $records canonical records"

"$bin/medpipe" summary --wait-canonical "$records" --timeout 180s --show 1
# Give auditing a moment to record the last committed events, then stop the stages.
sleep 3
for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
for pid in "${pids[@]}"; do wait "$pid" || { echo "a stage exited uncleanly; logs in $work" >&2; exit 1; }; done
pids=()
echo
"$bin/medpipe" audit verify --dir "$work/audit" --published
echo
echo "Audit report (which service processed which batch, under which policy and keys):"
"$bin/medpipe" audit report --dir "$work/audit" --from 2000-01-01 --to 2100-01-01
batch=$("$bin/medpipe" audit report --dir "$work/audit" --from 2000-01-01 --to 2100-01-01 | awk -F, 'NR==2{print $1}')
echo
echo "Audit trace of batch $batch (first lines; medpipe audit trace $batch for all):"
"$bin/medpipe" audit trace "$batch" --dir "$work/audit" | head -8
echo "Logs, audit trail and encrypted archive are in $work"
