#!/usr/bin/env python3
"""Validates the custom resources of a rendered manifest stream against their CRD schemas.

    kustomize build k8s/overlays/prod \
      | ~/.cache/medpipe/lint-venv/bin/python scripts/validate-crs.py [--label prod]

(the lint venv of scripts/k8s-check.sh has what it needs: jsonschema, PyYAML and
kubernetes-validate).

Reads a multi-document YAML stream on stdin. Every document whose apiVersion is not of a
built-in Kubernetes group (those are kubernetes-validate's) is validated with `jsonschema`
against the openAPIV3Schema vendored in k8s/crd-schemas/ (`<kind lowercase>-<group>-
<version>.json`, made by scripts/crd-schemas.py), as strictly as the API server's pruning
with `kubectl apply --validate=strict`:

- an object whose schema has properties (or is a bare `type: object`) but neither
  `additionalProperties` nor `x-kubernetes-preserve-unknown-fields: true` admits no other
  field (the API server would drop it); `x-kubernetes-embedded-resource` objects also
  admit apiVersion, kind and metadata;
- `metadata` is validated against the Kubernetes ObjectMeta schema (strict) that
  kubernetes-validate ships, for --k8s-version, and must have a name;
- null is an error unless the field is `nullable` (the API server would drop the field);
- a required field that has a default is not required (the API server defaults it first).
CEL rules (x-kubernetes-validations) and formats are not checked.

A custom resource with no vendored schema is an error. Prints one line per custom resource,
one line per error (kind/name, JSON path, message), exits 1 on any error.
"""

import argparse
import difflib
import json
import os
import sys

import jsonschema
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMAS = os.path.join(ROOT, "k8s", "crd-schemas")

# The API groups that Kubernetes itself serves (no CRD). Listed, not matched by suffix:
# gateway.networking.k8s.io and snapshot.storage.k8s.io, for example, are CRDs.
BUILTIN_GROUPS = {
    "", "admissionregistration.k8s.io", "apiextensions.k8s.io", "apiregistration.k8s.io",
    "apps", "authentication.k8s.io", "authorization.k8s.io", "autoscaling", "batch",
    "certificates.k8s.io", "coordination.k8s.io", "discovery.k8s.io", "events.k8s.io",
    "extensions", "flowcontrol.apiserver.k8s.io", "internal.apiserver.k8s.io",
    "networking.k8s.io", "node.k8s.io", "policy", "rbac.authorization.k8s.io",
    "resource.k8s.io", "scheduling.k8s.io", "storage.k8s.io", "storagemigration.k8s.io",
}

STRICT = "x-validate-crs-strict"  # marks the additionalProperties: false added here


class Loader(yaml.SafeLoader):
    """YAML as the API server reads it: a date-like scalar stays a string."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# kustomize writes `=` as a plain scalar; PyYAML would read it as a "value" tag.
Loader.add_constructor("tag:yaml.org,2002:value",
                       lambda loader, node: loader.construct_scalar(node))


def strict(schema, top=True):
    """A copy of a structural schema, closed where the API server would prune."""
    if not isinstance(schema, dict):
        return schema
    s = dict(schema)
    if s.get("nullable"):
        if isinstance(s.get("type"), str):
            s["type"] = [s["type"], "null"]
        if "enum" in s and None not in s["enum"]:
            s["enum"] = list(s["enum"]) + [None]
    if s.get("x-kubernetes-int-or-string") and not {"type", "anyOf", "oneOf"} & s.keys():
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    props = s.get("properties")
    if props is not None:
        s["properties"] = {
            # The root's metadata is ObjectMeta, validated on its own (see main).
            name: (sub if top and name == "metadata" else strict(sub, top=False))
            for name, sub in props.items()
        }
        defaulted = {name for name, sub in props.items()
                     if isinstance(sub, dict) and "default" in sub}
        if defaulted and "required" in s:
            s["required"] = [name for name in s["required"] if name not in defaulted]
    if isinstance(s.get("items"), dict):
        s["items"] = strict(s["items"], top=False)
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"], top=False)
    # allOf/anyOf/oneOf/not only add value checks in a structural schema: left open.
    is_object = s.get("type") == "object" or props is not None
    if (is_object and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        if s.get("x-kubernetes-embedded-resource"):
            s["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                               "metadata": {"type": "object"}, **s.get("properties", {})}
        s["additionalProperties"] = False
        s[STRICT] = True
    return s


def object_meta_validator(k8s_version):
    """The strict ObjectMeta schema of kubernetes-validate for that Kubernetes version."""
    import importlib_resources  # kubernetes-validate's dependency
    import referencing
    from kubernetes_validate import utils as kv

    version = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(k8s_version)][-1]
    base = importlib_resources.files("kubernetes_validate").joinpath(
        "kubernetes-json-schema", f"v{version}-local-strict")
    meta = json.loads(base.joinpath("objectmeta-meta-v1.json").read_text())
    defs = json.loads(base.joinpath("_definitions.json").read_text())
    registry = referencing.Registry().with_resources([
        (doc["$id"], referencing.Resource.from_contents(doc)) for doc in (meta, defs)])
    return jsonschema.Draft202012Validator(meta, registry=registry)


def json_path(path):
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.replace("_", "a").replace("-", "a").isalnum():
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out or "."


def by_path(error):
    return [str(part) for part in error.absolute_path]


def short(value, limit=120):
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def messages(error):
    """(JSON path, message) for one jsonschema error, clearer for the common cases."""
    path = list(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and schema.get(STRICT):
        allowed = sorted(schema.get("properties", {}))
        for name in sorted(set(error.instance) - set(allowed)):
            hint = difflib.get_close_matches(name, allowed, n=1)
            known = ("did you mean %r? " % hint[0]) if hint else ""
            listed = ", ".join(allowed[:25]) + (", ..." if len(allowed) > 25 else "")
            yield (json_path(path + [name]),
                   "unknown field %r: not in the CRD schema (the API server would drop it); %s"
                   "allowed here: %s" % (name, known, listed or "nothing"))
        return
    if error.instance is None and error.validator == "type":
        yield json_path(path), ("null (an empty value) where %s is required; the API server "
                                "would drop the field" % short(error.validator_value))
        return
    if error.validator in ("oneOf", "anyOf"):
        alternatives = " | ".join(
            "+".join(sub.get("required", [])) or short(sub, 60) for sub in error.validator_value)
        if error.context:
            reasons = "; ".join(sorted({sub.message for sub in error.context}))
            problem = "matches none of the %s alternatives (%s: %s)" % (
                error.validator, alternatives, reasons[:300])
        else:  # oneOf: more than one matched
            problem = "matches more than one of the oneOf alternatives (%s): set only one" % (
                alternatives)
        yield json_path(path), "%s %s" % (short(error.instance, 80), problem)
        return
    message = error.message
    yield json_path(path), message if len(message) <= 400 else message[:400] + "..."


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemas", default=SCHEMAS, help="vendored schemas (%(default)s)")
    parser.add_argument("-k", "--k8s-version", default="1.33.0",
                        help="Kubernetes version of the ObjectMeta schema (%(default)s)")
    parser.add_argument("--label", default="stdin", help="name of the input, for the messages")
    args = parser.parse_args()

    try:
        docs = [doc for doc in yaml.load_all(sys.stdin, Loader=Loader) if doc is not None]
    except yaml.YAMLError as e:
        print(f"validate-crs: {args.label}: not YAML: {e}")
        sys.exit(1)
    if not docs:
        print(f"validate-crs: {args.label}: no documents on stdin")
        sys.exit(1)
    meta_validator = object_meta_validator(args.k8s_version)
    validators = {}
    checked = failed = builtin = 0

    for index, doc in enumerate(docs):
        if not isinstance(doc, dict) or not isinstance(doc.get("apiVersion"), str) \
                or not isinstance(doc.get("kind"), str):
            print(f"FAIL {args.label} document {index + 1}: no apiVersion and kind")
            failed += 1
            continue
        api_version, kind = doc["apiVersion"], doc["kind"]
        group, _, version = api_version.rpartition("/")
        if group in BUILTIN_GROUPS:
            builtin += 1
            continue
        checked += 1
        metadata = doc.get("metadata")
        name = metadata.get("name", "?") if isinstance(metadata, dict) else "?"
        namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
        who = f"{kind} {namespace + '/' if namespace else ''}{name}"
        schema_file = f"{kind.lower()}-{group}-{version}.json"

        errors = []
        if schema_file not in validators:
            try:
                with open(os.path.join(args.schemas, schema_file), encoding="utf-8") as f:
                    schema = strict(json.load(f))
                validators[schema_file] = jsonschema.Draft4Validator(schema)
            except FileNotFoundError:
                validators[schema_file] = None
        validator = validators[schema_file]
        if validator is None:
            errors.append((".", f"no CRD schema for {api_version} {kind}: "
                                f"{os.path.relpath(os.path.join(args.schemas, schema_file), ROOT)} "
                                f"does not exist (add it with scripts/crd-schemas.py)"))
        else:
            for error in sorted(validator.iter_errors(doc), key=by_path):
                errors.extend(messages(error))
        if not isinstance(metadata, dict):
            errors.append((".metadata", "missing or not an object"))
        else:
            if not metadata.get("name"):
                errors.append((".metadata.name", "missing: every resource needs a name"))
            for error in sorted(meta_validator.iter_errors(metadata), key=by_path):
                for path, message in messages(error):
                    errors.append((".metadata" + ("" if path == "." else path), message))

        if errors:
            failed += 1
            print(f"FAIL {api_version} {who}: {len(errors)} error(s)")
            for path, message in errors:
                print(f"  error: {args.label}: {kind}/{name}: {path}: {message}")
        else:
            print(f"ok   {api_version} {who}")

    print(f"validate-crs: {args.label}: {checked} custom resources checked against their CRD "
          f"schemas, {failed} invalid ({builtin} built-in resources left to kubernetes-validate)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
