#!/usr/bin/env python3
"""Regenerates k8s/crd-schemas/: the openAPIV3Schema of every custom resource kind and
version that the rendered overlays use, taken from the operators' own CRD definitions and
written as JSON (`<kind lowercase>-<group>-<version>.json`). scripts/validate-crs.py
validates the custom resources against them; k8s/crd-schemas/README.md lists the sources.

    python3 scripts/crd-schemas.py --fetch /tmp/crds   # download the CRDs, then extract
    python3 scripts/crd-schemas.py /tmp/crds           # extract from CRD YAMLs already there
    python3 scripts/crd-schemas.py --check /tmp/crds   # exit 1 if the vendored files differ

CRD_DIR is searched recursively for *.yaml/*.yml files holding CustomResourceDefinitions;
every (group, kind, version) in WANTED must be found there, served. Needs PyYAML (the lint
venv of scripts/k8s-check.sh has it: ~/.cache/medpipe/lint-venv/bin/python).

--fetch downloads the pinned versions below from the package registries first (Go module
proxy, Maven Central) into CRD_DIR; it needs go, mvn and a Java 21 or later (Strimzi's CRD
generator; /usr/lib/jvm/temurin-25-jdk-amd64 here, or give --java). By hand it is:

    # KEDA, Prometheus Operator, External Secrets: the CRD files ship in their Go modules.
    export GOPATH=$(mktemp -d) GOFLAGS=-modcacherw GOTOOLCHAIN=local
    export GOMODCACHE=$GOPATH/pkg/mod
    go mod download -json github.com/kedacore/keda/v2@v2.21.0
    #   -> $Dir/config/crd/bases/keda.sh_{scaledobjects,triggerauthentications}.yaml
    go mod download -json github.com/prometheus-operator/prometheus-operator@v0.85.0
    #   -> $Dir/example/prometheus-operator-crd-full/
    #        monitoring.coreos.com_{servicemonitors,prometheusrules}.yaml
    go mod download -json github.com/external-secrets/external-secrets@v1.3.2
    #   -> $Dir/config/crds/bases/external-secrets.io_{externalsecrets,secretstores}.yaml

    # Strimzi 0.48.0: Maven Central has no CRD files, but it has the API classes the CRDs
    # are generated from (io.strimzi:api) and Strimzi's generator (io.strimzi:crd-generator,
    # a fat jar; 1.2.0 is the newest published and needs Java 21+). Run with the arguments
    # of the `generate-crd-co-install-v1*` executions in api-0.48.0.jar's
    # META-INF/maven/io.strimzi/api/pom.xml. Its output equals the released
    # packaging/install/cluster-operator/04{0,3,4,5}-Crd-*.yaml of Strimzi 0.48.0 except for a
    # `deprecated: false` line per version, outside the schema (checked when this was
    # written: the openAPIV3Schema is byte for byte the same).
    #   pom.xml: a project depending on io.strimzi:api:0.48.0
    mvn -q -B dependency:copy-dependencies -DoutputDirectory=lib -DincludeScope=runtime
    mvn -q -B dependency:copy -Dartifact=io.strimzi:crd-generator:1.2.0 -DoutputDirectory=gen
    java -cp 'lib/*:gen/crd-generator-1.2.0.jar' io.strimzi.crdgenerator.CrdGenerator \\
      --label app:strimzi --label strimzi.io/crd-install:true --target-kube 1.16+ \\
      --crd-api-version v1 --api-versions v1beta2 --storage-version v1beta2 --yaml \\
      io.strimzi.api.kafka.model.kafka.Kafka=040-Crd-kafka.yaml \\
      io.strimzi.api.kafka.model.nodepool.KafkaNodePool=045-Crd-kafkanodepool.yaml
    java ... (the same) --api-versions v1alpha1,v1beta1,v1beta2 --storage-version v1beta2 \\
      --yaml io.strimzi.api.kafka.model.topic.KafkaTopic=043-Crd-kafkatopic.yaml \\
      io.strimzi.api.kafka.model.user.KafkaUser=044-Crd-kafkauser.yaml

To validate a new kind, add it to WANTED (and its files to GO_SOURCES if it comes from
another operator), run with --fetch, and add its row to k8s/crd-schemas/README.md.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "k8s", "crd-schemas")

# (group, kind, version) of every custom resource the overlays render.
WANTED = [
    ("kafka.strimzi.io", "Kafka", "v1beta2"),
    ("kafka.strimzi.io", "KafkaNodePool", "v1beta2"),
    ("kafka.strimzi.io", "KafkaTopic", "v1beta2"),
    ("kafka.strimzi.io", "KafkaUser", "v1beta2"),
    ("keda.sh", "ScaledObject", "v1alpha1"),
    ("keda.sh", "TriggerAuthentication", "v1alpha1"),
    ("monitoring.coreos.com", "ServiceMonitor", "v1"),
    ("monitoring.coreos.com", "PrometheusRule", "v1"),
    ("external-secrets.io", "ExternalSecret", "v1"),
    ("external-secrets.io", "SecretStore", "v1"),
]

# Go modules that ship their CRD files: module, version, {file in the module: name in CRD_DIR}.
GO_SOURCES = [
    ("github.com/kedacore/keda/v2", "v2.21.0", {
        "config/crd/bases/keda.sh_scaledobjects.yaml": "keda/keda.sh_scaledobjects.yaml",
        "config/crd/bases/keda.sh_triggerauthentications.yaml":
            "keda/keda.sh_triggerauthentications.yaml",
    }),
    ("github.com/prometheus-operator/prometheus-operator", "v0.85.0", {
        "example/prometheus-operator-crd-full/monitoring.coreos.com_servicemonitors.yaml":
            "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
        "example/prometheus-operator-crd-full/monitoring.coreos.com_prometheusrules.yaml":
            "prometheus-operator/monitoring.coreos.com_prometheusrules.yaml",
    }),
    ("github.com/external-secrets/external-secrets", "v1.3.2", {
        "config/crds/bases/external-secrets.io_externalsecrets.yaml":
            "external-secrets/external-secrets.io_externalsecrets.yaml",
        "config/crds/bases/external-secrets.io_secretstores.yaml":
            "external-secrets/external-secrets.io_secretstores.yaml",
    }),
]

# Strimzi: generated from io.strimzi:api with io.strimzi:crd-generator (see the docstring).
STRIMZI_API = "0.48.0"
STRIMZI_GENERATOR = "1.2.0"
STRIMZI_COMMON = ["--label", "app:strimzi", "--label", "strimzi.io/crd-install:true",
                  "--target-kube", "1.16+", "--crd-api-version", "v1"]
STRIMZI_RUNS = [
    (["--api-versions", "v1beta2", "--storage-version", "v1beta2"], {
        "io.strimzi.api.kafka.model.kafka.Kafka": "040-Crd-kafka.yaml",
        "io.strimzi.api.kafka.model.nodepool.KafkaNodePool": "045-Crd-kafkanodepool.yaml",
    }),
    (["--api-versions", "v1alpha1,v1beta1,v1beta2", "--storage-version", "v1beta2"], {
        "io.strimzi.api.kafka.model.topic.KafkaTopic": "043-Crd-kafkatopic.yaml",
        "io.strimzi.api.kafka.model.user.KafkaUser": "044-Crd-kafkauser.yaml",
    }),
]


def run(cmd, quiet=False, **kw):
    """Runs cmd; with quiet, its output is shown only if it fails."""
    print("+ " + " ".join(cmd), file=sys.stderr)
    if not quiet:
        return subprocess.run(cmd, check=True, **kw)
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode:
        sys.stderr.write(done.stdout + done.stderr)
        sys.exit(f"crd-schemas: {cmd[0]} failed ({done.returncode})")
    return done


def java_major(java):
    try:
        out = subprocess.run([java, "-XshowSettings:properties", "-version"],
                             capture_output=True, text=True, check=True).stderr
    except (OSError, subprocess.CalledProcessError):
        return 0
    for line in out.splitlines():
        if "java.specification.version" in line:
            return int(line.split("=")[1].strip().split(".")[0])
    return 0


def find_java(given):
    candidates = [given] if given else (
        [os.path.join(os.environ["JAVA_HOME"], "bin", "java")] if "JAVA_HOME" in os.environ else []
    ) + ["java"] + sorted(glob.glob("/usr/lib/jvm/*/bin/java"), reverse=True)
    for java in candidates:
        if java_major(java) >= 21:
            return java
    sys.exit("crd-schemas: Strimzi's crd-generator %s needs Java 21 or later; give --java"
             % STRIMZI_GENERATOR)


def fetch(crd_dir, java):
    os.makedirs(crd_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crd-schemas-") as tmp:
        env = dict(os.environ, GOPATH=os.path.join(tmp, "gopath"), GOFLAGS="-modcacherw",
                   GOTOOLCHAIN="local", GOMODCACHE=os.path.join(tmp, "gopath", "pkg", "mod"))
        for module, version, files in GO_SOURCES:
            info = json.loads(run(["go", "mod", "download", "-json", f"{module}@{version}"],
                                  env=env, capture_output=True, text=True).stdout)
            if info.get("Error"):
                sys.exit(f"crd-schemas: {module}@{version}: {info['Error']}")
            for src, dst in files.items():
                os.makedirs(os.path.dirname(os.path.join(crd_dir, dst)), exist_ok=True)
                shutil.copyfile(os.path.join(info["Dir"], src), os.path.join(crd_dir, dst))

        mvn = os.path.join(tmp, "strimzi")
        os.makedirs(mvn)
        with open(os.path.join(mvn, "pom.xml"), "w") as f:
            f.write(f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local</groupId><artifactId>strimzi-crds</artifactId><version>1</version>
  <dependencies>
    <dependency>
      <groupId>io.strimzi</groupId><artifactId>api</artifactId><version>{STRIMZI_API}</version>
    </dependency>
  </dependencies>
</project>
""")
        run(["mvn", "-B", "dependency:copy-dependencies", "-DoutputDirectory=lib",
             "-DincludeScope=runtime"], quiet=True, cwd=mvn)
        run(["mvn", "-B", "dependency:copy",
             f"-Dartifact=io.strimzi:crd-generator:{STRIMZI_GENERATOR}", "-DoutputDirectory=gen"],
            quiet=True, cwd=mvn)
        out = os.path.join(crd_dir, "strimzi")
        os.makedirs(out, exist_ok=True)
        classpath = f"lib/*:gen/crd-generator-{STRIMZI_GENERATOR}.jar"
        for args, classes in STRIMZI_RUNS:
            targets = [f"{cls}={os.path.join(out, name)}" for cls, name in classes.items()]
            run([java, "-cp", classpath, "io.strimzi.crdgenerator.CrdGenerator",
                 *STRIMZI_COMMON, *args, "--yaml", *targets], quiet=True, cwd=mvn)


def load_crds(crd_dir):
    """{(group, kind, version): (openAPIV3Schema, file)} of every served version found."""
    found = {}
    paths = sorted(glob.glob(os.path.join(crd_dir, "**", "*.yaml"), recursive=True)
                   + glob.glob(os.path.join(crd_dir, "**", "*.yml"), recursive=True))
    for path in paths:
        with open(path) as f:
            docs = list(yaml.safe_load_all(f))
        for doc in docs:
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if not version.get("served"):
                    continue
                schema = (version.get("schema") or {}).get("openAPIV3Schema")
                key = (spec["group"], spec["names"]["kind"], version["name"])
                if schema is None:
                    sys.exit(f"crd-schemas: {path}: {key} has no openAPIV3Schema")
                if key in found and found[key][0] != schema:
                    sys.exit(f"crd-schemas: {key} differs between {found[key][1]} and {path}")
                found[key] = (schema, os.path.relpath(path, crd_dir))
    return found


def file_name(group, kind, version):
    return f"{kind.lower()}-{group}-{version}.json"


def render(schema):
    return json.dumps(schema, indent=1, ensure_ascii=False) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crd_dir", help="directory of CRD YAML files (searched recursively)")
    parser.add_argument("--fetch", action="store_true",
                        help="first download the pinned CRDs from the registries into CRD_DIR")
    parser.add_argument("--java", help="a java of version 21 or later, for --fetch")
    parser.add_argument("--out", default=OUT, help="where the JSON schemas go (%(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a vendored file is missing or differs")
    args = parser.parse_args()

    if args.fetch:
        fetch(args.crd_dir, find_java(args.java))
    found = load_crds(args.crd_dir)
    missing = [key for key in WANTED if key not in found]
    if missing:
        sys.exit("crd-schemas: not found (served) in %s: %s" % (args.crd_dir, ", ".join(
            f"{g}/{v} {k}" for g, k, v in missing)))

    stale = 0
    if not args.check:
        os.makedirs(args.out, exist_ok=True)
    for key in WANTED:
        schema, source = found[key]
        path = os.path.join(args.out, file_name(*key))
        text = render(schema)
        if args.check:
            try:
                with open(path, encoding="utf-8") as f:
                    same = f.read() == text
            except FileNotFoundError:
                same = False
            if not same:
                stale += 1
                print(f"differs: {os.path.relpath(path, ROOT)} (from {source})")
            continue
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {os.path.relpath(path, ROOT)} (from {source})")
    if args.check:
        print(f"crd-schemas: {len(WANTED) - stale} of {len(WANTED)} vendored schemas up to date")
        sys.exit(1 if stale else 0)


if __name__ == "__main__":
    main()
