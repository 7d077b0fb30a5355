"""The mutual-TLS part of check_manifests.py.

- Structural subsets of cert-manager's Issuer and Certificate schemas (the fields these
  manifests use).
- The certificate each pod would be given, made for real with `moe cert`: for a volume
  of cert-manager's csi-driver, from its attributes (role from the URI SAN, DNS names
  and IP SANs with ${POD_NAME} / ${POD_NAMESPACE} filled in as the driver does); for a
  Secret volume, as the documented `moe cert` commands make it. `--check-config` then
  loads those files, so a certificate without the process's role, or TLS paths that no
  volume holds, fail the check.
- Checks that a worker's certificate names the address it advertises (routers verify
  it), and that the csi-driver's issuer is one of this deployment's CA issuers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

CSI_DRIVER = "csi.cert-manager.io"
ROLE_URI = "spiffe://moe-cluster/role/"
# Environment variables and flags that name TLS files, and the file each defaults to in
# a csi-driver volume.
TLS_ENV = {"MOE_TLS_CERT": "tls.crt", "MOE_TLS_KEY": "tls.key", "MOE_TLS_CA": "ca.crt"}

_META = {"type": "object", "required": ["name"]}
_ISSUER_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "group": {"const": "cert-manager.io"},
    },
}
SCHEMAS = {
    ("cert-manager.io/v1", "Issuer"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Issuer"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "selfSigned": {"type": "object"},
                    "ca": {
                        "type": "object",
                        "required": ["secretName"],
                        "additionalProperties": False,
                        "properties": {"secretName": {"type": "string"}},
                    },
                },
                "oneOf": [{"required": ["selfSigned"]}, {"required": ["ca"]}],
            },
        },
    },
    ("cert-manager.io/v1", "Certificate"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Certificate"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["secretName", "issuerRef"],
                "additionalProperties": False,
                "properties": {
                    "isCA": {"type": "boolean"},
                    "commonName": {"type": "string", "maxLength": 64},
                    "secretName": {"type": "string"},
                    "duration": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"},
                    "renewBefore": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"},
                    "dnsNames": {"type": "array", "items": {"type": "string"}},
                    "uris": {"type": "array", "items": {"type": "string"}},
                    "privateKey": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        },
                    },
                    "issuerRef": _ISSUER_REF,
                },
            },
        },
    },
}


def semantics(o: dict, objs: list[dict]) -> list[str]:
    """Cross-object rules of cert-manager objects: what refers to what."""
    errs = []
    kind, spec = o["kind"], o.get("spec", {})
    if kind == "Certificate":
        ref = spec.get("issuerRef", {})
        if ref.get("kind", "Issuer") == "Issuer" and not _get(objs, "Issuer", ref.get("name")):
            errs.append(f"issuerRef {ref.get('name')!r} is no Issuer of this deployment")
    if kind == "Issuer" and "ca" in spec:
        secret = spec["ca"]["secretName"]
        ca = [c for c in objs if c["kind"] == "Certificate" and c["spec"].get("secretName") == secret]
        if not ca:
            errs.append(f"ca.secretName {secret!r} is written by no Certificate of this deployment")
        elif not ca[0]["spec"].get("isCA"):
            errs.append(f"Certificate/{ca[0]['metadata']['name']} (Secret {secret}) is not isCA")
    return errs


def _get(objs, kind, name):
    return next((o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name), None)


def _fill(value: str, pod: str, namespace: str) -> str:
    """The csi-driver's variables, as it fills them from the pod."""
    return value.replace("${POD_NAME}", pod).replace("${POD_NAMESPACE}", namespace)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


class TlsIssuer:
    """Makes the certificates pods would get, with the binary's own `moe cert`."""

    def __init__(self, moe: str, tmp: Path, home: Path):
        self.moe, self.tmp, self.home = moe, tmp / "tls", home
        self.ca_dir = self.tmp / "ca"
        self.count = 0
        self._run(["cert", "new-ca", "--dir", str(self.ca_dir)])

    def _run(self, args: list[str]) -> None:
        r = subprocess.run([self.moe] + args, capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "HOME": str(self.home)})
        if r.returncode != 0:
            raise SystemExit(f"FAIL: `moe {' '.join(args)}` failed: {r.stderr.strip()}")

    def substitute(self, command: str, pod_spec: dict, c: dict, objs: list[dict], env: dict[str, str],
                   pod: str, namespace: str) -> tuple[list[str], list[str], list[str]]:
        """Rewrites TLS file paths in `env` to certificates made for this pod; returns
        (what was substituted, names the certificate carries, errors)."""
        paths = {k: env[k] for k in TLS_ENV if env.get(k)}
        if not paths:
            return [], [], []
        mounts = sorted(c.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        mount = next((m for m in mounts if env["MOE_TLS_CERT"].startswith(m["mountPath"].rstrip("/") + "/")), None)
        if mount is None:
            return [], [], [f"MOE_TLS_CERT {env.get('MOE_TLS_CERT')} is on no volume of the pod"]
        vol = volumes.get(mount["name"], {})
        errs: list[str] = []
        files = dict(TLS_ENV.items())  # env var -> file name inside the volume
        if "csi" in vol:
            csi = vol["csi"]
            attrs = csi.get("volumeAttributes", {})
            if csi.get("driver") != CSI_DRIVER:
                return [], [], [f"volume {mount['name']} is csi driver {csi.get('driver')}, not {CSI_DRIVER}"]
            issuer = _get(objs, attrs.get("csi.cert-manager.io/issuer-kind", "Issuer"),
                          attrs.get("csi.cert-manager.io/issuer-name"))
            if issuer is None or "ca" not in issuer.get("spec", {}):
                errs.append(f"csi issuer {attrs.get('csi.cert-manager.io/issuer-name')!r} is no CA Issuer of this deployment")
            roles = [u[len(ROLE_URI):] for u in _split(_fill(attrs.get("csi.cert-manager.io/uri-sans", ""), pod, namespace))
                     if u.startswith(ROLE_URI)]
            names = _split(_fill(attrs.get("csi.cert-manager.io/dns-names", ""), pod, namespace))
            names += _split(attrs.get("csi.cert-manager.io/ip-sans"))
            usages = _split(attrs.get("csi.cert-manager.io/key-usages"))
            if usages and not {"server auth", "client auth"} <= set(usages):
                errs.append(f"key-usages {usages} lack server auth and client auth (both ends of mTLS)")
            files["MOE_TLS_CERT"] = attrs.get("csi.cert-manager.io/certificate-file", "tls.crt")
            files["MOE_TLS_KEY"] = attrs.get("csi.cert-manager.io/privatekey-file", "tls.key")
            files["MOE_TLS_CA"] = attrs.get("csi.cert-manager.io/ca-file", "ca.crt")
            source = f"csi-driver volume {mount['name']}"
        elif "secret" in vol:
            # The Secret's contents are the operator's: checked as the documented
            # `moe cert` commands make them (components/tls-secrets).
            roles = [command]
            names = ["moe-router"] if command == "router" else [f"*.moe-worker.{namespace}.svc.cluster.local"]
            source = f"Secret {vol['secret'].get('secretName')} (as `moe cert` makes it)"
        else:
            return [], [], [f"volume {mount['name']} holding the TLS files is neither a csi-driver volume nor a Secret"]
        if len(roles) != 1:
            return [], names, errs + [f"the certificate's URI SANs give roles {roles}, not exactly one {ROLE_URI}<role>"]
        self.count += 1
        stem = f"pod{self.count}"
        self._run(["cert", "issue", "--dir", str(self.ca_dir), "--role", roles[0], "--out", stem,
                   "--name", ",".join(names or [pod]), "--days", "3"])
        d = self.tmp / stem
        d.mkdir(parents=True)
        (d / files["MOE_TLS_CERT"]).write_bytes((self.ca_dir / f"{stem}.crt").read_bytes())
        (d / files["MOE_TLS_KEY"]).write_bytes((self.ca_dir / f"{stem}.key").read_bytes())
        (d / files["MOE_TLS_CA"]).write_bytes((self.ca_dir / "ca.crt").read_bytes())
        subs = []
        for k, path in paths.items():
            want = mount["mountPath"].rstrip("/") + "/" + files[k]
            if path != want:
                errs.append(f"{k}={path}, but the {source} holds it at {want}")
                continue
            env[k] = str(d / files[k])
            subs.append(k)
        return [f"{'/'.join(subs)} (a {roles[0]} certificate from the {source})"], names or [pod], errs


def names_cover(names: list[str], host: str) -> bool:
    """Whether a certificate with these DNS/IP names is valid for `host` (a wildcard
    matches one label, as rustls does)."""
    for n in names:
        if n == host:
            return True
        if n.startswith("*.") and host.split(".", 1)[1:] == [n[2:]]:
            return True
    return False
