"""Offline checks of Kubernetes manifests, as strict as the API server and the KubeRay operator.

No cluster is reachable in the tests, so this module does what they would do on `kubectl apply`:
- custom resources (RayCluster, RayJob, RayService) against KubeRay's CRDs: non-nullable nulls are
  pruned and the schema's defaults applied first (as the API server does), then JSON Schema with
  unknown fields refused wherever the schema declares properties (kubeconform's strict mode);
- the rules the KubeRay operator enforces that the schema cannot express (`operator_errors`);
- `serveConfigV2` with Ray Serve's own ServeDeploySchema and each autoscaling_config with
  AutoscalingConfig;
- built-in kinds (Deployment, StatefulSet, Service, Secret, Job, ConfigMap, ...) against the
  Kubernetes OpenAPI schemas that the kubernetes-validate package ships, strict;
- the Prometheus operator's PodMonitor / ServiceMonitor / PrometheusRule against a schema of the
  fields we use (their CRDs are not shipped here), with every PromQL expression parsed.

CEL rules (`x-kubernetes-validations`) are not evaluated; the ones that apply on create to what we
ship (managedBy values) are in `operator_errors`.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = Path(os.environ.get("RAYGRPO_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
K8S_VERSION = "1.32.0"  # the oldest Kubernetes the manifests are meant for (KubeRay 1.7 supports 1.28+)

RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
MANAGED_BY = {"ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"}


class ManifestError(AssertionError):
    """A manifest the API server or the operator would refuse; the message names the object and field."""


def load_all(path: Path) -> list[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 20k lines: libyaml is 10x faster
    return [d for d in yaml.load_all(path.read_text(), Loader=loader) if d]


def where(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ---- CRDs -----------------------------------------------------------------------------------------


def crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], dict]:
    """{(apiVersion, kind): openAPIV3Schema} for every served version of the CRDs in crd_dir."""
    out = {}
    for f in sorted(crd_dir.glob("*.yaml")):
        for crd in load_all(f):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                if v.get("served", True):
                    out[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return out


def prune_and_default(value: Any, schema: dict) -> Any:
    """What the API server does before validating: drop nulls the schema does not allow, fill defaults."""
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None:
            out = {}
            for k, v in value.items():
                sub = props.get(k, {})
                if v is None and not sub.get("nullable"):
                    continue
                out[k] = prune_and_default(v, sub)
            for k, sub in props.items():
                if k not in out and "default" in sub:
                    out[k] = prune_and_default(copy.deepcopy(sub["default"]), sub)
            return out
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return {k: prune_and_default(v, extra) for k, v in value.items()
                    if v is not None or extra.get("nullable")}
        return value
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune_and_default(v, schema["items"]) for v in value]
    return value


def strict_schema(schema: dict) -> dict:
    """The structural schema as JSON Schema: unknown fields refused, `nullable` as a null type."""
    s = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in s:
        s["properties"] = {k: strict_schema(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not schema.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict_schema(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict_schema(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict_schema(x) for x in s[key]]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    return s


_STRICT_CACHE: dict[tuple[str, str], jsonschema.Validator] = {}


def validate_custom_resource(obj: dict, schemas: dict[tuple[str, str], dict]) -> dict:
    """Prune, default and validate one custom resource; returns the object as the API server stores it."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in schemas:
        raise ManifestError(f"{where(obj)}: no CRD serves {key[0]} {key[1]}")
    schema = schemas[key]
    if key not in _STRICT_CACHE:
        _STRICT_CACHE[key] = jsonschema.Draft7Validator(strict_schema(schema))
    stored = prune_and_default(obj, schema)
    errors = sorted(_STRICT_CACHE[key].iter_errors(stored), key=lambda e: list(e.absolute_path))
    if errors:
        raise ManifestError("; ".join(f"{where(obj)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                                      for e in errors[:5]))
    return stored


# ---- what the KubeRay operator checks beyond the schema ---------------------------------------------


def cluster_spec_errors(spec: dict, at: str) -> list[str]:
    errors = []
    v2 = spec.get("enableInTreeAutoscaling") and (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    groups = [("headGroupSpec", spec.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    names = [g.get("groupName") for _, g in groups[1:]]
    if len(set(names)) != len(names):
        errors.append(f"{at}.workerGroupSpecs: groupName must be unique, got {names}")
    for path, g in groups:
        for k, v in (g.get("rayStartParams") or {}).items():
            if not isinstance(v, str):
                errors.append(f"{at}.{path}.rayStartParams.{k}: must be a string, got {type(v).__name__} {v!r}")
        if path != "headGroupSpec":
            lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
            if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
                errors.append(f"{at}.{path}: minReplicas {lo} > maxReplicas {hi}")
        pod = (g.get("template") or {}).get("spec") or {}
        if v2 and pod.get("restartPolicy") not in (None, "Never"):
            errors.append(f"{at}.{path}.template.spec.restartPolicy: must be Never or unset with autoscaler v2, "
                          f"got {pod['restartPolicy']!r}")
        if not pod.get("containers"):
            errors.append(f"{at}.{path}.template.spec.containers: a Ray container is required")
    if spec.get("gcsFaultToleranceOptions"):
        head = (spec.get("headGroupSpec") or {}).get("template") or {}
        env = [e.get("name") for c in (head.get("spec") or {}).get("containers") or [] for e in c.get("env") or []]
        if "RAY_REDIS_ADDRESS" in env:
            errors.append(f"{at}: GCS fault tolerance set twice: gcsFaultToleranceOptions and RAY_REDIS_ADDRESS")
    return errors


def operator_errors(obj: dict) -> list[str]:
    """Rules the operator enforces (or that make it fail the resource) which the CRD schema cannot express."""
    kind, meta, spec = obj.get("kind"), obj.get("metadata") or {}, obj.get("spec") or {}
    at, errors = where(obj), []
    name = meta.get("name", "")
    if len(name) > NAME_LIMITS.get(kind, 253):
        errors.append(f"{at}: metadata.name longer than {NAME_LIMITS[kind]} characters ({len(name)})")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"{at}: metadata.name must be a DNS-1035 label")
    if spec.get("managedBy") is not None and spec["managedBy"] not in MANAGED_BY:
        errors.append(f"{at}: spec.managedBy must be one of {sorted(MANAGED_BY)}")
    annotations = meta.get("annotations") or {}
    if kind == "RayCluster":
        cluster = spec
    elif kind == "RayService":
        cluster = spec.get("rayClusterConfig") or {}
        t = (spec.get("upgradeStrategy") or {}).get("type")
        if t is not None and t not in UPGRADE_TYPES:
            errors.append(f"{at}: spec.upgradeStrategy.type must be one of {sorted(UPGRADE_TYPES)}, got {t!r}")
        errors += serve_config_errors(spec.get("serveConfigV2"), at)
    elif kind == "RayJob":
        cluster = spec.get("rayClusterSpec") or {}
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"{at}: spec.submissionMode must be one of {sorted(SUBMISSION_MODES)}, got {mode!r}")
        if spec.get("ttlSecondsAfterFinished") and not spec.get("shutdownAfterJobFinishes"):
            errors.append(f"{at}: spec.ttlSecondsAfterFinished needs spec.shutdownAfterJobFinishes: true")
        if spec.get("shutdownAfterJobFinishes") and spec.get("clusterSelector"):
            errors.append(f"{at}: spec.shutdownAfterJobFinishes cannot be used with spec.clusterSelector")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            errors.append(f"{at}: spec.rayClusterSpec or spec.clusterSelector is required")
        if mode != "InteractiveMode" and not spec.get("entrypoint"):
            errors.append(f"{at}: spec.entrypoint is required in {mode}")
        if spec.get("runtimeEnvYAML") is not None:
            errors += runtime_env_errors(spec["runtimeEnvYAML"], f"{at}: spec.runtimeEnvYAML")
        if (spec.get("activeDeadlineSeconds") or 1) <= 0:
            errors.append(f"{at}: spec.activeDeadlineSeconds must be positive")
    else:
        return errors
    ft_annotation = str(annotations.get("ray.io/ft-enabled", "")).lower() == "true"
    if cluster.get("gcsFaultToleranceOptions") and ft_annotation:
        errors.append(f"{at}: GCS fault tolerance set twice: gcsFaultToleranceOptions and the ray.io/ft-enabled annotation")
    return errors + cluster_spec_errors(cluster, at)


def runtime_env_errors(text: str, at: str) -> list[str]:
    """A runtime env as `ray job submit` takes it: Ray's RuntimeEnv checks the types of the fields it
    knows; it accepts any other key (plugins), which we refuse as a typo."""
    from ray.runtime_env import RuntimeEnv

    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"{at}: {e}"]
    if not isinstance(env, dict):
        return [f"{at}: must be a YAML mapping"]
    errors = [f"{at}.{k}: unknown field" for k in env if k not in RuntimeEnv.known_fields]
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        errors.append(f"{at}: {e}")
    return errors


def serve_config_errors(text: str | None, at: str) -> list[str]:
    """serveConfigV2 through Ray Serve's ServeDeploySchema, each autoscaling_config through AutoscalingConfig."""
    from pydantic import ValidationError as V2Error

    try:  # Serve's schemas are pydantic v1 models (ray._common.pydantic_compat) in some Ray versions
        from ray._common.pydantic_compat import ValidationError as V1Error
    except ImportError:  # pragma: no cover - older Ray
        V1Error = V2Error
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    if not text:
        return []
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"{at}: serveConfigV2 is not YAML: {e}"]
    errors = [f"{at}: serveConfigV2: {e}" for e in unknown_fields(config, ServeDeploySchema)]
    try:
        ServeDeploySchema.model_validate(config)
    except (V1Error, V2Error, TypeError, ValueError) as e:
        errors.append(f"{at}: serveConfigV2: {e}")
    for app in (config or {}).get("applications") or []:
        for d in app.get("deployments") or []:
            if d.get("autoscaling_config") is not None:
                try:
                    AutoscalingConfig(**d["autoscaling_config"])
                except (V1Error, V2Error, TypeError, ValueError) as e:
                    errors.append(f"{at}: serveConfigV2 {app.get('name')}/{d.get('name')}.autoscaling_config: {e}")
    return errors


def unknown_fields(data: Any, model: type, path: str = "") -> list[str]:
    """Keys a pydantic model does not declare. Serve's schemas ignore them (a typo such as
    `max_ongoing_request` would be dropped without a word); a strict check refuses them."""
    import typing

    from pydantic import BaseModel

    if not isinstance(data, dict):
        return []
    fields = {(f.alias or name): f for name, f in model.model_fields.items()} | dict(model.model_fields)
    errors = []
    for key, value in data.items():
        here = f"{path}.{key}" if path else key
        if key not in fields:
            errors.append(f"{here}: unknown field (not in {model.__name__})")
            continue
        annotation = fields[key].annotation
        candidates = [annotation, *typing.get_args(annotation)]
        for c in list(candidates):
            candidates += typing.get_args(c)
        models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not models:
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            errors += unknown_fields(item, models[0], f"{here}[{i}]" if isinstance(value, list) else here)
    return errors


# ---- built-in kinds -------------------------------------------------------------------------------


# Kubernetes' OpenAPI documents these enums only in prose; the API server's validation code refuses
# other values. Checked by key wherever they appear.
BUILTIN_ENUMS = {
    "imagePullPolicy": {"Always", "Never", "IfNotPresent"},
    "restartPolicy": {"Always", "OnFailure", "Never"},
    "protocol": {"TCP", "UDP", "SCTP"},
    "medium": {"", "Memory", "HugePages"},
    "operator": {"Exists", "Equal", "In", "NotIn", "DoesNotExist", "Gt", "Lt"},
    "effect": {"", "NoSchedule", "PreferNoSchedule", "NoExecute"},
    "accessModes": {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"},
}
SERVICE_TYPES = {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"}


def builtin_rule_errors(obj: dict) -> list[str]:
    """Enums and rules the Kubernetes API server checks in code rather than in its OpenAPI schema."""
    errors: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                here = f"{path}.{k}" if path else k
                allowed = BUILTIN_ENUMS.get(k)
                if allowed is not None and (k != "operator" or "key" in node):  # operator: tolerations, selectors
                    values = v if isinstance(v, list) else [v]
                    bad = [x for x in values if isinstance(x, str) and x not in allowed]
                    if bad:
                        errors.append(f"{where(obj)}: {here}: {bad[0]!r} is not one of {sorted(allowed)}")
                if k == "ports" and isinstance(v, list):
                    for i, port in enumerate(v):
                        name = port.get("name") if isinstance(port, dict) else None
                        if isinstance(name, str) and (len(name) > 15 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)):
                            errors.append(f"{where(obj)}: {here}[{i}].name: {name!r} is not an IANA service name")
                walk(v, here)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(obj, "")
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Service" and spec.get("type", "ClusterIP") not in SERVICE_TYPES:
        errors.append(f"{where(obj)}: spec.type: {spec['type']!r} is not one of {sorted(SERVICE_TYPES)}")
    if obj.get("kind") == "Job":
        policy = ((spec.get("template") or {}).get("spec") or {}).get("restartPolicy")
        if policy not in ("OnFailure", "Never"):
            errors.append(f"{where(obj)}: spec.template.spec.restartPolicy: a Job's pods need OnFailure or Never")
    return errors


def validate_builtin(obj: dict, version: str = K8S_VERSION) -> None:
    """Strict validation against the Kubernetes OpenAPI schema of `version` (kubernetes-validate), then
    the enums and rules the API server checks in code (`builtin_rule_errors`)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(map(str, e.path)) or "<root>"
        raise ManifestError(f"{where(obj)}: {path}: {e.message}") from None
    meta = obj.get("metadata") or {}
    if not re.fullmatch(r"[a-z0-9]([-.a-z0-9]*[a-z0-9])?", meta.get("name", "")) or len(meta["name"]) > 253:
        raise ManifestError(f"{where(obj)}: metadata.name must be a DNS-1123 subdomain")
    errors = builtin_rule_errors(obj)
    if errors:
        raise ManifestError("; ".join(errors))


CLUSTER_FIELD = {"RayCluster": None, "RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}


def cluster_specs(obj: dict) -> list[tuple[str, dict]]:
    """The RayCluster spec inside a Ray custom resource (none for a RayJob on an existing cluster), with its path."""
    if obj.get("kind") not in CLUSTER_FIELD:
        return []
    spec, field = obj.get("spec") or {}, CLUSTER_FIELD[obj["kind"]]
    cluster = spec if field is None else spec.get(field)
    return [("spec" if field is None else f"spec.{field}", cluster)] if cluster else []


def validate_pod_templates(obj: dict, version: str = K8S_VERSION) -> None:
    """The pod templates inside a Ray resource as the Pods KubeRay makes of them: the CRD's copy of PodSpec
    has no enums or formats, the API server checks those only when the operator creates the Pods."""
    for path, cluster in cluster_specs(obj):
        groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
        groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
        for name, g in groups:
            template = copy.deepcopy(g.get("template") or {})
            pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ray-pod"}, "template": template}
            try:
                validate_builtin(pod, version)
            except ManifestError as e:
                raise ManifestError(f"{where(obj)}: {path}.{name}.template (as a Pod): "
                                    f"{str(e).split(': ', 1)[1]}") from None


# ---- Prometheus operator objects ------------------------------------------------------------------

_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {"type": "object"}}}}
_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": {"type": "string"}, "targetLabel": {"type": "string"}, "regex": {"type": "string"},
    "modulus": {"type": "integer", "minimum": 1}, "replacement": {"type": "string"},
    "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                        "lowercase", "uppercase", "keepequal", "dropequal"]}}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_ENDPOINT = {"type": "object", "additionalProperties": False, "properties": {
    "port": {"type": "string"}, "targetPort": {}, "path": {"type": "string", "pattern": "^/"},
    "scheme": {"enum": ["http", "https"]}, "interval": _DURATION, "scrapeTimeout": _DURATION,
    "honorLabels": {"type": "boolean"}, "relabelings": {"type": "array", "items": _RELABEL},
    "metricRelabelings": {"type": "array", "items": _RELABEL},
    "authorization": {"type": "object", "required": ["credentials"], "additionalProperties": False, "properties": {
        "type": {"type": "string"},
        "credentials": {"type": "object", "required": ["key"], "additionalProperties": False, "properties": {
            "name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}}}}}}}
_META = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$", "maxLength": 253},
    "namespace": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}, "additionalProperties": False}


def _kind(kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                           "metadata": _META, "spec": spec}}


MONITORING_SCHEMAS = {
    "PodMonitor": _kind("PodMonitor", {"type": "object", "required": ["selector", "podMetricsEndpoints"],
                                       "additionalProperties": False, "properties": {
        "jobLabel": {"type": "string"}, "selector": _SELECTOR,
        "namespaceSelector": {"type": "object"}, "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}}),
    "ServiceMonitor": _kind("ServiceMonitor", {"type": "object", "required": ["selector", "endpoints"],
                                               "additionalProperties": False, "properties": {
        "jobLabel": {"type": "string"}, "selector": _SELECTOR, "namespaceSelector": {"type": "object"},
        "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}}),
    "PrometheusRule": _kind("PrometheusRule", {"type": "object", "required": ["groups"], "additionalProperties": False,
                                               "properties": {"groups": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name", "rules"], "additionalProperties": False, "properties": {
            "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
            "rules": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["expr"], "additionalProperties": False,
                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                "properties": {
                    "alert": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
                    "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                    "expr": {"type": "string", "minLength": 1}, "for": _DURATION, "keep_firing_for": _DURATION,
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}}}}}}}),
}


def validate_monitoring(obj: dict) -> None:
    schema = MONITORING_SCHEMAS.get(obj.get("kind"))
    if schema is None:
        raise ManifestError(f"{where(obj)}: not a monitoring kind we check")
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        raise ManifestError("; ".join(f"{where(obj)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                                      for e in errors[:5]))
    if obj["kind"] == "PrometheusRule":
        for g in obj["spec"]["groups"]:
            for r in g["rules"]:
                try:
                    promql_metrics(r["expr"])
                except ValueError as e:
                    raise ManifestError(f"{where(obj)}: {r.get('alert') or r.get('record')}: expr: {e}") from None


# ---- PromQL -------------------------------------------------------------------------------------------

GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def promql_metrics(expr: str) -> set[str]:
    """Parse a PromQL expression (promql-parser, Prometheus's grammar) and return the metric names it reads.

    Grafana's variables are replaced first as Grafana would ($__rate_interval by a duration, $name by a value).
    Raises ValueError with the parser's message for an expression Prometheus would refuse.
    """
    import promql_parser

    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    expr = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "x", expr)
    names: set[str] = set()
    _walk(promql_parser.parse(expr), names)
    return names


def _walk(node: Any, names: set[str]) -> None:
    kind = type(node).__name__
    if kind == "VectorSelector":
        if node.name:
            names.add(node.name)
        else:  # {__name__="..."}
            names.update(m.value for m in node.matchers.matchers if m.name == "__name__")
        return
    if kind == "MatrixSelector":
        _walk(node.vector_selector, names)
        return
    for attr in ("expr", "lhs", "rhs", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            _walk(child, names)
    for arg in getattr(node, "args", None) or []:
        _walk(arg, names)
