#!/usr/bin/env python3
"""Checks the mailscope Helm chart: renders it with Helm's own engine (helm-python-sdk), lints it,
validates every manifest against the Kubernetes JSON schemas (kubernetes-validate), checks that
values.schema.json rejects bad values and that the templates refuse unsafe combinations, and, given
the mailscope binary, that the rendered subcommands, flags, ports and environment variable names
are the ones the binary really has.

Run it through run.sh, which sets up the pinned virtualenv:
    bash helm/tests/run.sh [path/to/mailscope] [--database-url postgres://...]

Offline: no cluster, no network. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

import helm_python as helm
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHART = HERE.parent / "mailscope"
DOCKERFILE = REPO / "Dockerfile"

RELEASE = "mailscope"  # The most likely release name; it also makes the Service "mailscope".
NAMESPACE = "mailscope"

# Dummy secrets of the right shape, standing in for the Secret's values. They must never appear
# in the binary's output (check-config prints the configuration redacted).
DUMMY_DB_PASSWORD = "dummy-db-password-6f1c"
DUMMY_SECRETS = {
    "DATABASE_URL": f"postgres://mailscope:{DUMMY_DB_PASSWORD}@db.example.invalid:5432/mailscope",
    "MAILSCOPE_ENCRYPTION_KEY": base64.b64encode(bytes(range(1, 33))).decode(),
    "MAILSCOPE_AUTH__HS256_SECRET": "dummy-hs256-secret-for-chart-tests-0123456789abcdef",
    "MAILSCOPE_WEBHOOKS__SIGNING_SECRET": "whsec_" + base64.b64encode(bytes(range(40, 72))).decode(),
}
SECRET_MARKERS = [
    DUMMY_DB_PASSWORD,
    DUMMY_SECRETS["MAILSCOPE_ENCRYPTION_KEY"],
    DUMMY_SECRETS["MAILSCOPE_AUTH__HS256_SECRET"],
    DUMMY_SECRETS["MAILSCOPE_WEBHOOKS__SIGNING_SECRET"].removeprefix("whsec_"),
]

BASE = {"secrets": {"existingSecret": "mailscope-secrets"}}

# Value combinations rendered, linted and validated. Each adds to BASE.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "hpa": {
        "api": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12}},
        "worker": {"autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80,
                                   "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}}}},
    },
    "networkpolicy": {
        "networkPolicy": {
            "enabled": True,
            "ingress": {"namespaces": ["ingress-nginx", "portal"], "metricsNamespaces": ["monitoring"]},
            "egress": {"database": {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]}},
        },
    },
    "ingress": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"},
            "tls": [{"secretName": "mailscope-tls", "hosts": ["mailscope.example.com"]}],
        },
    },
    "sandbox": {"sandbox": {"enabled": True}},
    "servicemonitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "demo-secrets": {
        "secrets": {
            "existingSecret": "",
            "create": True,
            "demo": {
                "databaseUrl": "postgres://mailscope:demo@postgres:5432/mailscope",
                "encryptionKey": DUMMY_SECRETS["MAILSCOPE_ENCRYPTION_KEY"],
                "hs256Secret": "demo-hs256-secret-0123456789abcdef0123456789",
            },
        },
    },
    "jwks-auth": {
        "config": {"logFormat": "text", "logFilter": "info,mailscope=debug",
                   "auth": {"issuer": "https://login.example.com/", "audience": "api://mailscope",
                            "jwksUrl": "https://login.example.com/.well-known/jwks.json"}},
    },
    "no-migration-hook": {
        "migrations": {"enabled": False},
        "serviceAccount": {"create": False, "name": "mailscope-runtime"},
        "api": {"pdb": {"minAvailable": "50%", "maxUnavailable": ""}, "preStopSleepSeconds": 0},
    },
    "everything": {
        "api": {"autoscaling": {"enabled": True}},
        "worker": {"autoscaling": {"enabled": True}},
        "networkPolicy": {"enabled": True, "ingress": {"namespaces": ["ingress-nginx"],
                                                       "metricsNamespaces": ["monitoring"]}},
        "ingress": {"enabled": True},
        "sandbox": {"enabled": True},
        "serviceMonitor": {"enabled": True, "namespace": "monitoring"},
        "image": {"repository": "registry.example.com/platform/mailscope",
                  "digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "long-release-name": {"__release__": "a-rather-long-release-name-from-a-gitops-tool"},
}

# values.schema.json must reject each of these (added to BASE).
BAD_VALUES: dict[str, dict[str, Any]] = {
    'api.replicas "three"': {"api": {"replicas": "three"}},
    "unknown top-level key replicaCount": {"replicaCount": 3},
    "misspelled api.replica": {"api": {"replica": 3}},
    "misspelled worker.autoscaling.enable": {"worker": {"autoscaling": {"enable": True}}},
    'config.logFormat "xml"': {"config": {"logFormat": "xml"}},
    "worker.concurrency 0": {"worker": {"concurrency": 0}},
    'image.digest "latest"': {"image": {"digest": "latest"}},
    "a secret in config.extraEnv": {"config": {"extraEnv": {"MAILSCOPE_ENCRYPTION_KEY": "x"}}},
    "a non-MAILSCOPE_ name in config.extraEnv": {"config": {"extraEnv": {"RUST_LOG": "debug"}}},
    'ingress pathType "prefix"': {"ingress": {"hosts": [{"host": "a.example.com",
                                                         "paths": [{"path": "/v1", "pathType": "prefix"}]}]}},
    'pdb maxUnavailable "one"': {"api": {"pdb": {"maxUnavailable": "one"}}},
    "a demo encryption key that is not 32 bytes": {"secrets": {"demo": {"encryptionKey": "c2hvcnQ="}}},
    'serviceMonitor.interval "often"': {"serviceMonitor": {"interval": "often"}},
    "probe path override": {"api": {"livenessProbe": {"httpGet": {"path": "/"}}}},
}

# Values the schema accepts but the templates must refuse, with part of the message expected.
REFUSED_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "no Secret at all": ({"secrets": {"existingSecret": ""}}, "secrets.existingSecret is required"),
    "existingSecret and create together": ({"secrets": {"create": True}}, "not both"),
    "demo mode without a database URL": (
        {"secrets": {"existingSecret": "", "create": True,
                     "demo": {"encryptionKey": DUMMY_SECRETS["MAILSCOPE_ENCRYPTION_KEY"]}}},
        "secrets.demo.databaseUrl"),
    "grace period shorter than the shutdown grace": (
        {"worker": {"terminationGracePeriodSeconds": 20}}, "worker.terminationGracePeriodSeconds"),
    "HPA minReplicas above maxReplicas": (
        {"api": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}, "minReplicas"),
    "PDB with both minAvailable and maxUnavailable": ({"api": {"pdb": {"minAvailable": 1}}}, "exactly one"),
}

# A trimmed, strict schema of the ServiceMonitor fields the chart uses (monitoring.coreos.com/v1).
# kubernetes-validate has no schemas for CRDs, so this stands in; field names and the duration
# pattern follow the prometheus-operator CRD.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICEMONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "additionalProperties": False,
                     "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                                    "labels": _LABELS, "annotations": _LABELS}},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": _LABELS,
                    "matchExpressions": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "required": ["key", "operator"],
                        "properties": {"key": {"type": "string"},
                                       "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                       "values": {"type": "array", "items": {"type": "string"}}}}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        "honorLabels": {"type": "boolean"}}}},
            },
        },
    },
}

MAILSCOPE_COMPONENTS = {"api", "worker", "migrate", "sandbox"}


# --------------------------------------------------------------------------------------------
# Tiny check runner: every check is named, counted and reported; a failure never stops the rest.


class Runner:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []
        self.skipped: list[str] = []

    def check(self, name: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
        except Skip as s:
            self.skipped.append(name)
            print(f"skip - {name}: {s}")
            return True
        except AssertionError as e:
            self.failed.append(name)
            print(f"FAIL - {name}\n{_indent(str(e) or 'assertion failed')}")
            return False
        except Exception as e:  # A crash in a check is a failed check, with its cause.
            self.failed.append(name)
            print(f"FAIL - {name}: {type(e).__name__}: {e}\n{_indent(traceback.format_exc())}")
            return False
        self.passed += 1
        print(f"ok   - {name}")
        return True


class Skip(Exception):
    pass


def _indent(text: str) -> str:
    return "\n".join("       " + line for line in text.rstrip().splitlines())


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------------------------
# Rendering


class Rendered:
    """One rendering of the chart: its objects, with the template each came from."""

    def __init__(self, name: str, values: dict[str, Any], merged: dict[str, Any], release: str,
                 files: dict[str, str]):
        self.name = name
        self.values = values  # What was passed.
        self.merged = merged  # With the chart's defaults, as an install would use them.
        self.release = release
        self.notes = ""
        self.objects: list[dict[str, Any]] = []
        self.sources: list[str] = []
        for path, text in sorted(files.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.objects.append(doc)
                    self.sources.append(path)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        for o in self.of_kind(kind):
            if o["metadata"]["name"] == name:
                return o
        return None

    def pod_owners(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] in ("Deployment", "Job")]


def render(chart: helm.Chart, name: str, extra: dict[str, Any]) -> Rendered:
    extra = dict(extra)
    release = extra.pop("__release__", RELEASE)
    values = deep_merge(BASE, extra)
    files = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    return Rendered(name, values, chart.merge_values(values), release, files)


def component(obj: dict[str, Any]) -> str:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")


def hook(obj: dict[str, Any]) -> tuple[set[str], int] | None:
    ann = obj["metadata"].get("annotations") or {}
    if "helm.sh/hook" not in ann:
        return None
    return set(ann["helm.sh/hook"].split(",")), int(ann.get("helm.sh/hook-weight", "0"))


def pod_spec(owner: dict[str, Any]) -> dict[str, Any]:
    return owner["spec"]["template"]["spec"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, vals = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def resolve_env(r: Rendered, container: dict[str, Any]) -> dict[str, str]:
    """The environment the container would get, with Secret values replaced by dummies.

    Order as in Kubernetes: envFrom first, then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        assert ref, f"unsupported envFrom {source}"
        cm = r.get("ConfigMap", ref["name"])
        assert cm is not None, f"envFrom names ConfigMap {ref['name']!r}, which the chart does not render"
        env.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var:
            env[name] = str(var["value"])
        elif "secretKeyRef" in (var.get("valueFrom") or {}):
            assert name in DUMMY_SECRETS, f"no dummy value for secret variable {name}"
            if var["valueFrom"]["secretKeyRef"].get("optional") and r.merged["config"]["auth"]["jwksUrl"]:
                continue  # With a JWKS URL the docs say to leave the optional HS256 key out.
            env[name] = DUMMY_SECRETS[name]
        else:
            raise AssertionError(f"unsupported env source for {name}: {var}")
    return env


# --------------------------------------------------------------------------------------------
# Checks of one rendering


def validate_kubernetes(r: Rendered, versions: list[str]) -> None:
    problems = []
    for obj, src in zip(r.objects, r.sources):
        label = f"{src}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            # A CRD: kubernetes-validate has no schema; the trimmed strict one stands in.
            errors = sorted(jsonschema.Draft202012Validator(SERVICEMONITOR_SCHEMA).iter_errors(obj), key=str)
            problems += [f"{label}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors]
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{label} against {version}: {'.'.join(map(str, e.path))}: {e.message}")
            except kv_utils.SchemaNotFoundError as e:
                problems.append(f"{label}: {e.message}")
    assert not problems, "\n".join(problems)


def check_names(r: Rendered) -> None:
    problems = []
    dns_label = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for obj in r.objects:
        meta = obj["metadata"]
        name = meta["name"]
        if len(name) > 63 or not dns_label.match(name):
            problems.append(f"{obj['kind']} name {name!r} is not a DNS label of at most 63 characters")
        for k, v in (meta.get("labels") or {}).items():
            if len(str(v)) > 63:
                problems.append(f"{obj['kind']}/{name} label {k}={v!r} is longer than 63 characters")
    seen = set()
    for obj in r.objects:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in seen:
            problems.append(f"{key[0]}/{key[1]} is rendered twice")
        seen.add(key)
    assert not problems, "\n".join(problems)


def check_security(r: Rendered) -> None:
    problems = []
    for owner in r.pod_owners():
        label = f"{owner['kind']}/{owner['metadata']['name']}"
        spec = pod_spec(owner)
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{label}: automountServiceAccountToken is not false")
        if spec.get("enableServiceLinks") is not False:
            # Service links inject MAILSCOPE_*_SERVICE_HOST variables that the strict config rejects.
            problems.append(f"{label}: enableServiceLinks is not false")
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{label}: pod runAsNonRoot is not true")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{label}: seccompProfile is not RuntimeDefault")
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext") or {}
            where = f"{label} container {c['name']}"
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: capabilities are not drop [ALL]")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            if not (c.get("resources") or {}).get("requests"):
                problems.append(f"{where}: no resource requests")
            if c["image"].endswith(":latest") or ":" not in c["image"].rsplit("/", 1)[-1]:
                problems.append(f"{where}: image {c['image']!r} has no pinned tag or digest")
    for sa in r.of_kind("ServiceAccount"):
        if sa.get("automountServiceAccountToken") is not False:
            problems.append(f"ServiceAccount/{sa['metadata']['name']}: automountServiceAccountToken is not false")
    assert not problems, "\n".join(problems)


def check_secrets(r: Rendered) -> None:
    """DATABASE_URL always comes from a Secret (without it the binary would start an embedded
    PostgreSQL); no secret is ever a plain value; a Secret is rendered only in demo mode."""
    demo = r.values["secrets"].get("create", False)
    problems = []
    secrets = r.of_kind("Secret")
    if not demo and secrets:
        problems.append(f"Secrets rendered without secrets.create: {[s['metadata']['name'] for s in secrets]}")
    if demo and not secrets:
        problems.append("secrets.create=true rendered no Secret")
    for owner in r.pod_owners():
        if component(owner) not in ("api", "worker", "migrate"):
            continue
        c = pod_spec(owner)["containers"][0]
        env = {v["name"]: v for v in c.get("env") or []}
        for name in DUMMY_SECRETS:
            var = env.get(name)
            if var is None or "secretKeyRef" not in (var.get("valueFrom") or {}):
                problems.append(f"{owner['metadata']['name']}: {name} is not read from a Secret")
                continue
            ref = var["valueFrom"]["secretKeyRef"]
            want = r.values["secrets"]["existingSecret"]
            if want and ref["name"] != want:
                problems.append(f"{owner['metadata']['name']}: {name} reads Secret {ref['name']}, not {want}")
            if not want and r.get("Secret", ref["name"]) is None:
                problems.append(f"{owner['metadata']['name']}: {name} reads Secret {ref['name']}, not rendered")
        for cm in c.get("envFrom") or []:
            data = (r.get("ConfigMap", cm.get("configMapRef", {}).get("name", "")) or {}).get("data") or {}
            leaked = set(data) & set(DUMMY_SECRETS)
            if leaked:
                problems.append(f"secret variables in a ConfigMap: {leaked}")
    assert not problems, "\n".join(problems)


def check_workloads(r: Rendered) -> None:
    merged = r.merged
    migrations = merged["migrations"]["enabled"]
    problems = []
    expected = {
        "api": ["serve", "--no-worker"] + (["--no-migrate"] if migrations else []),
        "worker": ["serve", "--worker-only"] + (["--no-migrate"] if migrations else []),
    }
    deployments = {component(d): d for d in r.of_kind("Deployment")}
    want_components = {"api", "worker"} | ({"sandbox"} if merged["sandbox"]["enabled"] else set())
    if set(deployments) != want_components:
        problems.append(f"Deployments for {sorted(deployments)}, expected {sorted(want_components)}")
    for comp, args in expected.items():
        d = deployments.get(comp)
        if d is None:
            continue
        spec = pod_spec(d)
        c = spec["containers"][0]
        if c.get("args") != args:
            problems.append(f"{comp}: args {c.get('args')}, expected {args}")
        if c.get("command"):
            problems.append(f"{comp}: overrides the image's entrypoint with command {c['command']}")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        env = resolve_env(r, c)
        listen_port = int(env.get("MAILSCOPE_LISTEN", "127.0.0.1:8080").rsplit(":", 1)[1])
        if not env.get("MAILSCOPE_LISTEN", "").startswith("0.0.0.0:"):
            problems.append(f"{comp}: MAILSCOPE_LISTEN {env.get('MAILSCOPE_LISTEN')!r} is not on all interfaces")
        if ports.get("http") != listen_port:
            problems.append(f"{comp}: container port http={ports.get('http')} but MAILSCOPE_LISTEN port {listen_port}")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
            get = (c.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != path:
                problems.append(f"{comp}: {probe} path {get.get('path')!r}, expected {path}")
            if get.get("port") not in ports and get.get("port") not in ports.values():
                problems.append(f"{comp}: {probe} port {get.get('port')!r} is not a container port")
        grace = int(env.get("MAILSCOPE_SHUTDOWN_GRACE_SECONDS", "30"))
        pre_stop = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
        if spec.get("terminationGracePeriodSeconds", 30) < grace + pre_stop + 5:
            problems.append(f"{comp}: terminationGracePeriodSeconds {spec.get('terminationGracePeriodSeconds')}"
                            f" leaves no room for a {grace}s shutdown after a {pre_stop}s preStop")
        autoscaled = merged[comp]["autoscaling"]["enabled"]
        if autoscaled and "replicas" in d["spec"]:
            problems.append(f"{comp}: autoscaled, yet the Deployment sets replicas (it would fight the HPA)")
        if not autoscaled and d["spec"].get("replicas") != merged[comp]["replicas"]:
            problems.append(f"{comp}: replicas {d['spec'].get('replicas')} != values {merged[comp]['replicas']}")
        pool = env.get("MAILSCOPE_DATABASE__POOL_SIZE")
        if pool != str(merged[comp]["databasePoolSize"]):
            problems.append(f"{comp}: pool size {pool} != values {merged[comp]['databasePoolSize']}")
        if comp == "worker" and env.get("MAILSCOPE_WORKER__CONCURRENCY") != str(merged["worker"]["concurrency"]):
            problems.append("worker: MAILSCOPE_WORKER__CONCURRENCY does not follow worker.concurrency")
        annotations = d["spec"]["template"]["metadata"].get("annotations") or {}
        if "checksum/config" not in annotations:
            problems.append(f"{comp}: no checksum/config annotation, so a config change would not roll the pods")
        if not selects(d["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]):
            problems.append(f"{comp}: the Deployment's selector does not select its own pods")

    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in r.of_kind("HorizontalPodAutoscaler")}
    for comp in ("api", "worker"):
        d = deployments.get(comp)
        want = merged[comp]["autoscaling"]["enabled"]
        if d is not None and (d["metadata"]["name"] in hpas) != want:
            problems.append(f"{comp}: HPA present={d['metadata']['name'] in hpas}, autoscaling.enabled={want}")
    for name in hpas:
        if r.get("Deployment", name) is None:
            problems.append(f"HPA targets Deployment {name}, which is not rendered")

    jobs = r.of_kind("Job")
    if migrations != bool(jobs):
        problems.append(f"migrations.enabled={migrations} but {len(jobs)} Job(s) rendered")
    for job in jobs:
        c = pod_spec(job)["containers"][0]
        if c.get("args") != ["migrate"]:
            problems.append(f"migration Job args {c.get('args')}, expected ['migrate']")
        h = hook(job)
        if h is None or h[0] != {"pre-install", "pre-upgrade"}:
            problems.append(f"migration Job is not a pre-install,pre-upgrade hook: {job['metadata'].get('annotations')}")
        if pod_spec(job).get("restartPolicy") != "Never":
            problems.append("migration Job restartPolicy is not Never")
        if "activeDeadlineSeconds" not in job["spec"]:
            problems.append("migration Job has no activeDeadlineSeconds: a stuck migration would hang the upgrade")

    sandbox = deployments.get("sandbox")
    if sandbox is not None:
        c = pod_spec(sandbox)["containers"][0]
        args = c.get("args") or []
        if args[:2] != ["sandbox", "--listen"] or len(args) != 3:
            problems.append(f"sandbox args {args}")
        else:
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if not args[2].startswith("0.0.0.0:") or int(args[2].rsplit(":", 1)[1]) != ports.get("http"):
                problems.append(f"sandbox listens on {args[2]} but its container port http is {ports.get('http')}")
    assert not problems, "\n".join(problems)


def check_hook_order(r: Rendered) -> None:
    """Hooks run before the release's own objects exist (first install) and Helm deletes
    hook-succeeded hooks afterwards. So a hook may only use objects that are pre-existing or
    hooks of the same events with a lower weight, and a Deployment may only use objects that are
    pre-existing or regular release objects."""
    problems = []
    for owner in r.pod_owners():
        spec = pod_spec(owner)
        uses: list[tuple[str, str]] = []
        sa = spec.get("serviceAccountName")
        if sa:
            uses.append(("ServiceAccount", sa))
        for c in spec["containers"]:
            for var in c.get("env") or []:
                ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    uses.append(("Secret", ref["name"]))
            for src in c.get("envFrom") or []:
                if "configMapRef" in src:
                    uses.append(("ConfigMap", src["configMapRef"]["name"]))
        owner_hook = hook(owner)
        for kind, name in sorted(set(uses)):
            used = r.get(kind, name)
            if used is None:
                continue  # Pre-existing (existingSecret, serviceAccount.create=false).
            used_hook = hook(used)
            label = f"{owner['kind']}/{owner['metadata']['name']} uses {kind}/{name}"
            if owner_hook is None and used_hook is not None:
                problems.append(f"{label}, a hook object that Helm deletes after the hook")
            if owner_hook is not None:
                if used_hook is None:
                    problems.append(f"{label}, which does not exist yet when the hook runs on a first install")
                elif not owner_hook[0] <= used_hook[0] or used_hook[1] >= owner_hook[1]:
                    problems.append(f"{label}, which is not a hook of the same events with a lower weight")
    for np in r.of_kind("NetworkPolicy"):
        targets = [o for o in r.pod_owners() if selects(np["spec"]["podSelector"],
                                                        o["spec"]["template"]["metadata"]["labels"])]
        if any(hook(t) for t in targets) and hook(np) is None:
            problems.append(f"NetworkPolicy/{np['metadata']['name']} admits a hook's pods but is created after it")
    assert not problems, "\n".join(problems)


def check_wiring(r: Rendered) -> None:
    """Selectors and port names that tie the objects together (a schema cannot see these)."""
    problems = []
    pods = {o["metadata"]["name"]: o["spec"]["template"] for o in r.pod_owners()}

    def selected(selector: dict[str, Any]) -> list[str]:
        return [n for n, t in pods.items() if selects(selector, t["metadata"]["labels"])]

    def port_names(owner_names: Iterable[str]) -> set[str]:
        return {p["name"] for n in owner_names for c in pods[n]["spec"]["containers"] for p in c.get("ports", [])}

    for svc in r.of_kind("Service"):
        targets = selected({"matchLabels": svc["spec"]["selector"]})
        if len(targets) != 1:
            problems.append(f"Service/{svc['metadata']['name']} selects {targets}, expected exactly one Deployment")
        elif component(svc) != component(r.get("Deployment", targets[0]) or {"metadata": {}}):
            problems.append(f"Service/{svc['metadata']['name']} ({component(svc)}) selects {targets[0]}")
        for port in svc["spec"]["ports"]:
            if isinstance(port["targetPort"], str) and port["targetPort"] not in port_names(targets):
                problems.append(f"Service/{svc['metadata']['name']} targetPort {port['targetPort']} not on {targets}")
    api_services = [s for s in r.of_kind("Service") if component(s) == "api"]
    if len(api_services) != 1:
        problems.append(f"{len(api_services)} Services in front of the API, expected 1")
    for pdb in r.of_kind("PodDisruptionBudget"):
        targets = selected(pdb["spec"]["selector"])
        if len(targets) != 1:
            problems.append(f"PDB/{pdb['metadata']['name']} selects {targets}, expected exactly one Deployment")
    for np in r.of_kind("NetworkPolicy"):
        if not selected(np["spec"]["podSelector"]):
            problems.append(f"NetworkPolicy/{np['metadata']['name']} selects no pods")
        for rule in np["spec"].get("egress") or []:
            for peer in rule.get("to") or []:
                if "podSelector" in peer and "namespaceSelector" not in peer and not selected(peer["podSelector"]):
                    problems.append(f"NetworkPolicy/{np['metadata']['name']} egress to pods nobody renders: {peer}")
    for ing in r.of_kind("Ingress"):
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                backend = p["backend"]["service"]
                svc = r.get("Service", backend["name"])
                if svc is None:
                    problems.append(f"Ingress routes to Service {backend['name']}, which is not rendered")
                elif backend["port"].get("name") not in {sp["name"] for sp in svc["spec"]["ports"]}:
                    problems.append(f"Ingress routes to port {backend['port']} not on Service {backend['name']}")
                if p["path"] in ("/metrics", "/healthz", "/readyz") or p["path"] == "/" and p["pathType"] == "Prefix":
                    problems.append(f"Ingress exposes {p['path']} ({p['pathType']}): /metrics would be public")
    for sm in r.of_kind("ServiceMonitor"):
        services = [s for s in r.of_kind("Service") if selects(sm["spec"]["selector"], s["metadata"]["labels"])]
        comps = sorted(component(s) for s in services)
        if comps != ["api", "worker"]:
            problems.append(f"ServiceMonitor selects Services of {comps}, expected the api and the workers")
        if NAMESPACE not in (sm["spec"].get("namespaceSelector") or {}).get("matchNames", []):
            problems.append("ServiceMonitor does not look in the release namespace")
        for ep in sm["spec"]["endpoints"]:
            if ep.get("path") != "/metrics":
                problems.append(f"ServiceMonitor scrapes {ep.get('path')}, not /metrics")
            for s in services:
                if ep["port"] not in {p["name"] for p in s["spec"]["ports"]}:
                    problems.append(f"ServiceMonitor port {ep['port']} is not on Service {s['metadata']['name']}")
    assert not problems, "\n".join(problems)


def check_expected_kinds(r: Rendered) -> None:
    m = r.merged
    want = {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    if m["serviceAccount"]["create"]:
        want.add("ServiceAccount")
    if m["migrations"]["enabled"]:
        want.add("Job")
    if m["api"]["autoscaling"]["enabled"] or m["worker"]["autoscaling"]["enabled"]:
        want.add("HorizontalPodAutoscaler")
    if m["networkPolicy"]["enabled"]:
        want.add("NetworkPolicy")
    if m["ingress"]["enabled"]:
        want.add("Ingress")
    if m["serviceMonitor"]["enabled"]:
        want.add("ServiceMonitor")
    if m["secrets"]["create"]:
        want.add("Secret")
    got = {o["kind"] for o in r.objects}
    assert got == want, f"rendered kinds {sorted(got)}, expected {sorted(want)}"
    assert "Peak PostgreSQL connections" in r.notes, "NOTES.txt lost the connection count"


def lint(values: dict[str, Any], kube_version: str) -> None:
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{kube_version}.0", namespace=NAMESPACE)
    bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    assert not report.get("errors") and not bad, "\n".join(
        [f"{m['path']}: {m['error']}" for m in bad] + list(report.get("errors") or []))


# --------------------------------------------------------------------------------------------
# The binary


class Binary:
    def __init__(self, path: Path, workdir: Path):
        self.path = path
        self.workdir = workdir  # Empty cwd and HOME, so no stray config file is picked up.

    def run(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir)}
        full_env.update(env or {})
        return subprocess.run([str(self.path), *args], env=full_env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    @functools.lru_cache(maxsize=None)
    def help(self, *subcommand: str) -> str:
        p = self.run([*subcommand, "--help"])
        assert p.returncode == 0, (f"`mailscope {' '.join(subcommand)} --help` exited {p.returncode}:\n"
                                   f"{p.stdout}{p.stderr}")
        return p.stdout + p.stderr

    def subcommands(self) -> set[str]:
        text = self.help()
        section = re.search(r"(?ms)^(?:Commands|Subcommands|SUBCOMMANDS):\s*\n(.*?)(?:\n\s*\n|\Z)", text)
        assert section, f"`mailscope --help` lists no subcommands:\n{text}"
        return {m.group(1) for m in re.finditer(r"(?m)^\s+([a-z][a-z0-9-]*)\b", section.group(1))}

    def flags(self, *subcommand: str) -> set[str]:
        return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", self.help(*subcommand)))


def dockerfile_env() -> dict[str, str]:
    """ENV of the Dockerfile's final stage: the image's defaults under the chart's env."""
    text = DOCKERFILE.read_text()
    final = text[text.rfind("\nFROM "):]
    env: dict[str, str] = {}
    for m in re.finditer(r"(?m)^ENV\s+((?:.*\\\n)*.*)$", final):
        for token in shlex.split(m.group(1).replace("\\\n", " ")):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def mailscope_containers(renders: list[Rendered]) -> Iterable[tuple[Rendered, dict[str, Any], dict[str, Any]]]:
    for r in renders:
        for owner in r.pod_owners():
            for c in pod_spec(owner)["containers"]:
                yield r, owner, c


def check_binary_commands(b: Binary, renders: list[Rendered]) -> None:
    needed = {"serve", "migrate", "sandbox", "check-config"}
    subcommands = b.subcommands()
    missing = needed - subcommands
    assert not missing, (f"`{b.path} --help` lacks the subcommand(s) {sorted(missing)} that the chart and this "
                         f"test use; it lists {sorted(subcommands)}")
    problems = []
    for r, owner, c in mailscope_containers(renders):
        args = c.get("args") or []
        sub, rest = args[0], args[1:]
        if sub not in subcommands:
            problems.append(f"{r.name}: {owner['metadata']['name']} runs unknown subcommand {sub!r}")
            continue
        for flag in (a for a in rest if a.startswith("--")):
            if flag not in b.flags(sub):
                problems.append(f"{r.name}: {owner['metadata']['name']} passes {flag}, unknown to `mailscope {sub}`")
    assert not problems, "\n".join(sorted(set(problems)))


def check_config_env(b: Binary, renders: list[Rendered]) -> None:
    """`mailscope check-config` under each container's full environment: the names are real
    (the config denies unknown fields) and the values parse; no secret is printed."""
    image_env = dockerfile_env()
    seen: set[frozenset[tuple[str, str]]] = set()
    problems = []
    for r, owner, c in mailscope_containers(renders):
        env = {**image_env, **resolve_env(r, c)}
        key = frozenset(env.items())
        if key in seen:
            continue
        seen.add(key)
        p = b.run(["check-config"], env)
        out = p.stdout + p.stderr
        label = f"{r.name}: {owner['metadata']['name']} with {' '.join(sorted(env))}"
        if p.returncode != 0:
            problems.append(f"{label}\n  check-config exited {p.returncode}:\n{_indent(out)}")
        leaked = [m for m in SECRET_MARKERS if m in out]
        if leaked:
            problems.append(f"{label}\n  check-config printed a secret value ({len(leaked)} of them)")
    assert seen, "no container environment to check"
    assert not problems, "\n".join(problems)


def check_config_rejects_unknown(b: Binary, chart: helm.Chart) -> None:
    """The control for the check above: a misspelled name that reaches the pods through the chart
    must make check-config fail, or the name check could never catch drift."""
    r = render(chart, "typo", {"config": {"extraEnv": {"MAILSCOPE_LOG_FORMATT": "json"}}})
    api = next(d for d in r.of_kind("Deployment") if component(d) == "api")
    env = {**dockerfile_env(), **resolve_env(r, pod_spec(api)["containers"][0])}
    assert "MAILSCOPE_LOG_FORMATT" in env, "the chart dropped config.extraEnv"
    p = b.run(["check-config"], env)
    assert p.returncode != 0, ("check-config accepted the unknown variable MAILSCOPE_LOG_FORMATT, so it cannot "
                               "prove the chart's variable names are real (is deny_unknown_fields on?)")


# --------------------------------------------------------------------------------------------
# Optional smoke run against a real PostgreSQL: the probes answer where the chart points them.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def smoke(b: Binary, r: Rendered, database_url: str) -> None:
    problems = []
    owners = {component(o): o for o in r.pod_owners()}

    def env_for(comp: str, listen: str | None = None) -> dict[str, str]:
        env = {**dockerfile_env(), **resolve_env(r, pod_spec(owners[comp])["containers"][0])}
        env["DATABASE_URL"] = database_url
        if listen:
            env["MAILSCOPE_LISTEN"] = listen
        return env

    p = b.run(pod_spec(owners["migrate"])["containers"][0]["args"], env_for("migrate"), timeout=120)
    assert p.returncode == 0, f"`mailscope migrate` exited {p.returncode}:\n{p.stdout}{p.stderr}"
    for comp in ("api", "worker"):
        c = pod_spec(owners[comp])["containers"][0]
        port = free_port()
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen([str(b.path), *c["args"]], env={"PATH": os.environ.get("PATH", ""),
                                "HOME": str(b.workdir), **env_for(comp, f"127.0.0.1:{port}")},
                                cwd=b.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        before = len(problems)
        try:
            paths = {c[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
            paths.add("/metrics")
            deadline = time.monotonic() + 60
            status: dict[str, int | None] = {}
            while time.monotonic() < deadline and proc.poll() is None:
                status = {path: http_status(f"http://127.0.0.1:{port}{path}") for path in sorted(paths)}
                if all(s == 200 for s in status.values()):
                    break
                time.sleep(0.5)
            if not status or any(s != 200 for s in status.values()):
                problems.append(f"{comp} ({' '.join(c['args'])}): probe paths answered {status}, "
                                f"exit={proc.poll()}")
        finally:
            grace = int(env_for(comp)["MAILSCOPE_SHUTDOWN_GRACE_SECONDS"]) + 5
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    problems.append(f"{comp}: still running {grace}s after SIGTERM")
            if proc.returncode is not None and proc.returncode < 0 and proc.returncode != -signal.SIGKILL:
                problems.append(f"{comp}: died of signal {-proc.returncode} instead of shutting down")
            if len(problems) > before:
                log.seek(0)
                problems.append(_indent(log.read()[-3000:]))
            log.close()
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, help="the built mailscope binary; its checks are skipped without it")
    parser.add_argument("--database-url", default=os.environ.get("MAILSCOPE_HELM_SMOKE_DATABASE_URL"),
                        help="an existing, disposable PostgreSQL database for the smoke run (needs --binary)")
    parser.add_argument("--kube-versions", default="",
                        help="comma-separated Kubernetes versions to validate against "
                             "(default: the chart's minimum and the newest kubernetes-validate ships)")
    args = parser.parse_args()

    # The schema files are large; each is read once instead of once per object.
    kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)

    helm.disable_logging()  # Lint's "fail" notices; failures are reported as checks.
    run = Runner()
    chart = helm.Chart.load(str(CHART))
    meta = chart.metadata
    floor = re.search(r">=\s*v?(\d+\.\d+)", meta.get("kubeVersion", ""))
    versions = [v for v in args.kube_versions.split(",") if v] or sorted(
        {floor.group(1) if floor else "1.30", kv_utils.major_minor(kv_utils.latest_version())},
        key=lambda v: tuple(map(int, v.split("."))))
    print(f"helm {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__}, "
          f"chart {meta['name']} {meta['version']} (app {meta.get('appVersion')}), Kubernetes {', '.join(versions)}")

    run.check("Chart.yaml has appVersion and kubeVersion", lambda: (
        _require(meta.get("appVersion"), "no appVersion"), _require(floor, "no kubeVersion floor")))
    run.check("every value in values.yaml has a comment", check_values_commented)
    run.check("Chart appVersion is the Cargo package version (the default image tag)",
              lambda: check_app_version(meta.get("appVersion")))

    renders: list[Rendered] = []
    for name, extra in SCENARIOS.items():
        holder: list[Rendered] = []

        def do_render(name: str = name, extra: dict[str, Any] = extra) -> None:
            holder.append(render(chart, name, extra))

        if not run.check(f"[{name}] renders", do_render):
            continue
        r = holder[0]
        renders.append(r)
        lint_values = deep_merge(BASE, {k: v for k, v in extra.items() if k != "__release__"})
        run.check(f"[{name}] helm lint --strict", lambda v=lint_values: lint(v, versions[0]))
        run.check(f"[{name}] {len(r.objects)} manifests valid against Kubernetes {', '.join(versions)} (strict)",
                  lambda r=r: validate_kubernetes(r, versions))
        run.check(f"[{name}] expected objects only", lambda r=r: check_expected_kinds(r))
        run.check(f"[{name}] names and labels fit Kubernetes limits", lambda r=r: check_names(r))
        run.check(f"[{name}] security defaults", lambda r=r: check_security(r))
        run.check(f"[{name}] secrets only by reference", lambda r=r: check_secrets(r))
        run.check(f"[{name}] commands, ports, probes, replicas", lambda r=r: check_workloads(r))
        run.check(f"[{name}] hooks use only objects that exist when they run", lambda r=r: check_hook_order(r))
        run.check(f"[{name}] selectors and port names connect", lambda r=r: check_wiring(r))

    for name, extra in SCENARIOS.items():
        run.check(f"schema accepts the [{name}] values", lambda e=extra: chart.validate_schema(
            deep_merge(BASE, {k: v for k, v in e.items() if k != "__release__"})))
    for name, bad in BAD_VALUES.items():
        run.check(f"schema rejects {name}", lambda b=bad: _expect_rejected(chart, deep_merge(BASE, b)))
    run.check("install refuses schema-invalid values too (not only validate_schema)",
              lambda: _expect_render_error(chart, deep_merge(BASE, {"api": {"replicas": "three"}}), "replicas"))
    for name, (extra, message) in REFUSED_VALUES.items():
        run.check(f"templates refuse {name}",
                  lambda e=extra, m=message: _expect_render_error(chart, deep_merge(BASE, e), m))

    if DOCKERFILE.exists():
        run.check("Dockerfile: locked build, non-root distroless runtime, mailscope entrypoint", check_dockerfile)

    if args.binary:
        workdir = Path(tempfile.mkdtemp(prefix="mailscope-chart-"))
        b = Binary(args.binary.resolve(), workdir)
        run.check(f"binary {args.binary} exists and runs", lambda: (
            _require(b.path.is_file() and os.access(b.path, os.X_OK), f"{b.path} is not an executable file"),
            b.help()))
        if run.check("binary has every subcommand and flag the chart runs", lambda: check_binary_commands(b, renders)):
            run.check("check-config accepts every rendered environment (names real, no secret printed)",
                      lambda: check_config_env(b, renders))
            run.check("check-config rejects a misspelled variable passed through the chart",
                      lambda: check_config_rejects_unknown(b, chart))
            if args.database_url:
                defaults = next(r for r in renders if r.name == "defaults")
                run.check("smoke: migrate, then api and worker answer their probe paths and stop on SIGTERM",
                          lambda: smoke(b, defaults, args.database_url))
            else:
                run.check("smoke run of the probe paths", _skip("no --database-url given"))
    else:
        run.check("binary: subcommands, flags and environment names", _skip(
            "no binary given (bash helm/tests/run.sh path/to/mailscope)"))

    chart.close()
    print()
    for name in run.failed:
        print(f"failed: {name}")
    print(f"helm-chart: {run.passed} passed, {len(run.failed)} failed, {len(run.skipped)} skipped")
    return 1 if run.failed else 0


def _require(condition: Any, message: str) -> None:
    assert condition, message


def _skip(reason: str) -> Callable[[], None]:
    def fn() -> None:
        raise Skip(reason)
    return fn


def _expect_rejected(chart: helm.Chart, values: dict[str, Any]) -> None:
    try:
        chart.validate_schema(values)
    except helm.HelmValuesError:
        return
    raise AssertionError(f"values.schema.json accepted {values}")


def _expect_render_error(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    try:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except (helm.HelmRenderError, helm.HelmValuesError) as e:
        assert message in str(e), f"refused, but the message does not mention {message!r}: {e}"
        return
    raise AssertionError(f"rendered without complaint: {values}")


def check_values_commented() -> None:
    """Every value in values.yaml has a comment on the line above it. Sections (keys holding
    further keys) need none, and the keys inside a default that is documented as a whole (a
    Kubernetes object such as securityContext, marked "# --") are covered by that comment."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_re = re.compile(r"^(\s*)([A-Za-z0-9_]+):(.*)$")
    problems = []

    def commented(i: int) -> bool:
        return i > 0 and lines[i - 1].lstrip().startswith("#")

    def documented_ancestor(i: int) -> bool:
        depth = len(lines[i]) - len(lines[i].lstrip())
        for j in range(i - 1, -1, -1):
            text = lines[j]
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            d = len(text) - len(text.lstrip())
            if d < depth:
                depth = d
                k = j - 1
                while k >= 0 and lines[k].lstrip().startswith("#"):
                    if lines[k].lstrip().startswith("# --"):
                        return True
                    k -= 1
        return False

    for i, line in enumerate(lines):
        m = key_re.match(line)
        if not m or commented(i) or documented_ancestor(i):
            continue
        indent, key, rest = m.groups()
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        is_section = rest.strip() == "" and len(nxt) - len(nxt.lstrip()) > len(indent) \
            and not nxt.lstrip().startswith("- ")
        if not is_section:
            problems.append(f"values.yaml:{i + 1}: {key} has no comment")
    assert not problems, "\n".join(problems)


def check_app_version(app_version: str | None) -> None:
    cargo = (REPO / "Cargo.toml").read_text()
    package = re.search(r'(?ms)^\[package\]\s*$(.*?)(?=^\[)', cargo + "\n[")
    version = re.search(r'(?m)^version\s*=\s*"([^"]+)"', package.group(1)) if package else None
    assert version, "no [package] version in Cargo.toml"
    assert app_version == version.group(1), (
        f"Chart.yaml appVersion {app_version!r} but Cargo.toml version {version.group(1)!r}: bump them together")


def check_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"(?m)^FROM\s+(\S+)", text)
    final = text[text.rfind("\nFROM "):]
    problems = []
    if len(stages) < 2:
        problems.append("not a multi-stage build")
    if not re.search(r"cargo build[^\n]*--release[^\n]*--locked|cargo build[^\n]*--locked[^\n]*--release", text):
        problems.append("no `cargo build --release --locked`")
    user = re.findall(r"(?m)^USER\s+(\S+)", final)
    if not user or user[-1].split(":")[0] in ("root", "0") or not user[-1].split(":")[0].isdigit():
        problems.append(f"final stage USER {user} is not a numeric non-root user (runAsNonRoot needs a number)")
    entry = re.findall(r"(?m)^ENTRYPOINT\s+(\[.*\])", final)
    if not entry or not yaml.safe_load(entry[-1])[0].endswith("mailscope"):
        problems.append(f"ENTRYPOINT {entry} is not the mailscope binary in exec form")
    uid = int(user[-1].split(":")[0]) if user and user[-1].split(":")[0].isdigit() else None
    chart_uid = helm.Chart.load(str(CHART)).values["podSecurityContext"].get("runAsUser")
    if uid is not None and chart_uid is not None and uid != chart_uid:
        problems.append(f"image USER {uid} differs from the chart's runAsUser {chart_uid}")
    ports = re.findall(r"(?m)^EXPOSE\s+(.*)$", final)
    listen = dockerfile_env().get("MAILSCOPE_LISTEN", "")
    if listen and ports and listen.rsplit(":", 1)[1] not in " ".join(ports).split():
        problems.append(f"EXPOSE {ports} does not include the MAILSCOPE_LISTEN port {listen}")
    hadolint = Path(sys.executable).parent / "hadolint"
    if hadolint.exists():
        p = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
        if p.returncode != 0:
            problems.append(f"hadolint:\n{p.stdout}{p.stderr}")
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    sys.exit(main())
