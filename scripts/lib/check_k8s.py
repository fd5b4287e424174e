#!/usr/bin/env python3
"""Checks the Kubernetes manifests in deploy/k8s without a cluster.

Every kustomization (the base and each overlay) is rendered, then every object is validated
against the Kubernetes JSON schemas that the `kubernetes-validate` package ships, strictly
(unknown fields are errors), and the objects are checked against each other and against the
source of the binaries they run: selectors, Services, probes, ConfigMap and Secret references,
the HODEI_* variables each binary reads, images, resources, pod security, the agents' drain
and identity. See docs/DEPLOYMENT.md ("What the checker checks").

Rendering uses a real kustomize when one is installed (`kustomize`, or `kubectl kustomize`
from kubectl 1.21 or newer); the subset of kustomize these manifests use is also implemented
here, so the check runs without one, and when both are present their renders must agree.

Usage: check_k8s.py [--root DIR] [--self-test] [--builtin] [--print RENDER]
Exit status: 0 when every render passes, 1 otherwise, 2 on a usage or setup error.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

try:
    import kubernetes_validate
except ImportError:  # reported in main(), where the usage error is printed
    kubernetes_validate = None

# Kubernetes versions every object must be valid for: the oldest these manifests support
# (the preStop `sleep` action is on by default from 1.30) and the newest schemas shipped by
# the pinned kubernetes-validate.
K8S_VERSIONS = ("1.30", "1.37")

# The only images the manifests may use (built offline, see docs/DEPLOYMENT.md).
ALLOWED_IMAGES = {
    "hodei/api-gateway:dev",
    "hodei/scheduler:dev",
    "hodei/registry:dev",
    "hodei/agent:dev",
    "hodei/admin:dev",
    "hodei/nats:dev",
    "hodei/postgres:dev",
}

# The image each Hodei binary ships in.
IMAGE_OF_BINARY = {
    "hodei-api-gateway": "hodei/api-gateway:dev",
    "hodei-scheduler": "hodei/scheduler:dev",
    "hodei-registry": "hodei/registry:dev",
    "hodei-agent": "hodei/agent:dev",
    "hodei-admin": "hodei/admin:dev",
    "hodei": "hodei/admin:dev",
}

# The port every Hodei process serves /metrics, /healthz and /readyz on is the one in
# HODEI_METRICS_ADDR; liveness asks whether the process answers, readiness whether its
# dependencies do (libs/telemetry/src/http.rs).
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"

# Annotation naming Secrets a workload needs that are made outside kustomize.
EXTERNAL_SECRETS_ANNOTATION = "hodei.dev/external-secrets"

# Every object carries this label.
PART_OF = ("app.kubernetes.io/part-of", "hodei")

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
SCALABLE_KINDS = ("Deployment", "StatefulSet", "ReplicaSet")
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}

Obj = dict[str, Any]


class CheckError(Exception):
    """A setup problem that stops the whole run (not a finding about the manifests)."""


# ---------------------------------------------------------------------------------------
# What the binaries read, from their source
# ---------------------------------------------------------------------------------------


@dataclass
class Setting:
    """One HODEI_* variable a crate reads."""

    name: str
    is_path: bool = False
    default: str | None = None


@dataclass
class Crate:
    """A workspace crate: its folder, its binaries, the crates it depends on."""

    name: str
    folder: Path
    bins: list[str]
    deps: list[str]


@dataclass
class Source:
    """What the workspace's source says: the binaries, the variables each reads, and the
    agent's shutdown timings."""

    root: Path
    crates: dict[str, Crate]
    settings: dict[str, dict[str, Setting]] = field(default_factory=dict)

    @classmethod
    def read(cls, root: Path) -> "Source":
        workspace = tomllib.loads((root / "Cargo.toml").read_text())
        paths = {
            name: root / spec["path"]
            for name, spec in workspace.get("workspace", {}).get("dependencies", {}).items()
            if isinstance(spec, dict) and "path" in spec
        }
        crates: dict[str, Crate] = {}
        for member in workspace.get("workspace", {}).get("members", []):
            folder = root / member
            manifest = tomllib.loads((folder / "Cargo.toml").read_text())
            name = manifest["package"]["name"]
            bins = [b["name"] for b in manifest.get("bin", [])] or [name]
            deps = [d for d in manifest.get("dependencies", {}) if d in paths]
            crates[name] = Crate(name, folder, bins, deps)
        return cls(root, crates)

    def crate_of_binary(self, binary: str) -> Crate | None:
        for crate in self.crates.values():
            if binary in crate.bins and (crate.folder / "src").is_dir():
                return crate
        return None

    def settings_of(self, crate: Crate) -> dict[str, Setting]:
        """The HODEI_* variables `crate` or a workspace library it depends on reads."""
        if crate.name in self.settings:
            return self.settings[crate.name]
        found: dict[str, Setting] = {}
        seen: set[str] = set()
        pending = [crate.name]
        while pending:
            name = pending.pop()
            if name in seen or name not in self.crates:
                continue
            seen.add(name)
            pending.extend(self.crates[name].deps)
            for path in sorted((self.crates[name].folder / "src").rglob("*.rs")):
                for setting in settings_in(path.read_text()):
                    found.setdefault(setting.name, setting)
        self.settings[crate.name] = found
        return found

    def agent_timings(self) -> dict[str, int]:
        """The agent's shutdown after its drain timeout, in ms, read from its source: how many
        kill graces the stop of what is left takes, the report and abort graces, and the
        trace flush."""
        agent = (self.root / "services/agent/src/agent.rs").read_text()
        setup = (self.root / "libs/telemetry/src/setup.rs").read_text()
        timings = {
            "report_grace_ms": duration_const(agent, "REPORT_GRACE"),
            "abort_grace_ms": duration_const(agent, "ABORT_GRACE"),
        }
        graces = re.search(r"kill_grace\s*\*\s*(\d+)\s*\+\s*REPORT_GRACE", agent)
        flushes = re.findall(r"shutdown_with_timeout\(Duration::from_secs\((\d+)\)\)", setup)
        if not graces or not flushes:
            raise CheckError(
                "cannot read the agent's report window or the trace flush timeout from the "
                "source (services/agent/src/agent.rs, libs/telemetry/src/setup.rs): update "
                "agent_timings() in scripts/lib/check_k8s.py"
            )
        timings["kill_graces"] = int(graces.group(1))
        timings["trace_flush_ms"] = max(int(s) for s in flushes) * 1000
        return timings


ARG_RE = re.compile(
    r"#\[arg\((?P<attr>(?:[^()\]]|\([^()]*(?:\([^()]*\))?[^()]*\))*)\)\]"
    r"(?:\s*///[^\n]*|\s*#\[[^\n]*\])*\s*pub\s+\w+\s*:\s*(?P<ty>[^,\n]+),"
)
ENV_ATTR_RE = re.compile(r'\benv\s*=\s*"(HODEI_[A-Z0-9_]+)"')
VAR_RE = re.compile(r'\bvar(?:_os)?\(\s*"(HODEI_[A-Z0-9_]+)"')
DEFAULT_RE = re.compile(
    r'default_value_t\s*=\s*([^,)\]]+(?:\([^)]*\))?)|default_value\s*=\s*"([^"]*)"'
)


def settings_in(text: str) -> Iterator[Setting]:
    """The HODEI_* variables a Rust file reads: clap arguments with `env = "HODEI_..."` (with
    their type and default) and `var("HODEI_...")` calls."""
    for match in ARG_RE.finditer(text):
        env = ENV_ATTR_RE.search(match.group("attr"))
        if not env:
            continue
        default = DEFAULT_RE.search(match.group("attr"))
        value = None
        if default:
            value = default.group(1).strip() if default.group(1) else default.group(2)
        yield Setting(env.group(1), "PathBuf" in match.group("ty"), value)
    for name in ENV_ATTR_RE.findall(text) + VAR_RE.findall(text):
        yield Setting(name)


def duration_const(text: str, name: str) -> int:
    match = re.search(rf"const {name}: Duration = Duration::from_(secs|millis)\((\d[\d_]*)\)", text)
    if not match:
        raise CheckError(f"cannot read {name} from services/agent/src/agent.rs")
    value = int(match.group(2).replace("_", ""))
    return value * 1000 if match.group(1) == "secs" else value


def int_literal(text: str | None) -> int | None:
    """`60_000`, `1024 * 1024` or `"5"` as an int; None for anything else."""
    if text is None:
        return None
    parts = [p.strip().replace("_", "").strip('"') for p in str(text).split("*")]
    if not all(p.isdigit() for p in parts):
        return None
    result = 1
    for part in parts:
        result *= int(part)
    return result


# ---------------------------------------------------------------------------------------
# Rendering: a real kustomize, and the subset of kustomize these manifests use
# ---------------------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "patches",
}
GENERATOR_FIELDS = {"name", "behavior", "literals", "files", "type", "options"}
OPTION_FIELDS = {"labels", "annotations", "disableNameSuffixHash"}

# Strategic-merge keys of the lists these manifests patch.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


@dataclass
class Generated:
    """A ConfigMap or Secret made by a generator, until its name gets its hash."""

    original_name: str
    hashed: bool


class Renderer:
    """Builds a kustomization the way kustomize 5 does, for the fields in
    KUSTOMIZATION_FIELDS; anything else is refused, so the two renders cannot silently
    differ."""

    def __init__(self) -> None:
        self.generated: dict[int, Generated] = {}

    def build(self, folder: Path) -> list[Obj]:
        objects = self._accumulate(folder.resolve())
        return self._finish(objects)

    def _accumulate(self, folder: Path) -> list[Obj]:
        kust_file = next(
            (
                folder / n
                for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")
                if (folder / n).is_file()
            ),
            None,
        )
        if kust_file is None:
            raise CheckError(f"{folder}: no kustomization.yaml")
        kust = yaml.safe_load(kust_file.read_text()) or {}
        unknown = set(kust) - KUSTOMIZATION_FIELDS
        if unknown:
            raise CheckError(
                f"{kust_file}: the built-in renderer does not implement {sorted(unknown)}"
            )
        objects: list[Obj] = []
        for entry in kust.get("resources", []):
            path = (folder / entry).resolve()
            if path.is_dir():
                objects.extend(self._accumulate(path))
            else:
                objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
        options = kust.get("generatorOptions", {}) or {}
        for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
            for spec in kust.get(key, []) or []:
                self._generate(folder, kind, spec, options, objects)
        for patch in kust.get("patches", []) or []:
            objects = self._patch(folder, patch, objects)
        if "namespace" in kust:
            for obj in objects:
                if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                    obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
        return objects

    def _generate(
        self, folder: Path, kind: str, spec: Obj, options: Obj, objects: list[Obj]
    ) -> None:
        unknown = set(spec) - GENERATOR_FIELDS
        if unknown:
            raise CheckError(
                f"{folder}: the built-in renderer does not implement generator fields {sorted(unknown)}"
            )
        opts = {**options, **(spec.get("options") or {})}
        if set(opts) - OPTION_FIELDS:
            raise CheckError(f"{folder}: generator options {sorted(set(opts) - OPTION_FIELDS)}")
        data: dict[str, str] = {}
        for literal in spec.get("literals", []) or []:
            key, _, value = literal.partition("=")
            data[key] = value
        for source in spec.get("files", []) or []:
            key, _, path = source.partition("=")
            if not path:
                key, path = Path(source).name, source
            file = (folder / path).resolve()
            if folder not in file.parents:
                raise CheckError(f"{folder}: {source} is outside the kustomization")
            data[key] = file.read_text()
        if kind == "Secret":
            data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        behavior = spec.get("behavior", "create")
        if behavior in ("merge", "replace"):
            existing = next(
                (
                    o
                    for o in objects
                    if o["kind"] == kind and self._original_name(o) == spec["name"]
                ),
                None,
            )
            if existing is None:
                raise CheckError(
                    f"{folder}: {behavior} of {kind} {spec['name']}: none to {behavior}"
                )
            if behavior == "merge":
                existing.setdefault("data", {}).update(data)
            else:
                existing["data"] = data
            return
        obj: Obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
        if opts.get("labels"):
            obj["metadata"]["labels"] = dict(opts["labels"])
        if opts.get("annotations"):
            obj["metadata"]["annotations"] = dict(opts["annotations"])
        obj["data"] = data
        if kind == "Secret":
            obj["type"] = spec.get("type", "Opaque")
        self.generated[id(obj)] = Generated(spec["name"], not opts.get("disableNameSuffixHash"))
        objects.append(obj)

    def _original_name(self, obj: Obj) -> str:
        gen = self.generated.get(id(obj))
        return gen.original_name if gen else obj["metadata"]["name"]

    def _patch(self, folder: Path, entry: Obj, objects: list[Obj]) -> list[Obj]:
        if set(entry) - {"path", "patch"}:
            raise CheckError(
                f"{folder}: the built-in renderer does not implement patch fields "
                f"{sorted(set(entry) - {'path', 'patch'})}"
            )
        text = (folder / entry["path"]).read_text() if "path" in entry else entry["patch"]
        docs = [d for d in yaml.safe_load_all(text) if d]
        if len(docs) != 1:
            raise CheckError(f"{folder}: a patch must hold exactly one object")
        patch = docs[0]
        group = patch.get("apiVersion", "").rpartition("/")[0]
        targets = [
            o
            for o in objects
            if o["kind"] == patch["kind"]
            and o.get("apiVersion", "").rpartition("/")[0] == group
            and self._original_name(o) == patch["metadata"]["name"]
        ]
        if len(targets) != 1:
            raise CheckError(
                f"{folder}: patch of {patch['kind']} {patch['metadata']['name']} matches "
                f"{len(targets)} objects"
            )
        target = targets[0]
        if patch.get("$patch") == "delete":
            return [o for o in objects if o is not target]
        merged = strategic_merge(target, patch)
        if id(target) in self.generated:
            self.generated[id(merged)] = self.generated[id(target)]
        return [merged if o is target else o for o in objects]

    def _finish(self, objects: list[Obj]) -> list[Obj]:
        renames: dict[tuple[str, str | None, str], str] = {}
        for obj in objects:
            gen = self.generated.get(id(obj))
            if gen and gen.hashed:
                name = f"{gen.original_name}-{kustomize_hash(obj)}"
                renames[(obj["kind"], obj["metadata"].get("namespace"), gen.original_name)] = name
                obj["metadata"]["name"] = name
        for obj in objects:
            namespace = obj.get("metadata", {}).get("namespace")
            for pod in pod_specs(obj):
                for ref_kind, holder, key in config_refs(pod):
                    new = renames.get((ref_kind, namespace, holder.get(key)))
                    if new:
                        holder[key] = new
        return objects


def strategic_merge(base: Any, patch: Any) -> Any:
    """`patch` merged into a copy of `base` as a strategic-merge patch, for maps and the
    lists in MERGE_KEYS."""
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(base)
    for key, value in patch.items():
        if key == "$patch":
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = strategic_merge(result[key], value)
        elif isinstance(value, list) and isinstance(result.get(key), list) and MERGE_KEYS.get(key):
            merge_key = MERGE_KEYS[key]
            items = copy.deepcopy(result[key])
            for item in value:
                index = next(
                    (i for i, old in enumerate(items) if old.get(merge_key) == item.get(merge_key)),
                    None,
                )
                if item.get("$patch") == "delete":
                    if index is not None:
                        items.pop(index)
                elif index is None:
                    items.append(copy.deepcopy(item))
                else:
                    items[index] = strategic_merge(items[index], item)
            result[key] = items
        else:
            result[key] = copy.deepcopy(value)
    return result


def go_json(value: Any) -> str:
    """`value` as Go's json.Marshal writes it (sorted keys, no spaces, <>& escaped)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def kustomize_hash(obj: Obj) -> str:
    """The name suffix kustomize 5 gives a generated ConfigMap or Secret (api/hasher: the
    name field it hashes reads as empty)."""
    encoded: Obj = {"kind": obj["kind"], "name": "", "data": obj.get("data", {})}
    if obj["kind"] == "Secret":
        encoded["type"] = obj.get("type", "")
    digest = hashlib.sha256(go_json(encoded).encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def find_kustomize() -> tuple[list[str], str] | None:
    """A real kustomize (v4 or newer), as a command line to which the folder is appended."""
    if shutil.which("kustomize"):
        out = subprocess.run(["kustomize", "version"], capture_output=True, text=True)
        version = out.stdout.strip()
        if re.search(r"v?[4-9]\.", version):
            return ["kustomize", "build"], f"kustomize {version}"
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True
        )
        try:
            version = json.loads(out.stdout).get("kustomizeVersion", "")
        except json.JSONDecodeError:
            version = ""
        if re.match(r"v?[4-9]\.", version):
            return ["kubectl", "kustomize"], f"kubectl kustomize {version}"
    return None


# ---------------------------------------------------------------------------------------
# Object helpers
# ---------------------------------------------------------------------------------------


def pod_specs(obj: Obj) -> list[Obj]:
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        return [spec]
    if obj.get("kind") == "CronJob":
        return [spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})]
    template = spec.get("template", {})
    return [template["spec"]] if isinstance(template, dict) and "spec" in template else []


def containers_of(pod: Obj, init: bool = True) -> list[Obj]:
    return list(pod.get("containers", [])) + (list(pod.get("initContainers", [])) if init else [])


def config_refs(pod: Obj) -> Iterator[tuple[str, Obj, str]]:
    """Every reference to a ConfigMap or Secret in a pod spec, as (kind, holder, key)."""
    for c in containers_of(pod):
        for e in c.get("envFrom", []):
            if "configMapRef" in e:
                yield "ConfigMap", e["configMapRef"], "name"
            if "secretRef" in e:
                yield "Secret", e["secretRef"], "name"
        for e in c.get("env", []):
            source = e.get("valueFrom", {})
            if "configMapKeyRef" in source:
                yield "ConfigMap", source["configMapKeyRef"], "name"
            if "secretKeyRef" in source:
                yield "Secret", source["secretKeyRef"], "name"
    for v in pod.get("volumes", []):
        if "configMap" in v:
            yield "ConfigMap", v["configMap"], "name"
        if "secret" in v:
            yield "Secret", v["secret"], "secretName"
        for s in v.get("projected", {}).get("sources", []):
            if "configMap" in s:
                yield "ConfigMap", s["configMap"], "name"
            if "secret" in s:
                yield "Secret", s["secret"], "name"


def selector_matches(selector: Obj | None, labels: Obj) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects `labels`."""
    if not selector:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def plain_selector_matches(selector: Obj | None, labels: Obj) -> bool:
    """A Service's selector (a plain map): an empty one selects nothing here."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def name_of(obj: Obj) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


@dataclass
class Render:
    """One rendered kustomization: its objects, and whether it is a whole deployment (an
    overlay) or a part (the base, whose Secrets an overlay adds)."""

    label: str
    objects: list[Obj]
    complete: bool
    renderer: str = ""

    def of_kind(self, kind: str) -> list[Obj]:
        return [obj for obj in self.objects if obj.get("kind") == kind]

    def find(self, kind: str, name: str, namespace: str | None) -> Obj | None:
        for obj in self.objects:
            meta = obj.get("metadata", {})
            if (
                obj.get("kind") == kind
                and meta.get("name") == name
                and meta.get("namespace") == namespace
            ):
                return obj
        return None

    def workloads(self) -> list[Obj]:
        return [o for o in self.objects if o.get("kind") in WORKLOAD_KINDS + ("Pod", "CronJob")]

    def pods_selected(
        self, selector: Callable[[Obj], bool], namespace: str | None
    ) -> list[tuple[Obj, Obj]]:
        """(workload, pod spec) of every workload in `namespace` whose pod labels match."""
        found = []
        for w in self.workloads():
            if w.get("metadata", {}).get("namespace") != namespace:
                continue
            labels = pod_labels(w)
            if selector(labels):
                found.extend((w, pod) for pod in pod_specs(w))
        return found


def pod_labels(workload: Obj) -> Obj:
    if workload.get("kind") == "Pod":
        return workload.get("metadata", {}).get("labels", {}) or {}
    spec = workload.get("spec", {})
    if workload.get("kind") == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    return spec.get("template", {}).get("metadata", {}).get("labels", {}) or {}


def container_ports(container: Obj) -> list[Obj]:
    return container.get("ports", []) or []


def port_in(port: Any, containers: list[Obj]) -> bool:
    """Whether `port` (a name or a number) is a port of one of `containers`."""
    for c in containers:
        for p in container_ports(c):
            if port == p.get("name") or port == p.get("containerPort"):
                return True
    return False


# ---------------------------------------------------------------------------------------
# Environment of a container
# ---------------------------------------------------------------------------------------


@dataclass
class EnvValue:
    """Where one variable of a container comes from, and its value when the render says it."""

    name: str
    source: str  # value, configMap, secret, fieldRef, resourceFieldRef
    value: str | None = None
    field_path: str | None = None
    resource: Obj | None = None


def container_env(render: Render, obj: Obj, container: Obj) -> dict[str, EnvValue]:
    """The variables a container gets, as the kubelet would set them (envFrom first, then
    env, which wins)."""
    namespace = obj.get("metadata", {}).get("namespace")
    env: dict[str, EnvValue] = {}
    for e in container.get("envFrom", []):
        prefix = e.get("prefix", "")
        if "configMapRef" in e:
            cm = render.find("ConfigMap", e["configMapRef"].get("name"), namespace)
            for key, value in ((cm or {}).get("data") or {}).items():
                env[prefix + key] = EnvValue(prefix + key, "configMap", value)
        if "secretRef" in e:
            secret = render.find("Secret", e["secretRef"].get("name"), namespace)
            for key in (secret or {}).get("data") or {}:
                env[prefix + key] = EnvValue(prefix + key, "secret")
    for e in container.get("env", []):
        name = e["name"]
        if "value" in e:
            env[name] = EnvValue(name, "value", expand(e["value"], env))
            continue
        source = e.get("valueFrom", {})
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            cm = render.find("ConfigMap", ref.get("name"), namespace)
            env[name] = EnvValue(
                name, "configMap", ((cm or {}).get("data") or {}).get(ref.get("key"))
            )
        elif "secretKeyRef" in source:
            env[name] = EnvValue(name, "secret")
        elif "fieldRef" in source:
            env[name] = EnvValue(name, "fieldRef", field_path=source["fieldRef"].get("fieldPath"))
        elif "resourceFieldRef" in source:
            env[name] = EnvValue(name, "resourceFieldRef", resource=source["resourceFieldRef"])
        else:
            env[name] = EnvValue(name, "unknown")
    return env


def expand(value: str, env: dict[str, EnvValue]) -> str:
    """`$(NAME)` references expanded where the value is known; kept as written otherwise."""

    def one(match: re.Match[str]) -> str:
        known = env.get(match.group(1))
        return known.value if known and known.value is not None else match.group(0)

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


# ---------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------


@dataclass
class Context:
    source: Source
    agent_timings: dict[str, int]


@dataclass
class Finding:
    check: str
    message: str


CHECKS: list[tuple[str, Callable[[Render, Context], Iterator[str]]]] = []


def check(name: str):
    def register(fn):
        CHECKS.append((name, fn))
        return fn

    return register


def hodei_containers(render: Render, ctx: Context) -> Iterator[tuple[Obj, Obj, Obj, str, Crate]]:
    """(workload, pod spec, container, binary, crate) of every container running a Hodei
    binary (its command's first word)."""
    for w in render.workloads():
        for pod in pod_specs(w):
            for c in containers_of(pod):
                command = c.get("command") or []
                if not command:
                    continue
                binary = os.path.basename(command[0])
                crate = ctx.source.crate_of_binary(binary)
                if crate:
                    yield w, pod, c, binary, crate


@check("schema")
def check_schema(render: Render, ctx: Context) -> Iterator[str]:
    for obj in render.objects:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(top)"
                yield f"{name_of(obj)}: invalid for Kubernetes {version} at {path}: {e.message}"
                break
            except kubernetes_validate.SchemaNotFoundError:
                yield f"{name_of(obj)}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {version}"
                break
            except Exception as e:  # a schema the validator cannot resolve, a malformed object
                yield f"{name_of(obj)}: not validated for Kubernetes {version}: {type(e).__name__}: {e}"
                break


@check("labels")
def check_labels(render: Render, ctx: Context) -> Iterator[str]:
    key, value = PART_OF
    for obj in render.objects:
        if (obj.get("metadata", {}).get("labels") or {}).get(key) != value:
            yield f"{name_of(obj)}: no label {key}={value}"
    for w in render.workloads():
        labels = pod_labels(w)
        for required in ("app.kubernetes.io/name", "app.kubernetes.io/component", key):
            if required not in labels:
                yield f"{name_of(w)}: pod template has no label {required}"


@check("selector")
def check_selector(render: Render, ctx: Context) -> Iterator[str]:
    for w in render.workloads():
        if w.get("kind") in ("Pod", "CronJob"):
            continue
        selector = w.get("spec", {}).get("selector")
        if not selector_matches(selector, pod_labels(w)):
            yield f"{name_of(w)}: selector {selector} does not match its pod template's labels {pod_labels(w)}"
        for pod in pod_specs(w):
            for tsc in pod.get("topologySpreadConstraints", []):
                if not selector_matches(tsc.get("labelSelector"), pod_labels(w)):
                    yield f"{name_of(w)}: topology spread selector does not match its own pods"
    for obj in render.objects:
        if obj.get("kind") == "StatefulSet":
            svc = render.find(
                "Service", obj["spec"].get("serviceName"), obj["metadata"].get("namespace")
            )
            if svc is None:
                yield f"{name_of(obj)}: serviceName {obj['spec'].get('serviceName')} is not a Service here"
            elif svc["spec"].get("clusterIP") != "None":
                yield f"{name_of(obj)}: its serviceName {svc['metadata']['name']} is not headless"


@check("service")
def check_service(render: Render, ctx: Context) -> Iterator[str]:
    for svc in render.objects:
        if svc.get("kind") != "Service" or svc.get("spec", {}).get("type") == "ExternalName":
            continue
        selector = svc["spec"].get("selector")
        namespace = svc["metadata"].get("namespace")
        pods = render.pods_selected(
            lambda labels: plain_selector_matches(selector, labels), namespace
        )
        if not pods:
            yield f"{name_of(svc)}: selector {selector} matches no pods"
            continue
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port.get("port"))
            for w, pod in pods:
                if not port_in(target, containers_of(pod, init=False)):
                    yield f"{name_of(svc)}: port {port.get('name')} targets {target}, not a container port of {name_of(w)}"


@check("hpa")
def check_hpa(render: Render, ctx: Context) -> Iterator[str]:
    for hpa in render.of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = render.find(ref["kind"], ref["name"], hpa["metadata"].get("namespace"))
        if target is None or target.get("apiVersion") != ref.get("apiVersion"):
            yield f"{name_of(hpa)}: target {ref.get('apiVersion')} {ref['kind']}/{ref['name']} is not in the render"
            continue
        if ref["kind"] not in SCALABLE_KINDS:
            yield f"{name_of(hpa)}: {ref['kind']} cannot be scaled"
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            yield f"{name_of(hpa)}: minReplicas above maxReplicas"
        if "replicas" in target.get("spec", {}):
            yield f"{name_of(target)}: sets replicas, which every apply would reset under {name_of(hpa)}"
        for metric in hpa["spec"].get("metrics", []):
            resource = metric.get("resource", {})
            if (
                metric.get("type") == "Resource"
                and resource.get("target", {}).get("type") == "Utilization"
            ):
                for pod in pod_specs(target):
                    for c in containers_of(pod, init=False):
                        if resource["name"] not in (c.get("resources", {}).get("requests") or {}):
                            yield f"{name_of(hpa)}: {resource['name']} utilisation needs a {resource['name']} request on container {c['name']}"


@check("pdb")
def check_pdb(render: Render, ctx: Context) -> Iterator[str]:
    for pdb in render.of_kind("PodDisruptionBudget"):
        selector = pdb["spec"].get("selector")
        pods = render.pods_selected(
            lambda labels: selector_matches(selector, labels), pdb["metadata"].get("namespace")
        )
        if not pods:
            yield f"{name_of(pdb)}: selector matches no pods"
        for w, _ in pods:
            if w.get("kind") not in SCALABLE_KINDS and not isinstance(
                pdb["spec"].get("minAvailable"), int
            ):
                yield f"{name_of(pdb)}: selects {name_of(w)}, which has no scale: only an integer minAvailable works"


@check("probes")
def check_probes(render: Render, ctx: Context) -> Iterator[str]:
    for w in render.workloads():
        for pod in pod_specs(w):
            for c in containers_of(pod, init=False):
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    probe = c.get(kind)
                    if not probe:
                        continue
                    for handler in ("httpGet", "tcpSocket", "grpc"):
                        if handler in probe and not port_in(probe[handler].get("port"), [c]):
                            yield f"{name_of(w)}: {c['name']} {kind} port {probe[handler].get('port')} is not one of its ports"
    for w, pod, c, binary, crate in hodei_containers(render, ctx):
        if c in pod.get("initContainers", []):
            continue
        env = container_env(render, w, c)
        addr = env.get("HODEI_METRICS_ADDR")
        port = None
        if addr and addr.value:
            port = int_literal(addr.value.rpartition(":")[2])
        if port is None:
            yield f"{name_of(w)}: {c['name']} has no HODEI_METRICS_ADDR with a port: no /healthz or /readyz to probe"
            continue
        named = {p.get("name"): p.get("containerPort") for p in container_ports(c)}
        if port not in named.values():
            yield f"{name_of(w)}: {c['name']} serves metrics on {port}, not one of its container ports"
        for kind, path in (
            ("startupProbe", LIVENESS_PATH),
            ("livenessProbe", LIVENESS_PATH),
            ("readinessProbe", READINESS_PATH),
        ):
            probe = c.get(kind)
            if not probe:
                yield f"{name_of(w)}: {c['name']} has no {kind}"
                continue
            http = probe.get("httpGet")
            if not http:
                yield f"{name_of(w)}: {c['name']} {kind} is not an HTTP GET of {path}"
                continue
            if http.get("path") != path:
                yield f"{name_of(w)}: {c['name']} {kind} asks {http.get('path')}, should ask {path}"
            probe_port = named.get(http.get("port"), http.get("port"))
            if probe_port != port:
                yield f"{name_of(w)}: {c['name']} {kind} is on port {http.get('port')}, not the metrics port {port}"


def external_secrets(obj: Obj) -> set[str]:
    text = (obj.get("metadata", {}).get("annotations") or {}).get(EXTERNAL_SECRETS_ANNOTATION, "")
    return {s.strip() for s in text.split(",") if s.strip()}


@check("refs")
def check_refs(render: Render, ctx: Context) -> Iterator[str]:
    """Every ConfigMap and Secret a pod names exists, with the keys it names."""
    for w in render.workloads():
        namespace = w.get("metadata", {}).get("namespace")
        external = external_secrets(w)
        for pod in pod_specs(w):
            wanted: list[tuple[str, str, list[str], bool]] = []
            for c in containers_of(pod):
                for e in c.get("envFrom", []):
                    for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                        if key in e:
                            wanted.append(
                                (kind, e[key].get("name"), [], e[key].get("optional", False))
                            )
                for e in c.get("env", []):
                    source = e.get("valueFrom", {})
                    for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                        if key in source:
                            ref = source[key]
                            wanted.append(
                                (
                                    kind,
                                    ref.get("name"),
                                    [ref.get("key")],
                                    ref.get("optional", False),
                                )
                            )
            for v in pod.get("volumes", []):
                sources = [("ConfigMap", v["configMap"], "name")] if "configMap" in v else []
                sources += [("Secret", v["secret"], "secretName")] if "secret" in v else []
                for s in v.get("projected", {}).get("sources", []):
                    sources += [("ConfigMap", s["configMap"], "name")] if "configMap" in s else []
                    sources += [("Secret", s["secret"], "name")] if "secret" in s else []
                for kind, ref, name_key in sources:
                    keys = [item["key"] for item in ref.get("items", [])]
                    wanted.append((kind, ref.get(name_key), keys, ref.get("optional", False)))
            for kind, name, keys, optional in wanted:
                if kind == "Secret" and name in external:
                    continue
                found = render.find(kind, name, namespace)
                if found is None:
                    if optional or (kind == "Secret" and not render.complete):
                        continue
                    yield f"{name_of(w)}: {kind} {name} is not in the render"
                    continue
                data = (
                    set((found.get("data") or {}))
                    | set((found.get("stringData") or {}))
                    | set((found.get("binaryData") or {}))
                )
                for key in keys:
                    if key not in data:
                        yield f"{name_of(w)}: {kind} {name} has no key {key}"


@check("env")
def check_env(render: Render, ctx: Context) -> Iterator[str]:
    """Every HODEI_* variable a Hodei container gets is one its binary reads."""
    for w, pod, c, binary, crate in hodei_containers(render, ctx):
        known = ctx.source.settings_of(crate)
        env = container_env(render, w, c)
        for name in env:
            if name.startswith("HODEI_") and name not in known:
                yield f"{name_of(w)}: {c['name']} sets {name}, which {binary} ({crate.folder.relative_to(ctx.source.root)}) does not read"
        # $(NAME) may name a variable of envFrom or one set earlier in env.
        defined = set(container_env(render, w, {"envFrom": c.get("envFrom", [])}))
        for e in c.get("env", []):
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
                if ref not in defined:
                    yield f"{name_of(w)}: {c['name']} {e['name']} refers to $({ref}), not defined before it"
            defined.add(e["name"])
        if pod.get("enableServiceLinks", True):
            yield f"{name_of(w)}: enableServiceLinks is not false: Services named hodei-* would set HODEI_* variables in {c['name']}"


@check("files")
def check_files(render: Render, ctx: Context) -> Iterator[str]:
    """Every path setting of a Hodei container names a file its volumes hold (a folder
    setting, a writable mount)."""
    for w, pod, c, binary, crate in hodei_containers(render, ctx):
        settings = ctx.source.settings_of(crate)
        env = container_env(render, w, c)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for name, value in env.items():
            setting = settings.get(name)
            if not setting or not setting.is_path or value.value is None:
                continue
            paths = [value.value]
            if "$(HODEI_WORKER_ID)" in value.value:
                paths = [
                    value.value.replace("$(HODEI_WORKER_ID)", wid)
                    for wid in worker_ids(render, w, env)
                ]
            for path in paths:
                problem = path_problem(render, w, c, volumes, path, is_dir=name.endswith("_DIR"))
                if problem:
                    yield f"{name_of(w)}: {c['name']} {name}={path}: {problem}"


def worker_ids(render: Render, w: Obj, env: dict[str, EnvValue]) -> list[str]:
    """The worker ids an agent workload's pods take, where the render says them."""
    wid = env.get("HODEI_WORKER_ID")
    if wid is None or wid.source != "fieldRef" or wid.field_path != "metadata.name":
        return []
    if w.get("kind") != "StatefulSet":
        return []
    return [f"{w['metadata']['name']}-{i}" for i in range(max_replicas(render, w))]


def max_replicas(render: Render, w: Obj) -> int:
    """The most pods a workload runs: its HPA's maxReplicas, else its replicas (default 1)."""
    for hpa in render.of_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] == w["kind"] and ref["name"] == w["metadata"]["name"]:
            return int(hpa["spec"]["maxReplicas"])
    return int(w.get("spec", {}).get("replicas", 1))


def path_problem(
    render: Render, w: Obj, c: Obj, volumes: dict[str, Obj], path: str, is_dir: bool
) -> str | None:
    mounts = sorted(c.get("volumeMounts", []), key=lambda m: len(m["mountPath"]), reverse=True)
    mount = next(
        (
            m
            for m in mounts
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
        ),
        None,
    )
    if mount is None:
        return "not under any of its volume mounts"
    volume = volumes.get(mount["name"])
    if volume is None:
        return f"mount {mount['name']} has no volume"
    if is_dir:
        if mount.get("readOnly"):
            return f"under read-only mount {mount['mountPath']}"
        return None
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    namespace = w.get("metadata", {}).get("namespace")
    sources = []
    if "secret" in volume:
        sources.append(
            ("Secret", volume["secret"].get("secretName"), volume["secret"].get("items"))
        )
    if "configMap" in volume:
        sources.append(
            ("ConfigMap", volume["configMap"].get("name"), volume["configMap"].get("items"))
        )
    for s in volume.get("projected", {}).get("sources", []):
        for kind, key in (("Secret", "secret"), ("ConfigMap", "configMap")):
            if key in s:
                sources.append((kind, s[key].get("name"), s[key].get("items")))
    if not sources:
        return None  # an emptyDir or a claim: whatever the process writes there
    for kind, name, items in sources:
        if kind == "Secret" and name in external_secrets(w):
            return None
        obj = render.find(kind, name, namespace)
        if items is not None:
            if any(item.get("path") == relative for item in items):
                return None
        elif obj is None and kind == "Secret" and not render.complete:
            return None
        elif obj is not None and relative in (obj.get("data") or {}):
            return None
    return f"no such file in volume {mount['name']}"


@check("image")
def check_image(render: Render, ctx: Context) -> Iterator[str]:
    for w in render.workloads():
        for pod in pod_specs(w):
            for c in containers_of(pod):
                if c.get("image") not in ALLOWED_IMAGES:
                    yield f"{name_of(w)}: {c['name']} uses image {c.get('image')}, not one of {sorted(ALLOWED_IMAGES)}"
    for w, pod, c, binary, crate in hodei_containers(render, ctx):
        if IMAGE_OF_BINARY.get(binary) != c.get("image"):
            yield f"{name_of(w)}: {c['name']} runs {binary} from {c.get('image')}, which ships {IMAGE_OF_BINARY.get(binary)}"


QUANTITY_RE = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
QUANTITY_UNITS = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}


def quantity(text: Any) -> float | None:
    match = QUANTITY_RE.match(str(text))
    if not match or match.group(2) not in QUANTITY_UNITS:
        return None
    return float(match.group(1)) * QUANTITY_UNITS[match.group(2)]


@check("resources")
def check_resources(render: Render, ctx: Context) -> Iterator[str]:
    for w in render.workloads():
        for pod in pod_specs(w):
            for c in containers_of(pod):
                resources = c.get("resources") or {}
                for kind in ("requests", "limits"):
                    for resource in ("cpu", "memory"):
                        if resource not in (resources.get(kind) or {}):
                            yield f"{name_of(w)}: {c['name']} has no {resource} {kind[:-1]}"
                for resource, request in (resources.get("requests") or {}).items():
                    limit = (resources.get("limits") or {}).get(resource)
                    if limit is not None and (quantity(request) or 0) > (quantity(limit) or 0):
                        yield f"{name_of(w)}: {c['name']} requests more {resource} than its limit"


@check("security")
def check_security(render: Render, ctx: Context) -> Iterator[str]:
    """The `restricted` Pod Security Standard, a read-only root, and no API token."""
    for w in render.workloads():
        for pod in pod_specs(w):
            psc = pod.get("securityContext") or {}
            for host in ("hostNetwork", "hostPID", "hostIPC"):
                if pod.get(host):
                    yield f"{name_of(w)}: {host}"
            if any("hostPath" in v for v in pod.get("volumes", [])):
                yield f"{name_of(w)}: hostPath volume"
            if pod.get("automountServiceAccountToken") is not False:
                yield f"{name_of(w)}: mounts a service account token (none of these pods uses the API)"
            for c in containers_of(pod):
                sc = c.get("securityContext") or {}
                if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
                    yield f"{name_of(w)}: {c['name']} may run as root (runAsNonRoot)"
                if sc.get("runAsUser", psc.get("runAsUser")) == 0:
                    yield f"{name_of(w)}: {c['name']} runs as uid 0"
                if sc.get("privileged"):
                    yield f"{name_of(w)}: {c['name']} is privileged"
                if sc.get("allowPrivilegeEscalation") is not False:
                    yield f"{name_of(w)}: {c['name']} allows privilege escalation"
                if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                    yield f"{name_of(w)}: {c['name']} does not drop ALL capabilities"
                added = set((sc.get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}
                if added:
                    yield f"{name_of(w)}: {c['name']} adds capabilities {sorted(added)}"
                seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
                if seccomp not in ("RuntimeDefault", "Localhost"):
                    yield f"{name_of(w)}: {c['name']} has no RuntimeDefault seccomp profile"
                if sc.get("readOnlyRootFilesystem") is not True:
                    yield f"{name_of(w)}: {c['name']} has a writable root file system"


def agent_workloads(
    render: Render, ctx: Context
) -> Iterator[tuple[Obj, Obj, Obj, dict[str, EnvValue]]]:
    for w, pod, c, binary, crate in hodei_containers(render, ctx):
        if binary == "hodei-agent":
            yield w, pod, c, container_env(render, w, c)


def setting_ms(env: dict[str, EnvValue], settings: dict[str, Setting], name: str) -> int | None:
    """A numeric setting as the container gets it, else the binary's default."""
    value = env.get(name)
    if value is not None:
        return int_literal(value.value)
    setting = settings.get(name)
    return int_literal(setting.default) if setting else None


@check("agent-drain")
def check_agent_drain(render: Render, ctx: Context) -> Iterator[str]:
    """The kubelet's SIGKILL comes only after the agent's worst-case shutdown."""
    settings = ctx.source.settings_of(ctx.source.crates["hodei-agent"])
    t = ctx.agent_timings
    for w, pod, c, env in agent_workloads(render, ctx):
        drain = setting_ms(env, settings, "HODEI_DRAIN_TIMEOUT_MS")
        kill = setting_ms(env, settings, "HODEI_KILL_GRACE_MS")
        if drain is None or kill is None:
            yield f"{name_of(w)}: cannot tell HODEI_DRAIN_TIMEOUT_MS or HODEI_KILL_GRACE_MS"
            continue
        worst = (
            drain
            + t["kill_graces"] * kill
            + t["report_grace_ms"]
            + t["abort_grace_ms"]
            + t["trace_flush_ms"]
        )
        grace = pod.get("terminationGracePeriodSeconds", 30) * 1000
        if grace <= worst:
            yield (
                f"{name_of(w)}: terminationGracePeriodSeconds {grace // 1000} is not above the agent's worst-case "
                f"shutdown of {worst / 1000:g} s (drain {drain} ms + {t['kill_graces']} x kill grace {kill} ms "
                f"+ report {t['report_grace_ms']} ms + abort {t['abort_grace_ms']} ms + trace flush {t['trace_flush_ms']} ms)"
            )


@check("agent-identity")
def check_agent_identity(render: Render, ctx: Context) -> Iterator[str]:
    """Each agent pod has a worker id of its own that NATS has a key for, and reaps orphans."""
    for w, pod, c, env in agent_workloads(render, ctx):
        wid = env.get("HODEI_WORKER_ID")
        if (
            wid is None
            or wid.source != "fieldRef"
            or wid.field_path not in ("metadata.name", "spec.nodeName")
        ):
            yield f"{name_of(w)}: HODEI_WORKER_ID is not the pod's or the node's name (replicas would share one worker id, or take the pod's host name)"
        elif wid.field_path == "metadata.name" and w["kind"] != "StatefulSet":
            yield f"{name_of(w)}: worker ids from the names of a {w['kind']}'s pods are random: NATS cannot have their keys"
        elif wid.field_path == "spec.nodeName":
            if w["kind"] != "DaemonSet":
                yield f"{name_of(w)}: worker id from the node name needs one pod per node (a DaemonSet)"
            elif (w["spec"].get("updateStrategy", {}).get("rollingUpdate") or {}).get(
                "maxSurge", 0
            ) not in (0, "0", "0%"):
                yield f"{name_of(w)}: maxSurge would run two agents with one worker id on a node"
        nkey = env.get("HODEI_NATS_NKEY_FILE")
        if nkey is None or nkey.value is None or "$(HODEI_WORKER_ID)" not in nkey.value:
            yield f"{name_of(w)}: HODEI_NATS_NKEY_FILE does not pick the key of the pod's own worker id"
        if not pod.get("shareProcessNamespace"):
            yield f"{name_of(w)}: shareProcessNamespace is off: the agent (PID 1) would not reap the processes jobs orphan"
        for name in ("HODEI_AGENT_CPU_MILLIS", "HODEI_AGENT_MEMORY_MB"):
            value = env.get(name)
            if value is None:
                yield f"{name_of(w)}: {name} unset: the agent would offer the node's whole capacity"
            elif (
                value.source == "resourceFieldRef"
                and value.resource.get("containerName", c["name"]) != c["name"]
            ):
                yield f"{name_of(w)}: {name} reads another container's resources"


@check("consistency")
def check_consistency(render: Render, ctx: Context) -> Iterator[str]:
    """The registry counts missed beats at the agents' heartbeat interval."""
    registry = ctx.source.crates.get("hodei-registry")
    agent = ctx.source.crates.get("hodei-agent")
    if registry is None or agent is None:
        return
    values: dict[str, set[int | None]] = {}
    for w, pod, c, binary, crate in hodei_containers(render, ctx):
        if binary in ("hodei-registry", "hodei-agent"):
            env = container_env(render, w, c)
            value = setting_ms(env, ctx.source.settings_of(crate), "HODEI_HEARTBEAT_INTERVAL_MS")
            values.setdefault(binary, set()).add(value)
    if len(values) == 2 and len(values["hodei-registry"] | values["hodei-agent"]) != 1:
        yield f"HODEI_HEARTBEAT_INTERVAL_MS differs: registry {sorted(map(str, values['hodei-registry']))}, agents {sorted(map(str, values['hodei-agent']))}"


@check("pg-connections")
def check_pg_connections(render: Render, ctx: Context) -> Iterator[str]:
    """At their most replicas, the services' pools fit in PostgreSQL's max_connections."""
    limit = None
    for w in render.workloads():
        for pod in pod_specs(w):
            for c in containers_of(pod, init=False):
                for arg in (c.get("command") or []) + (c.get("args") or []):
                    match = re.fullmatch(r"max_connections=(\d+)", str(arg))
                    if match:
                        limit = int(match.group(1))
    if limit is None:
        return
    total, parts = 0, []
    for w, pod, c, binary, crate in hodei_containers(render, ctx):
        env = container_env(render, w, c)
        if "HODEI_DATABASE_URL" not in env:
            continue
        pool = setting_ms(env, ctx.source.settings_of(crate), "HODEI_DATABASE_POOL") or 0
        replicas = max_replicas(render, w)
        total += pool * replicas
        parts.append(f"{w['metadata']['name']} {replicas} x {pool}")
    if total >= limit:
        yield f"PostgreSQL max_connections={limit}, but the services may open {total} ({', '.join(parts)})"


@check("netpol")
def check_netpol(render: Render, ctx: Context) -> Iterator[str]:
    for np in render.of_kind("NetworkPolicy"):
        namespace = np["metadata"].get("namespace")
        pod_selector = np["spec"].get("podSelector")
        targets = render.pods_selected(
            lambda labels: pod_selector == {} or selector_matches(pod_selector, labels), namespace
        )
        if not targets:
            yield f"{name_of(np)}: podSelector matches no pods"
        for rule in np["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if (
                    "podSelector" in peer
                    and peer["podSelector"] != {}
                    and "namespaceSelector" not in peer
                ):
                    if not render.pods_selected(
                        lambda labels: selector_matches(peer["podSelector"], labels), namespace
                    ):
                        yield f"{name_of(np)}: a from.podSelector matches no pods"
            for port in rule.get("ports", []):
                for w, pod in targets:
                    if not port_in(port.get("port"), containers_of(pod, init=False)):
                        yield f"{name_of(np)}: port {port.get('port')} is not a port of {name_of(w)}"


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def run_checks(render: Render, ctx: Context) -> list[Finding]:
    findings = []
    for name, fn in CHECKS:
        try:
            findings.extend(Finding(name, m) for m in fn(render, ctx))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            findings.append(Finding(name, f"could not run on this render: {type(e).__name__}: {e}"))
    return findings


def stand_in_secrets_tree(k8s: Path, workdir: Path) -> Path:
    """A copy of deploy/k8s whose Secret files are stand-ins: the check never reads real
    keys, and works before make-secrets.sh has run."""
    copy_root = workdir / "k8s"
    shutil.copytree(k8s, copy_root, ignore=shutil.ignore_patterns("files"))
    for kust_file in copy_root.rglob("kustomization.yaml"):
        kust = yaml.safe_load(kust_file.read_text()) or {}
        for spec in kust.get("secretGenerator", []) or []:
            for source in spec.get("files", []) or []:
                key, _, path = source.partition("=")
                path = path or source
                target = kust_file.parent / path
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(f"stand-in for {spec['name']}/{key}\n")
    return copy_root


def canonical(objects: list[Obj]) -> dict[tuple[str, str, str], Obj]:
    return {
        (
            o.get("kind"),
            o.get("metadata", {}).get("namespace", ""),
            o.get("metadata", {}).get("name"),
        ): o
        for o in objects
    }


def first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    return f"{path or '(top)'}: {json.dumps(a)[:80]} vs {json.dumps(b)[:80]}"


def render_all(
    tree: Path, kustomize: tuple[list[str], str] | None
) -> tuple[list[Render], list[tuple[Render, Finding]]]:
    """The base and every overlay, rendered; with a real kustomize, its render is the one
    checked and the built-in one must agree with it."""
    folders = [("base", tree / "base", False)] + [
        (f"overlays/{d.name}", d, True)
        for d in sorted((tree / "overlays").iterdir())
        if (d / "kustomization.yaml").is_file()
    ]
    renders, problems = [], []
    for label, folder, complete in folders:
        ours = Renderer().build(folder)
        if kustomize is None:
            renders.append(Render(label, ours, complete, "built-in renderer"))
            continue
        out = subprocess.run(kustomize[0] + [str(folder)], capture_output=True, text=True)
        if out.returncode != 0:
            raise CheckError(f"{kustomize[1]} failed on {label}: {out.stderr.strip()}")
        theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
        render = Render(label, theirs, complete, kustomize[1])
        a, b = canonical(theirs), canonical(ours)
        for key in sorted(set(a) | set(b), key=str):
            if key not in b:
                problems.append(
                    (render, Finding("render", f"{key[0]}/{key[2]} rendered by kustomize only"))
                )
            elif key not in a:
                problems.append(
                    (
                        render,
                        Finding(
                            "render", f"{key[0]}/{key[2]} rendered by the built-in renderer only"
                        ),
                    )
                )
            elif a[key] != b[key]:
                problems.append(
                    (
                        render,
                        Finding(
                            "render",
                            f"{key[0]}/{key[2]}: kustomize and the built-in renderer differ at {first_difference(a[key], b[key])}",
                        ),
                    )
                )
        renders.append(render)
    return renders, problems


# Mutations of the trial's render and the check each must trip: proof that each check
# catches what it is for.
def _container(render: Render, kind: str, name: str) -> Obj:
    return pod_specs(_obj(render, kind, name))[0]["containers"][0]


def _obj(render: Render, kind: str, name: str) -> Obj:
    """The object of `kind` named `name`, or `name` with a generator's hash suffix."""
    return next(
        o
        for o in render.objects
        if o["kind"] == kind
        and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", o["metadata"]["name"])
    )


def _replace_arg(container: Obj, old: str, new: str) -> None:
    container["command"] = [new if a == old else a for a in container["command"]]


SELF_TESTS: list[tuple[str, str, Callable[[Render], None]]] = [
    (
        "schema",
        "an unknown field",
        lambda r: _container(r, "Deployment", "hodei-scheduler").update(bogus=1),
    ),
    (
        "schema",
        "a field of the wrong type",
        lambda r: _obj(r, "HorizontalPodAutoscaler", "hodei-scheduler")["spec"].update(
            maxReplicas="six"
        ),
    ),
    (
        "selector",
        "a selector that misses its pods",
        lambda r: _obj(r, "Deployment", "hodei-registry")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "nope"}
        ),
    ),
    (
        "service",
        "a Service port aimed at no container port",
        lambda r: _obj(r, "Service", "hodei-api-gateway")["spec"]["ports"][0].update(
            targetPort="nope"
        ),
    ),
    (
        "service",
        "a Service selecting nothing",
        lambda r: _obj(r, "Service", "hodei-nats")["spec"].update(selector={"app": "nope"}),
    ),
    (
        "hpa",
        "an HPA aimed at a missing Deployment",
        lambda r: _obj(r, "HorizontalPodAutoscaler", "hodei-scheduler")["spec"][
            "scaleTargetRef"
        ].update(name="nope"),
    ),
    (
        "hpa",
        "replicas set under an HPA",
        lambda r: _obj(r, "StatefulSet", "hodei-agent")["spec"].update(replicas=3),
    ),
    (
        "pdb",
        "a PDB selecting nothing",
        lambda r: _obj(r, "PodDisruptionBudget", "hodei-registry")["spec"]["selector"][
            "matchLabels"
        ].update(x="y"),
    ),
    (
        "probes",
        "liveness asking /readyz",
        lambda r: _container(r, "Deployment", "hodei-api-gateway")["livenessProbe"][
            "httpGet"
        ].update(path="/readyz"),
    ),
    (
        "probes",
        "readiness on the gRPC port",
        lambda r: _container(r, "Deployment", "hodei-api-gateway")["readinessProbe"][
            "httpGet"
        ].update(port="grpc"),
    ),
    (
        "probes",
        "a probe on a port the container lacks",
        lambda r: _container(r, "StatefulSet", "hodei-nats")["livenessProbe"]["httpGet"].update(
            port=9999
        ),
    ),
    (
        "refs",
        "a secretKeyRef to a missing key",
        lambda r: _container(r, "Deployment", "hodei-scheduler")["env"][0]["valueFrom"][
            "secretKeyRef"
        ].update(key="nope"),
    ),
    (
        "refs",
        "a volume of a missing Secret",
        lambda r: pod_specs(_obj(r, "Deployment", "hodei-registry"))[0]["volumes"][0][
            "secret"
        ].update(secretName="nope"),
    ),
    (
        "env",
        "a HODEI_* name the binary does not read",
        lambda r: _container(r, "Deployment", "hodei-scheduler")["env"].append(
            {"name": "HODEI_GRPC_ADDR", "value": "0.0.0.0:1"}
        ),
    ),
    (
        "env",
        "service links left on",
        lambda r: pod_specs(_obj(r, "Deployment", "hodei-registry"))[0].pop("enableServiceLinks"),
    ),
    (
        "files",
        "a key file outside every mount",
        lambda r: _obj(r, "ConfigMap", "hodei-scheduler")["data"].update(
            HODEI_SECRETS_KEY_FILE="/etc/nowhere/secrets.xk"
        ),
    ),
    (
        "files",
        "a key file the Secret's items lack",
        lambda r: pod_specs(_obj(r, "Deployment", "hodei-registry"))[0]["volumes"][1]["secret"][
            "items"
        ][0].update(path="other.nk"),
    ),
    (
        "image",
        "an image from elsewhere",
        lambda r: _container(r, "StatefulSet", "hodei-postgres").update(image="postgres:16"),
    ),
    (
        "image",
        "a binary in another service's image",
        lambda r: _container(r, "Deployment", "hodei-scheduler").update(image="hodei/registry:dev"),
    ),
    (
        "resources",
        "a container without limits",
        lambda r: _container(r, "Deployment", "hodei-registry")["resources"].pop("limits"),
    ),
    (
        "security",
        "privilege escalation allowed",
        lambda r: _container(r, "StatefulSet", "hodei-agent")["securityContext"].update(
            allowPrivilegeEscalation=True
        ),
    ),
    (
        "agent-drain",
        "a termination grace shorter than the drain",
        lambda r: pod_specs(_obj(r, "StatefulSet", "hodei-agent"))[0].update(
            terminationGracePeriodSeconds=60
        ),
    ),
    (
        "agent-drain",
        "a drain timeout longer than the grace",
        lambda r: _obj(r, "ConfigMap", "hodei-agent")["data"].update(
            HODEI_DRAIN_TIMEOUT_MS="110000"
        ),
    ),
    (
        "agent-identity",
        "agents as a Deployment named by pod",
        lambda r: _obj(r, "StatefulSet", "hodei-agent").update(kind="Deployment"),
    ),
    (
        "agent-identity",
        "no reaper for orphans",
        lambda r: pod_specs(_obj(r, "StatefulSet", "hodei-agent"))[0].pop("shareProcessNamespace"),
    ),
    (
        "files",
        "fewer agent keys than the HPA's maximum",
        lambda r: _obj(r, "Secret", "hodei-agent-nkeys")["data"].pop("hodei-agent-7.nk"),
    ),
    (
        "consistency",
        "registry and agents beating differently",
        lambda r: _obj(r, "ConfigMap", "hodei-registry")["data"].update(
            HODEI_HEARTBEAT_INTERVAL_MS="500"
        ),
    ),
    (
        "pg-connections",
        "pools above max_connections",
        lambda r: _replace_arg(
            _container(r, "StatefulSet", "hodei-postgres"),
            "max_connections=200",
            "max_connections=50",
        ),
    ),
    (
        "netpol",
        "a policy port the pods lack",
        lambda r: _obj(r, "NetworkPolicy", "hodei-postgres")["spec"]["ingress"][0]["ports"][
            0
        ].update(port="pg"),
    ),
    (
        "labels",
        "an object without part-of",
        lambda r: _obj(r, "Service", "hodei-registry")["metadata"]["labels"].pop(
            "app.kubernetes.io/part-of"
        ),
    ),
]


def self_test(trial: Render, ctx: Context) -> int:
    """Applies each mutation to a fresh copy of the trial's render and asserts that its
    check, and only checks that can see the mutation, fire."""
    baseline = run_checks(trial, ctx)
    if baseline:
        for f in baseline:
            print(f"  self-test baseline: [{f.check}] {f.message}")
        print("k8s self-test: the unmutated trial render has findings")
        return 1
    failed = 0
    for expected, what, mutate in SELF_TESTS:
        render = Render(trial.label, copy.deepcopy(trial.objects), trial.complete, trial.renderer)
        mutate(render)
        fired = {f.check for f in run_checks(render, ctx)}
        status = "caught" if expected in fired else "MISSED"
        if expected not in fired:
            failed += 1
        print(
            f"  self-test {status}: {what} -> [{expected}]"
            + (f" (fired: {sorted(fired)})" if expected not in fired else "")
        )
    print(f"k8s self-test: {len(SELF_TESTS) - failed} caught, {failed} missed")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument(
        "--self-test", action="store_true", help="also prove each check fires on a broken copy"
    )
    parser.add_argument(
        "--print", metavar="RENDER", help="print one render (e.g. overlays/trial) as YAML and exit"
    )
    parser.add_argument(
        "--builtin",
        action="store_true",
        help="render with the built-in renderer only, as without kustomize",
    )
    args = parser.parse_args()
    if kubernetes_validate is None:
        print(
            "k8s: the kubernetes-validate package is missing (scripts/check-k8s.sh installs it)",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    root = args.root.resolve()
    try:
        source = Source.read(root)
        ctx = Context(source, source.agent_timings())
        kustomize = None if args.builtin else find_kustomize()
        with tempfile.TemporaryDirectory(prefix="hodei-k8s-") as work:
            tree = stand_in_secrets_tree(root / "deploy/k8s", Path(work))
            renders, render_problems = render_all(tree, kustomize)
    except (CheckError, OSError, tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        print(f"k8s: {e}", file=sys.stderr)
        return 2
    if args.print:
        render = next((r for r in renders if r.label == args.print), None)
        if render is None:
            print(
                f"k8s: no render {args.print}; there are {[r.label for r in renders]}",
                file=sys.stderr,
            )
            return 2
        print(yaml.safe_dump_all(render.objects, sort_keys=False), end="")
        return 0
    passed = failed = 0
    for render in renders:
        findings = [f for r, f in render_problems if r is render] + run_checks(render, ctx)
        if findings:
            failed += 1
            print(
                f"k8s: {render.label}: FAILED, {len(findings)} problems ({len(render.objects)} objects, {render.renderer})"
            )
            for f in findings:
                print(f"  [{f.check}] {f.message}")
        else:
            passed += 1
            agreed = ", built-in renderer agrees" if kustomize else ""
            print(
                f"k8s: {render.label}: ok ({len(render.objects)} objects, {render.renderer}{agreed}, schemas {' and '.join(K8S_VERSIONS)} strict)"
            )
    rc = 1 if failed else 0
    if args.self_test:
        trial = next((r for r in renders if r.label == "overlays/trial"), None)
        if trial is None:
            print("k8s self-test: no overlays/trial render to mutate")
            rc = 1
        elif self_test(trial, ctx):
            rc = 1
    print(f"k8s: {passed} passed, {failed} failed ({time.monotonic() - started:.1f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
