"""Validates canonical resources against the FHIR R4 JSON schema (fhir.schema.json).

usage: FHIR_SCHEMA=path/to/fhir.schema.json validate_fhir_r4.py FILE...
       (golden .out.json files, or .jsonl with one resource a line, e.g. the output of
       `FHIR_DUMP=/tmp/out.jsonl cargo test --test properties -- --ignored`)
Needs the `jsonschema` Python package.
"""
import collections, json, os, sys
import jsonschema

schema = json.load(open(os.environ["FHIR_SCHEMA"]))
validators = {}
def validator(rt):
    if rt not in validators:
        sub = {"$ref": "#/definitions/" + rt, "definitions": schema["definitions"]}
        validators[rt] = jsonschema.Draft6Validator(sub)
    return validators[rt]

bad = collections.Counter()
count = 0
shown = collections.Counter()
def check(resource, where):
    global count
    count += 1
    rt = resource.get("resourceType")
    if rt not in schema["definitions"]:
        print(where, "unknown resourceType", rt); bad["type"] += 1; return
    errs = list(validator(rt).iter_errors(resource))
    for e in errs:
        key = (rt, "/".join(str(p) for p in e.absolute_path if not isinstance(p, int)), e.message[:80])
        bad[key] += 1
        if shown[key] < 1:
            shown[key] += 1
            print(where, rt, list(e.absolute_path), e.message[:300])
for path in sys.argv[1:]:
    if path.endswith(".jsonl"):
        for i, line in enumerate(open(path)):
            check(json.loads(line), f"{path}:{i+1}")
        continue
    d = json.load(open(path))
    for i, r in enumerate(d.get("resources", [])):
        check(r["resource"], f"{path}[{i}]")
print(f"{count} resources, {sum(bad.values())} errors")
for k, n in bad.most_common(40): print(n, k)
