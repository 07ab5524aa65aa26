"""Every object in kuberay/ passes what the API server and the KubeRay operator would check, offline.

Custom resources are validated against KubeRay's CRDs (../shared/kuberay-crds, or RAYGRPO_KUBERAY_CRDS;
skipped with the reason where absent), after pruning nulls and applying defaults, strict on unknown
fields; then the operator's own rules, serveConfigV2 through Ray Serve's schemas, built-in kinds
through the Kubernetes OpenAPI schemas. Each check is also shown to refuse a broken copy.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_checks import (
    CRD_DIR,
    MONITORING_SCHEMAS,
    RAY_KINDS,
    ManifestError,
    crd_schemas,
    load_all,
    operator_errors,
    prune_and_default,
    serve_config_errors,
    validate_builtin,
    validate_custom_resource,
    validate_monitoring,
    validate_pod_templates,
)

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "kuberay"
NOT_OBJECTS = {"kustomization.yaml", "alerts_test.yaml"}  # kustomize's own file; promtool's unit tests
MANIFEST_FILES = sorted(p for p in KUBERAY.rglob("*.yaml") if p.name not in NOT_OBJECTS and "run-configs" not in p.parts)
BUILTIN_KINDS = {"Namespace", "Secret", "PersistentVolumeClaim", "Service", "StatefulSet", "Deployment", "Job",
                 "ConfigMap", "RuntimeClass"}


def objects() -> list[tuple[str, dict]]:
    return [(f"{p.relative_to(KUBERAY)}:{o['kind']}/{o['metadata']['name']}", o)
            for p in MANIFEST_FILES for o in load_all(p)]


def manifest(name: str, kind: str | None = None) -> dict:
    return next(o for o in load_all(KUBERAY / name) if kind is None or o["kind"] == kind)


@pytest.fixture(scope="module")
def schemas() -> dict:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (set RAYGRPO_KUBERAY_CRDS; CI has ../shared/kuberay-crds)")
    return crd_schemas(CRD_DIR)


def check(obj: dict, schemas: dict | None = None) -> None:
    """Every check that applies to obj; raises ManifestError naming the object and field."""
    kind = obj["kind"]
    if kind in RAY_KINDS:
        validate_custom_resource(obj, schemas)
        validate_pod_templates(obj)
        errors = operator_errors(obj)
        if errors:
            raise ManifestError("; ".join(errors))
    elif kind in MONITORING_SCHEMAS:
        validate_monitoring(obj)
    elif kind in BUILTIN_KINDS:
        validate_builtin(obj)
    else:
        raise ManifestError(f"{kind}: no check for this kind")


def set_path(obj: dict, path: str, value: Any) -> dict:
    """A copy of obj with `a.b[1].c` set to value (value None deletes the key)."""
    obj = copy.deepcopy(obj)
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node = obj
    for p in parts[:-1]:
        node = node[int(p[1:-1])] if p.startswith("[") else node[p]
    last = parts[-1]
    if value is None:
        del node[last]
    elif last.startswith("["):
        node[int(last[1:-1])] = value
    else:
        node[last] = value
    return obj


# ---- the shipped manifests pass ---------------------------------------------------------------------


@pytest.mark.parametrize("name,obj", objects(), ids=[n for n, _ in objects()])
def test_every_shipped_object_passes_its_checks(name, obj, schemas):
    check(obj, schemas)


def test_every_file_is_in_the_kustomization_or_documented_out():
    listed = set(yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())["resources"])
    monitoring = set(yaml.safe_load((KUBERAY / "monitoring" / "kustomization.yaml").read_text())["resources"])
    files = {p.name for p in KUBERAY.glob("*.yaml")} - {"kustomization.yaml"}
    assert files - listed == {"rayjob-grpo.yaml"}  # a training run of its own, created on purpose
    assert "monitoring" in listed
    assert {p.name for p in (KUBERAY / "monitoring").glob("*.yaml")} - NOT_OBJECTS == monitoring


def test_defaults_are_applied_and_nulls_pruned_before_validation(schemas):
    cluster = manifest("raycluster.yaml")
    key = ("ray.io/v1", "RayCluster")
    trimmed = set_path(cluster, "spec.workerGroupSpecs[1].minReplicas", None)  # required, but defaulted
    trimmed["spec"]["headGroupSpec"]["serviceType"] = None  # a null in a non-nullable field is dropped
    trimmed["spec"]["workerGroupSpecs"][0]["template"]["metadata"] = {}
    stored = validate_custom_resource(trimmed, schemas)
    assert stored["spec"]["workerGroupSpecs"][1]["minReplicas"] == 0
    assert stored["spec"]["workerGroupSpecs"][1]["numOfHosts"] == 1
    assert "serviceType" not in stored["spec"]["headGroupSpec"]
    assert prune_and_default({"spec": {}}, schemas[key])["spec"] == {}  # nothing invented without a default


# ---- each check refuses a broken copy -----------------------------------------------------------------

BROKEN = [
    # (file, kind, path, value, words in the error)   -- the CRD schema
    ("raycluster.yaml", None, "spec.workerGroupSpecs[1].maxReplicas", "8", "is not of type 'integer'"),
    ("raycluster.yaml", None, "spec.workerGroupSpecs[1].maxReplica", 8, "'maxReplica' was unexpected"),
    ("raycluster.yaml", None, "spec.autoscalerOptions.upscalingMode", "Fast", "is not one of"),
    ("raycluster.yaml", None, "spec.headGroupSpec.template.spec.containers[0].imagePullPolicy", "Sometimes",
     "is not one of"),
    ("raycluster.yaml", None, "spec.headGroupSpec.rayStartParams.num-cpus", 0, "is not of type 'string'"),
    ("rayjob-grpo.yaml", None, "spec.shutdownAfterJobFinishes", "yes", "is not of type 'boolean'"),
    ("rayservice.yaml", None, "spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0].resourcez",
     {}, "'resourcez' was unexpected"),
    # the operator's rules
    ("raycluster.yaml", None, "spec.workerGroupSpecs[1].minReplicas", 9, "minReplicas 9 > maxReplicas 8"),
    ("rayservice.yaml", None, "spec.rayClusterConfig.workerGroupSpecs[0].minReplicas", 10,
     "minReplicas 10 > maxReplicas 8"),
    ("rayjob-grpo.yaml", None, "spec.submissionMode", "KubernetesJob", "submissionMode must be one of"),
    ("rayjob-grpo.yaml", None, "spec.shutdownAfterJobFinishes", False, "needs spec.shutdownAfterJobFinishes"),
    ("rayjob-grpo.yaml", None, "metadata.name", "g" * 48, "longer than 47"),
    ("rayjob-grpo.yaml", None, "spec.runtimeEnvYAML", "working_dirr: .\n", "working_dirr: unknown field"),
    ("rayjob-grpo.yaml", None, "spec.runtimeEnvYAML", "env_vars: {A: 1}\n", "must be of type Dict[str, str]"),
    ("raycluster.yaml", None, "metadata.name", "r" * 54, "longer than 53"),
    ("rayservice.yaml", None, "spec.upgradeStrategy.type", "BlueGreen", "upgradeStrategy.type must be one of"),
    ("raycluster.yaml", None, "spec.workerGroupSpecs[1].template.spec.restartPolicy", "Always",
     "must be Never or unset with autoscaler v2"),
    ("raycluster.yaml", None, "metadata.annotations", {"ray.io/ft-enabled": "true"}, "GCS fault tolerance set twice"),
    ("raycluster.yaml", None, "spec.headGroupSpec.template.spec.containers[0].env",
     [{"name": "RAY_REDIS_ADDRESS", "value": "raygrpo-redis:6379"}], "GCS fault tolerance set twice"),
    ("rayservice.yaml", None, "spec.rayClusterConfig.workerGroupSpecs[0].groupName", "gpu", "groupName must be unique"),
    # built-in kinds (Kubernetes OpenAPI, strict)
    ("redis.yaml", "StatefulSet", "spec.replicas", "one", "is not of type 'integer'"),
    ("migrate-job.yaml", None, "spec.backofflimit", 3, "Additional properties"),
    ("redis.yaml", "Service", "spec.ports[0].protocol", "QUIC", "is not one of"),
    ("postgres.yaml", "StatefulSet", "spec.template.spec.containers[0].resources.requests.cpu", [1],
     "is not valid under any of the given schemas"),  # a quantity is an int or a string
    ("secrets.yaml", "Secret", "stringData.password", 1234, "is not of type 'string'"),
    ("namespace.yaml", None, "metadata.name", "Ray_GRPO", "DNS-1123"),
    # monitoring objects
    ("monitoring/podmonitors.yaml", None, "spec.podMetricsEndpoints[0].intervall", "15s", "'intervall' was unexpected"),
    ("monitoring/podmonitors.yaml", None, "spec.podMetricsEndpoints[0].interval", "15 seconds", "does not match"),
    ("monitoring/prometheusrule.yaml", None, "spec.groups[0].rules[0].expr", "sum(rate(training_jobs_total[5m])",
     "expr: unclosed"),
    ("monitoring/prometheusrule.yaml", None, "spec.groups[0].rules[0].for", 5, "is not of type 'string'"),
]


@pytest.mark.parametrize("name,kind,path,value,words", BROKEN, ids=[f"{b[0]}:{b[2]}" for b in BROKEN])
def test_a_broken_copy_is_refused(name, kind, path, value, words, schemas):
    obj = set_path(manifest(name, kind), path, value)
    with pytest.raises(ManifestError) as e:
        check(obj, schemas)
    assert words in str(e.value)


SERVE_BROKEN = [
    ("applications[0].deployments[0].max_ongoing_request", 64, "max_ongoing_request"),     # unknown field
    ("applications[0].deployments[0].max_ongoing_requests", "many", "max_ongoing_requests"),  # wrong type
    ("applications[0].deployments[0].autoscaling_config.min_replicas", 5, "min_replicas"),  # min > max
    ("proxy_location", "Everywhere", "proxy_location"),                                   # bad enum
    ("applications[0].import_path", "app", "import_path"),                                 # no attribute named
    ("http_options.request_timeout", 120, "request_timeout"),                              # unknown field
]


@pytest.mark.parametrize("path,value,words", SERVE_BROKEN, ids=[s[0] for s in SERVE_BROKEN])
def test_serve_config_checks_refuse_a_broken_copy(path, value, words):
    service = manifest("rayservice.yaml")
    config = set_path(yaml.safe_load(service["spec"]["serveConfigV2"]), path, value)
    errors = serve_config_errors(yaml.safe_dump(config), "RayService/raygrpo-api")
    assert errors and any(words in e for e in errors), errors


def test_autoscaling_min_above_max_is_caught_by_autoscaling_config_not_only_the_schema():
    config = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    config["applications"][0]["deployments"][0]["autoscaling_config"].update(min_replicas=6, max_replicas=2)
    errors = serve_config_errors(yaml.safe_dump(config), "x")
    assert any("autoscaling_config" in e for e in errors), errors


# ---- the manifests agree with the code and with each other -----------------------------------------------


def test_serve_config_is_what_serve_build_makes_of_the_app(tmp_path):
    """serveConfigV2's application is `serve build app.api.serve:app` (renamed raygrpo-api); regenerate on change."""
    out = tmp_path / "built.yaml"
    proc = subprocess.run([str(Path(sys.executable).parent / "serve"), "build", "app.api.serve:app", "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    built = yaml.safe_load(out.read_text())
    shipped = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    [built_app], [shipped_app] = built["applications"], shipped["applications"]
    assert shipped_app == {**built_app, "name": "raygrpo-api"}, (
        "serveConfigV2 differs from `serve build app.api.serve:app`: paste the new application into kuberay/rayservice.yaml")
    assert shipped["http_options"]["port"] == 8000  # the port KubeRay's serve Service targets
    assert shipped["http_options"]["request_timeout_s"] > 0
    assert set(shipped) <= set(built) | {"logging_config"}


def _cluster_specs() -> dict[str, dict]:
    return {"RayCluster": manifest("raycluster.yaml")["spec"],
            "RayService": manifest("rayservice.yaml")["spec"]["rayClusterConfig"],
            "RayJob": manifest("rayjob-grpo.yaml")["spec"]["rayClusterSpec"]}


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_cluster_specs_pin_one_ray_version_image_and_shape():
    import ray

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for kind, spec in _cluster_specs().items():
        assert spec["rayVersion"] == ray.__version__ == "2.60.0", kind
        assert {c["image"] for c in _containers(spec)} == {f"raygrpo:{version}"}, kind
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", kind
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2", kind
        assert spec["authOptions"]["mode"] == "token", kind  # Ray's token auth stays on
        gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
        assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] > 0, kind
        limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, kind
        assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"]), kind
    long_lived = _cluster_specs()
    assert long_lived["RayCluster"]["gcsFaultToleranceOptions"] == long_lived["RayService"]["gcsFaultToleranceOptions"]
    assert ({g["groupName"] for g in long_lived["RayCluster"]["workerGroupSpecs"]}
            == {g["groupName"] for g in long_lived["RayService"]["workerGroupSpecs"]})


def test_the_rayjob_run_config_is_valid_and_fits_its_cluster():
    from grpo.config import load_config
    from grpo.run import required_cpus

    spec = manifest("rayjob-grpo.yaml")["spec"]
    args = shlex.split(spec["entrypoint"])
    assert args[:3] == ["python", "-m", "grpo.run"]
    cfg = load_config(ROOT / args[args.index("--config") + 1])
    cluster = spec["rayClusterSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    per_pod = {name: g["template"]["spec"]["containers"][0]["resources"]["limits"] for name, g in groups.items()}
    gpus_needed = (cfg.num_policy_workers + cfg.num_rollout_workers) * cfg.gpus_per_worker
    assert gpus_needed <= groups["gpu"]["maxReplicas"] * int(per_pod["gpu"]["nvidia.com/gpu"])
    assert cfg.cpus_per_worker <= int(per_pod["gpu"]["cpu"])  # a GPU worker's CPUs fit on its pod
    cpus = sum(g["maxReplicas"] * int(per_pod[n]["cpu"]) for n, g in groups.items())
    assert required_cpus(cfg) <= cpus
    assert cfg.output_dir.startswith("/mnt/raygrpo")  # the shared volume every pod mounts
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "."  # the submitter's cwd: the image's WORKDIR, the project


def test_every_referenced_secret_volume_and_service_exists():
    secrets = {o["metadata"]["name"]: set(o["stringData"]) for o in load_all(KUBERAY / "secrets.yaml")}
    claims = {o["metadata"]["name"] for o in load_all(KUBERAY / "storage.yaml")}
    services = {o["metadata"]["name"] for f in ("redis.yaml", "postgres.yaml") for o in load_all(KUBERAY / f)
                if o["kind"] == "Service"} | {f"{manifest('raycluster.yaml')['metadata']['name']}-head-svc"}
    refs: list[tuple[str, str | None]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                refs.append((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            if "secretName" in node and isinstance(node["secretName"], str):
                refs.append((node["secretName"], None))
                for item in node.get("items") or []:
                    refs.append((node["secretName"], item["key"]))
            if "persistentVolumeClaim" in node:
                assert node["persistentVolumeClaim"]["claimName"] in claims
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for _, obj in objects():
        walk(obj)
    assert refs
    for name, key in refs:
        assert name in secrets, name
        assert key is None or key in secrets[name], (name, key)
    assert "auth_token" in secrets["raygrpo-ray-auth"]  # the key KubeRay reads for RAY_AUTH_TOKEN
    for text in (KUBERAY / "raycluster.yaml").read_text(), (KUBERAY / "rayservice.yaml").read_text():
        for host in re.findall(r"(raygrpo-[a-z-]+):\d+", text):
            assert host in services, host
    assert all("CHANGE-ME" in v for o in load_all(KUBERAY / "secrets.yaml") for v in o["stringData"].values()), (
        "secrets.yaml is a template: real values never go into git")


def test_the_dockerfile_builds_the_image_the_manifests_name():
    import ray

    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert base.startswith(f"rayproject/ray:{ray.__version__}"), base
    for line in lines:
        if line.startswith(("COPY", "ADD")) and "--from" not in line:
            sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
            for s in sources:
                assert (ROOT / s).exists(), f"Dockerfile copies {s}, which does not exist"
    assert re.search(r"^WORKDIR /home/ray/raygrpo$", text, re.M)  # the RayJob's working_dir "."
    assert "kuberay/run-configs" in text  # the RayJob's --config travels with the image
    assert "pip install" in text and "-e ." not in text


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) is not installed")
def test_kustomize_builds_the_whole_deploy_and_every_built_object_passes(schemas):
    out = subprocess.run(["kubectl", "kustomize", str(KUBERAY)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    built = [o for o in yaml.safe_load_all(out.stdout) if o]
    kinds = {o["kind"] for o in built}
    assert {"RayCluster", "RayService", "StatefulSet", "Job", "Secret", "PodMonitor", "PrometheusRule",
            "ConfigMap"} <= kinds
    for obj in built:
        check(obj, schemas)
        if obj["kind"] not in ("Namespace", "RuntimeClass"):  # cluster-scoped
            assert obj["metadata"]["namespace"] == "raygrpo", obj["metadata"]["name"]
    dashboards = [o for o in built if o["kind"] == "ConfigMap"]
    assert len(dashboards) == 3 and all(o["metadata"]["labels"]["grafana_dashboard"] == "1" for o in dashboards)
