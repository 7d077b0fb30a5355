#!/usr/bin/env bash
# Checks the monitoring artefacts:
#   1. `promtool check rules` and `promtool test rules` on deploy/prometheus/ (rules.yaml,
#      rules.test.yaml: every alert has a firing and a non-firing case);
#   2. the Grafana dashboard deploy/grafana/moe-cluster.json: valid JSON, unique panel ids,
#      a gridPos, datasource ${datasource} and non-empty targets on every non-row panel,
#      and every expr names only metrics the exporters have (the list below) or a
#      recording rule of rules.yaml;
#   3. writes every dashboard expr to target/monitoring/panel-queries.txt, one a line,
#      with the Grafana variables substituted, for an end-to-end test to send to a real
#      Prometheus.
# promtool comes from Debian's `prometheus` package when missing (apt-get, via sudo when
# not root). Runs from any directory; exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v promtool >/dev/null 2>&1; then
    SUDO=""; [[ "$(id -u)" = 0 ]] || SUDO="sudo"
    echo "check-monitoring: installing promtool (Debian package prometheus)"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends prometheus
fi

promtool check rules deploy/prometheus/rules.yaml
promtool test rules deploy/prometheus/rules.test.yaml

mkdir -p target/monitoring
python3 - deploy/grafana/moe-cluster.json deploy/prometheus/rules.yaml \
    target/monitoring/panel-queries.txt <<'EOF'
import json, re, sys

dashboard_path, rules_path, out_path = sys.argv[1:4]

# What the exporters expose (router, worker, standard); histograms also have
# _bucket, _sum and _count.
COUNTERS_GAUGES = """
moe_requests_total moe_requests_finished_total moe_prompt_tokens_total
moe_generation_tokens_total moe_dispatch_retries_total moe_dispatch_requests_total
moe_dispatch_bytes_total moe_worker_marked_down_total moe_controller_leader_changes_total
moe_placements_published_total moe_expert_tokens_total
moe_num_requests_running moe_num_requests_waiting moe_max_num_requests_waiting
moe_kv_cache_usage_ratio moe_placement_version moe_live_workers
moe_experts_without_live_copy moe_expert_copies_min moe_layer_load_imbalance
moe_controller_is_leader moe_etcd_connected moe_router_ready moe_build_info
moe_worker_dispatch_requests_total moe_worker_dispatch_rows_total moe_worker_expert_tokens_total
moe_worker_device_restarts_total moe_worker_expert_bytes moe_worker_hosted_experts
moe_worker_placement_version up
""".split()
HISTOGRAMS = """
moe_time_to_first_token_seconds moe_inter_token_latency_seconds
moe_e2e_request_latency_seconds moe_request_queue_time_seconds moe_engine_step_seconds
moe_engine_step_tokens moe_engine_step_sequences moe_dispatch_seconds
moe_worker_compute_seconds
""".split()
known = set(COUNTERS_GAUGES)
known |= {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
# Recording rules (the rule file is YAML; `record:` lines are enough, no PyYAML needed).
known |= set(re.findall(r"^\s*-?\s*record:\s*['\"]?([A-Za-z_:][A-Za-z0-9_:]*)",
                        open(rules_path).read(), re.M))

FILTERS = ('namespace=~"$namespace"', 'pod=~"$pod"')
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "inf", "nan", "atan2"}
VARIABLES = [("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h"),
             ("${namespace:regex}", ".*"), ("${pod:regex}", ".*"),
             ("${namespace}", ".*"), ("${pod}", ".*"), ("$namespace", ".*"), ("$pod", ".*")]

def substitute(expr):
    for var, value in VARIABLES:
        expr = expr.replace(var, value)
    return expr

def metric_names(expr):
    """Identifiers of a PromQL expression that are metric names."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)                                       # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                                      # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", e):
        name, is_call = m.group(1), m.group(2)
        if not is_call and name.lower() not in KEYWORDS:
            names.add(name)
    return names

errors = []
try:
    dashboard = json.load(open(dashboard_path))
except (OSError, ValueError) as err:
    sys.exit(f"check-monitoring: {dashboard_path}: {err}")

def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # panels inside collapsed rows

ids, queries = set(), []
for p in all_panels(dashboard.get("panels", [])):
    where = f"panel {p.get('id')} ({p.get('title')!r})"
    if p.get("id") in ids or "id" not in p:
        errors.append(f"{where}: missing or duplicate id")
    ids.add(p.get("id"))
    if not all(k in p.get("gridPos", {}) for k in ("x", "y", "w", "h")):
        errors.append(f"{where}: no complete gridPos")
    if p.get("type") == "row":
        continue
    if (p.get("datasource") or {}).get("uid") != "${datasource}":
        errors.append(f"{where}: datasource is not ${{datasource}}")
    if not p.get("description"):
        errors.append(f"{where}: no description")
    targets = p.get("targets") or []
    if not targets:
        errors.append(f"{where}: no targets")
    for t in targets:
        expr = t.get("expr", "")
        if (t.get("datasource") or {}).get("uid") != "${datasource}":
            errors.append(f"{where}: target {t.get('refId')} datasource is not ${{datasource}}")
        names = metric_names(substitute(expr))
        for name in sorted(names):  # every selector filters on namespace and pod
            for m in re.finditer(r"(?<![\w:])" + re.escape(name) + r"(?![\w:])\s*(\{[^}]*\})?", expr):
                if not all(f in (m.group(1) or "") for f in FILTERS):
                    errors.append(f"{where}: {name} not filtered by {' '.join(FILTERS)}: {expr}")
        unknown = names - known
        if unknown:
            errors.append(f"{where}: unknown metric(s) {', '.join(sorted(unknown))} in: {expr}")
        queries.append(" ".join(substitute(expr).split()))

with open(out_path, "w") as out:
    out.write("".join(q + "\n" for q in queries))
if errors:
    print("\n".join(f"check-monitoring: {dashboard_path}: {e}" for e in errors), file=sys.stderr)
    sys.exit(1)
print(f"check-monitoring: {dashboard_path}: {len(ids)} panels, {len(queries)} queries OK "
      f"(written to {out_path})")
EOF
echo "check-monitoring: OK"

# 4. The Kubernetes monitoring component carries the same rules and dashboard (kustomize
#    loads files only from inside its root, so they are copies): a PrometheusRule whose
#    spec is rules.yaml, and the dashboard JSON. `--write` refreshes them.
comp=deploy/kubernetes/components/monitoring
rule_obj() {
    printf '%s\n' "# Generated from deploy/prometheus/rules.yaml by scripts/check-monitoring.sh --write." \
        "apiVersion: monitoring.coreos.com/v1" "kind: PrometheusRule" "metadata:" \
        "  name: moe-cluster" "  labels:" "    app.kubernetes.io/part-of: moe-cluster" "spec:"
    grep -v '^#' deploy/prometheus/rules.yaml | sed 's/^\(.\)/  \1/'
}
if [ "${1:-}" = --write ]; then
    rule_obj > "$comp/prometheusrule.yaml"
    cp deploy/grafana/moe-cluster.json "$comp/moe-cluster.json"
fi
diff -q <(rule_obj) "$comp/prometheusrule.yaml" >/dev/null \
    || { echo "check-monitoring: $comp/prometheusrule.yaml is stale: run scripts/check-monitoring.sh --write" >&2; exit 1; }
cmp -s deploy/grafana/moe-cluster.json "$comp/moe-cluster.json" \
    || { echo "check-monitoring: $comp/moe-cluster.json is stale: run scripts/check-monitoring.sh --write" >&2; exit 1; }
echo "check-monitoring: the Kubernetes monitoring component matches rules.yaml and the dashboard"
