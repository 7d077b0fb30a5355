#!/usr/bin/env bash
# Makes (or reuses) the Python venv with the client libraries the end-to-end client tests
# drive (the official `openai` package; grpcio and its tools for the gRPC client;
# openapi-spec-validator and jsonschema for the OpenAPI document; schemathesis to fuzz the
# API from that document) and
# prints the venv's python path on stdout. Cached: a venv whose pins match is reused.
#   MOE_CLIENTS_VENV  where the venv lives (default ~/.cache/moe-cluster/venv-clients)
set -euo pipefail

venv="${MOE_CLIENTS_VENV:-$HOME/.cache/moe-cluster/venv-clients}"
pins=(openai==3.51.0 grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
      openapi-spec-validator==0.9.0 schemathesis==4.32.5)
stamp="$venv/.moe-pins"

# Tests run in parallel processes: one makes the venv, the others wait for it.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" ]]; then
    echo "$venv/bin/python"
    exit 0
fi

if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "python-clients.sh: installing python3-venv" >&2
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >&2
fi

rm -rf "$venv"
python3 -m venv "$venv" >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" >&2
echo "${pins[*]}" > "$stamp"
echo "$venv/bin/python"
