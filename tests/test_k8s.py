"""Offline checks of every object in k8s/*.yaml (and of the RayJob kept inside the nightly CronJob's
ConfigMap):

- ray.io kinds against the KubeRay v1.7 CRD schemas in ../shared/schemas, made strict (an unknown
  field is an error, as kubeconform does), plus the rules the operator only enforces at reconcile
  time (see shared/schemas/README.md);
- core kinds with the `kubernetes_validate` package (bundled schemas, strict mode);
- our own policies: non-root containers, memory requests == limits, S3 credentials only through
  Secret references, token auth on, head with num-cpus "0", nothing published outside the cluster.

Each check is a plain function returning the problems it finds, and has a test that feeds it a
deliberately broken object, so a check that can never fail cannot pass unnoticed.
"""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "k8s"
# The repository sits beside shared/, which holds the CRDs the KubeRay operator installs.
SCHEMA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "schemas"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
# Oldest Kubernetes we claim to support; CronJob.spec.timeZone is GA since 1.27.
KUBERNETES_VERSION = "1.30.0"
# KubeRay derives RayCluster and pod names from these, so it rejects longer ones.
MAX_NAME_LENGTH = {"RayJob": 47, "RayCronJob": 36}
GENERATE_NAME_SUFFIX = 5  # random characters the API server appends to metadata.generateName
RAY_UID = 1000  # the `ray` user of the rayproject/ray images (cluster/Dockerfile keeps it)
IMAGE = "ghcr.io/example/distcls:0.1.0"
PLACEHOLDER = "REPLACE_ME"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are ~56k lines

needs_schemas = pytest.mark.skipif(
    not SCHEMA_DIR.is_dir(),
    reason=f"KubeRay CRD schemas not found at {SCHEMA_DIR} (the repository must sit beside shared/)",
)


# --------------------------------------------------------------------------- loading manifests


def _load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc]


@functools.cache
def _manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(label, object) for every object in k8s/*.yaml, plus manifests kept in ConfigMap data."""
    found = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for index, doc in enumerate(_load_all(path.read_text())):
            label = f"{path.name}#{index}:{doc.get('kind')}/{_name(doc)}"
            found.append((label, doc))
            if doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        for inner in _load_all(text):
                            found.append((f"{label}>{key}:{inner.get('kind')}/{_name(inner)}", inner))
    return tuple(found)


def _name(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return meta.get("name") or (meta.get("generateName", "") + "*")


def manifests(*kinds: str) -> list[Any]:
    """pytest params (deep copies, so tests may mutate them) of the objects of these kinds, or all."""
    return [
        pytest.param(copy.deepcopy(doc), id=label)
        for label, doc in _manifests()
        if not kinds or doc.get("kind") in kinds
    ]


def the(kind: str, name: str) -> dict[str, Any]:
    """A fresh copy of one object, by kind and name (or generateName)."""
    for _, doc in _manifests():
        if doc.get("kind") == kind and _name(doc).rstrip("*") == name:
            return copy.deepcopy(doc)
    raise LookupError(f"no {kind} named {name} in k8s/")


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")


def pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p, n) for p, n in _walk(doc) if isinstance(n, dict) and isinstance(n.get("containers"), list)]


def ray_cluster_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(p, n) for p, n in _walk(doc) if isinstance(n, dict) and isinstance(n.get("headGroupSpec"), dict)]


def ray_job_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if doc.get("kind") == "RayJob":
        return [("spec", doc.get("spec") or {})]
    if doc.get("kind") == "RayCronJob":
        return [("spec.jobTemplate", (doc.get("spec") or {}).get("jobTemplate") or {})]
    return []


# --------------------------------------------------------------------------- CRD schemas


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema with `additionalProperties: false` on every object that lists
    `properties` and says nothing about additional ones (what kubeconform's openapi2jsonschema
    does), so that a misspelt field fails instead of being silently pruned by the API server.
    Fields marked x-kubernetes-int-or-string carry no `type` (only anyOf integer/string); the
    walk leaves them as they are and jsonschema accepts both forms."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {name: strict(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), (dict, list)):
            out[key] = strict(out[key])
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.load((SCHEMA_DIR / CRD_FILES[kind]).read_text(), Loader=_Loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def crd_validator(kind: str, strict_mode: bool = True) -> jsonschema.Draft7Validator:
    schema = crd_schema(kind)
    return jsonschema.Draft7Validator(strict(schema) if strict_mode else schema)


def schema_errors(doc: dict[str, Any], strict_mode: bool = True) -> list[str]:
    errors = crd_validator(doc["kind"], strict_mode).iter_errors(doc)
    return sorted(f"{e.json_path}: {e.message}" for e in errors)


# --------------------------------------------------------------------------- operator-side rules


def operator_rule_violations(doc: dict[str, Any]) -> list[str]:
    """Rules the KubeRay operator enforces only when it reconciles (shared/schemas/README.md)."""
    problems = []
    kind, meta = doc.get("kind"), doc.get("metadata") or {}
    if kind in MAX_NAME_LENGTH:
        length = len(meta["name"]) if "name" in meta else len(meta.get("generateName", "")) + GENERATE_NAME_SUFFIX
        if length > MAX_NAME_LENGTH[kind]:
            problems.append(f"{kind} name is {length} characters, more than {MAX_NAME_LENGTH[kind]}")
    for where, spec in ray_job_specs(doc):
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            problems.append(f"{where}: needs rayClusterSpec or clusterSelector")
        if "ttlSecondsAfterFinished" in spec and spec.get("shutdownAfterJobFinishes") is not True:
            problems.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    for where, spec in ray_cluster_specs(doc):
        for group in spec.get("workerGroupSpecs") or []:
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            if low > high:
                problems.append(f"{where} group {group.get('groupName')}: minReplicas {low} > maxReplicas {high}")
    return problems


# --------------------------------------------------------------------------- our policies

_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|[mk])?$")
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_SECRET_ENV_NAME = re.compile(r"^AWS_|SECRET|PASSWORD|TOKEN|ACCESS_KEY")


def quantity(value: Any) -> float:
    number, suffix = _QUANTITY.match(str(value)).groups()
    return float(number) * _SUFFIX[suffix or ""]


def container_violations(container: dict[str, Any], where: str) -> list[str]:
    problems = []
    security = container.get("securityContext") or {}
    if security.get("runAsNonRoot") is not True:
        problems.append(f"{where}: securityContext.runAsNonRoot must be true")
    if security.get("runAsUser") != RAY_UID:
        problems.append(f"{where}: securityContext.runAsUser must be {RAY_UID}")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: securityContext.allowPrivilegeEscalation must be false")
    resources = container.get("resources") or {}
    request = (resources.get("requests") or {}).get("memory")
    limit = (resources.get("limits") or {}).get("memory")
    if request is None or limit is None or quantity(request) != quantity(limit):
        problems.append(f"{where}: memory requests ({request}) must equal limits ({limit})")
    for env in container.get("env") or []:
        # AWS_* (keys, endpoint, region) and anything token- or password-like: Secret refs only.
        if _SECRET_ENV_NAME.search(env["name"]) and (
            "value" in env or "secretKeyRef" not in (env.get("valueFrom") or {})
        ):
            problems.append(f"{where}: env {env['name']} must come from valueFrom.secretKeyRef")
    return problems


def policy_violations(doc: dict[str, Any]) -> list[str]:
    problems = []
    for where, pod in pod_specs(doc):
        for field in ("initContainers", "containers"):
            for container in pod.get(field) or []:
                problems += container_violations(container, f"{where}.{field}[{container.get('name')}]")
    for where, spec in ray_cluster_specs(doc):
        head = spec["headGroupSpec"]
        if (head.get("rayStartParams") or {}).get("num-cpus") != "0":
            problems.append(f"{where}.headGroupSpec.rayStartParams: num-cpus must be \"0\"")
        if (spec.get("authOptions") or {}).get("mode") != "token":
            problems.append(f"{where}.authOptions.mode must be token")
        if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
            problems.append(f"{where}.headGroupSpec: the head (dashboard) must stay on a ClusterIP Service")
        if spec.get("enableInTreeAutoscaling"):
            problems += container_violations(spec.get("autoscalerOptions") or {}, f"{where}.autoscalerOptions")
    if doc.get("kind") == "Service" and (doc.get("spec") or {}).get("type", "ClusterIP") != "ClusterIP":
        problems.append("Service must be ClusterIP")
    if doc.get("kind") == "Secret":
        if "data" in doc:
            problems.append("Secret: use stringData placeholders, not base64 data")
        literal = [k for k, v in (doc.get("stringData") or {}).items() if v != PLACEHOLDER]
        if literal:
            problems.append(f"Secret: {literal} must be {PLACEHOLDER} placeholders")
    return problems


# Shapes of real credentials; the policy above covers env values, this covers any text.
_LITERAL_SECRETS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{40}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*[\"']?[A-Za-z0-9_\-]{16,}"),
]


def literal_secrets(text: str) -> list[str]:
    return [m.group(0) for pattern in _LITERAL_SECRETS for m in pattern.finditer(text)]


# --------------------------------------------------------------------------- tests: inventory


def test_manifests_cover_the_deliverables():
    present = {(doc["kind"], _name(doc)) for _, doc in _manifests()}
    assert {
        ("Namespace", "distcls"),
        ("ServiceAccount", "distcls"),
        ("Secret", "distcls-s3"),
        ("RayCluster", "distcls"),
        ("RayJob", "distcls-train"),
        ("RayJob", "distcls-label"),
        ("RayCronJob", "distcls-nightly-label"),
        ("ServiceAccount", "distcls-rayjob-launcher"),
        ("Role", "distcls-rayjob-launcher"),
        ("RoleBinding", "distcls-rayjob-launcher"),
        ("ConfigMap", "distcls-nightly-label-rayjob"),
        ("CronJob", "distcls-nightly-label"),
        ("RayJob", "distcls-nightly-label-*"),  # inside the ConfigMap
    } <= present
    # Secrets live only in files that say they are examples.
    for path in K8S_DIR.glob("*.yaml"):
        if any(doc.get("kind") == "Secret" for doc in _load_all(path.read_text())):
            assert path.name.endswith(".example.yaml"), path.name


# --------------------------------------------------------------------------- tests: schemas


@needs_schemas
@pytest.mark.parametrize("doc", manifests(*CRD_FILES))
def test_ray_objects_match_strict_kuberay_schema(doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_errors(doc) == []


@needs_schemas
def test_strict_schema_rejects_misspelt_field():
    doc = the("RayJob", "distcls-train")
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]
    head["rayStartParms"] = head.pop("rayStartParams")
    errors = schema_errors(doc)
    assert any("rayStartParms" in e and "$.spec.rayClusterSpec.headGroupSpec" in e for e in errors), errors
    # The CRD as published accepts it (the API server would silently drop the field): the strict
    # rewrite is what catches it.
    assert schema_errors(doc, strict_mode=False) == []


@needs_schemas
def test_strict_schema_rejects_misspelt_field_in_pod_template():
    doc = the("RayCluster", "distcls")
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContex"] = {}
    assert any("securityContex" in e for e in schema_errors(doc))


@needs_schemas
@pytest.mark.parametrize("cpu, ok", [(8, True), ("8", True), ("7500m", True), ("8 cores", False)])
def test_int_or_string_quantities(cpu, ok):
    """Resource quantities are x-kubernetes-int-or-string (no `type`): ints and quantity strings
    pass, other strings fail the pattern."""
    doc = the("RayCluster", "distcls")
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = cpu
    assert (schema_errors(doc) == []) is ok


@needs_schemas
def test_schema_rejects_wrong_type_and_enum():
    doc = the("RayCluster", "distcls")
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    doc["spec"]["authOptions"]["mode"] = "tokens"
    errors = schema_errors(doc)
    assert any("maxReplicas" in e for e in errors) and any("authOptions.mode" in e for e in errors), errors


@pytest.mark.parametrize("doc", [p for p in manifests() if p.values[0]["apiVersion"] != "ray.io/v1"])
def test_core_objects_pass_kubernetes_validate(doc):
    assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validate_rejects_misspelt_field():
    doc = the("CronJob", "distcls-nightly-label")
    doc["spec"]["concurrencyPolicyy"] = doc["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# --------------------------------------------------------------------------- tests: operator rules


@pytest.mark.parametrize("doc", manifests(*CRD_FILES))
def test_operator_rules_hold(doc):
    assert operator_rule_violations(doc) == []


def _drop_cluster_spec(doc):
    doc["spec"].pop("rayClusterSpec")


def _ttl_without_shutdown(doc):
    doc["spec"]["shutdownAfterJobFinishes"] = False


def _min_above_max(doc):
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 9


def _long_rayjob_name(doc):
    doc["metadata"]["name"] = "distcls-" + "x" * 40  # 48 characters


@pytest.mark.parametrize("breakage", [_drop_cluster_spec, _ttl_without_shutdown, _min_above_max, _long_rayjob_name])
def test_operator_rules_catch_broken_rayjob(breakage: Callable[[dict], None]):
    doc = the("RayJob", "distcls-label")
    assert operator_rule_violations(doc) == []
    breakage(doc)
    assert operator_rule_violations(doc)


def test_operator_rules_catch_long_raycronjob_and_generate_names():
    cron = the("RayCronJob", "distcls-nightly-label")
    cron["metadata"]["name"] = "distcls-nightly-label-" + "x" * 15  # 37 characters
    assert operator_rule_violations(cron)
    embedded = the("RayJob", "distcls-nightly-label-")
    embedded["metadata"]["generateName"] = "x" * 43  # + 5 random characters = 48
    assert operator_rule_violations(embedded)


def test_operator_rules_catch_broken_raycronjob_template():
    cron = the("RayCronJob", "distcls-nightly-label")
    cron["spec"]["jobTemplate"]["shutdownAfterJobFinishes"] = False
    assert operator_rule_violations(cron)


# --------------------------------------------------------------------------- tests: policies


@pytest.mark.parametrize("doc", manifests())
def test_policies_hold(doc):
    assert policy_violations(doc) == []


def _container(doc):
    return doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


_POLICY_BREAKAGES = {
    "root user": lambda d: _container(d)["securityContext"].update(runAsUser=0),
    "runAsNonRoot missing": lambda d: _container(d)["securityContext"].pop("runAsNonRoot"),
    "privilege escalation": lambda d: _container(d)["securityContext"].update(allowPrivilegeEscalation=True),
    "memory request < limit": lambda d: _container(d)["resources"]["requests"].update(memory="16Gi"),
    "no memory limit": lambda d: _container(d)["resources"]["limits"].pop("memory"),
    "literal AWS key": lambda d: _container(d).update(
        env=[{"name": "AWS_SECRET_ACCESS_KEY", "value": "not-really-a-key"}]),
    "AWS key from a ConfigMap": lambda d: _container(d).update(
        env=[{"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]),
    "literal Ray token": lambda d: _container(d).update(env=[{"name": "RAY_AUTH_TOKEN", "value": "abc"}]),
    "CPUs on the head": lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": "4"}),
    "token auth off": lambda d: d["spec"].update(authOptions={"mode": "disabled"}),
    "public dashboard": lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
    "ingress": lambda d: d["spec"]["headGroupSpec"].update(enableIngress=True),
    "autoscaler as root": lambda d: d["spec"]["autoscalerOptions"]["securityContext"].update(runAsUser=0),
}


@pytest.mark.parametrize("breakage", list(_POLICY_BREAKAGES.values()), ids=list(_POLICY_BREAKAGES))
def test_policy_checks_catch_broken_raycluster(breakage):
    doc = the("RayCluster", "distcls")
    assert policy_violations(doc) == []
    breakage(doc)
    assert policy_violations(doc)


def test_policy_checks_catch_broken_cronjob_container():
    doc = the("CronJob", "distcls-nightly-label")
    pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    pod["initContainers"][0]["securityContext"] = {"runAsNonRoot": True, "runAsUser": 1000}
    assert any("allowPrivilegeEscalation" in p for p in policy_violations(doc))


def test_policy_checks_catch_filled_in_secret_and_public_service():
    secret = the("Secret", "distcls-s3")
    assert policy_violations(secret) == []
    secret["stringData"]["AWS_SECRET_ACCESS_KEY"] = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert policy_violations(secret)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"},
               "spec": {"type": "NodePort", "ports": [{"port": 8265}]}}
    assert policy_violations(service)


def test_no_literal_secrets_in_any_manifest():
    for path in K8S_DIR.glob("*.yaml"):
        assert literal_secrets(path.read_text()) == [], path.name


def test_literal_secret_scan_finds_planted_credentials():
    planted = (
        "env:\n- {name: X, value: AKIAIOSFODNN7EXAMPLE}\n"
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
        "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        "RAY_AUTH_TOKEN: 0123456789abcdef0123\n"
    )
    assert len(literal_secrets(planted)) == 4
    assert literal_secrets("export RAY_AUTH_TOKEN=$(kubectl get secret distcls ...)") == []


# --------------------------------------------------------------------------- tests: behaviour


def _ray_job_spec_params() -> list[Any]:
    return [
        pytest.param(spec, id=f"{label}:{where}")
        for label, doc in _manifests()
        for where, spec in ray_job_specs(doc)
    ]


@pytest.mark.parametrize("spec", _ray_job_spec_params())
def test_ray_jobs_run_the_cli_from_the_image_and_clean_up(spec):
    entrypoint = spec["entrypoint"]
    assert re.match(r"^(python jobs/(train|label)\.py --config jobs/configs/\S+\.yaml|distcls (train|label)) ", entrypoint)
    assert "pip install" not in entrypoint and "runtimeEnvYAML" not in spec  # code is in the image
    assert re.search(r"--(output|input|data) s3://", entrypoint)
    # Nightly runs must not pile up clusters, nor run forever.
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert 0 < spec["activeDeadlineSeconds"] <= 24 * 3600
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True
    images = [c["image"] for _, pod in pod_specs(spec) for c in pod["containers"]]
    assert images and all(image in (IMAGE, IMAGE + "-gpu") for image in images), images


def test_nightly_schedules_agree():
    cron = the("RayCronJob", "distcls-nightly-label")
    cronjob = the("CronJob", "distcls-nightly-label")
    embedded = the("RayJob", "distcls-nightly-label-")
    assert cron["spec"]["schedule"] == cronjob["spec"]["schedule"]
    assert cron["spec"]["timeZone"] == cronjob["spec"]["timeZone"]
    assert "--incremental" in cron["spec"]["jobTemplate"]["entrypoint"]
    assert cron["spec"]["jobTemplate"] == embedded["spec"]
    raycron_text = (K8S_DIR / "raycronjob-nightly-label.yaml").read_text()
    assert "RayCronJob feature" in raycron_text and "--feature-gates=RayCronJob=true" in raycron_text


def test_cronjob_launcher_has_exactly_the_rbac_it_uses():
    cronjob = the("CronJob", "distcls-nightly-label")
    role = the("Role", "distcls-rayjob-launcher")
    binding = the("RoleBinding", "distcls-rayjob-launcher")
    configmap = the("ConfigMap", "distcls-nightly-label-rayjob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["successfulJobsHistoryLimit"] <= 5 and cronjob["spec"]["failedJobsHistoryLimit"] <= 5
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert [rule["resources"] for rule in role["rules"]] == [["rayjobs"]]
    assert role["rules"][0]["apiGroups"] == ["ray.io"]
    assert set(role["rules"][0]["verbs"]) == {"create", "get", "list", "delete"}
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "distcls"}]
    # The create step reads the RayJob from the mounted ConfigMap.
    create = pod["containers"][0]["command"]
    assert create[0] == "kubectl" and "create" in create
    mounted = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if mounted[m["name"]].get("configMap"))
    assert mounted[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert create[create.index("-f") + 1] == f"{mount['mountPath']}/rayjob.yaml" and "rayjob.yaml" in configmap["data"]
    # The clean-up step only deletes previous runs of this schedule.
    delete = pod["initContainers"][0]["command"]
    embedded = the("RayJob", "distcls-nightly-label-")
    selector = next(arg.split("=", 1)[1] for arg in delete if arg.startswith("--selector="))
    key, value = selector.split("=")
    assert "delete" in delete and embedded["metadata"]["labels"][key] == value
