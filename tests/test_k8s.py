"""Offline checks of what `kubectl apply -k k8s/overlays/example` creates (the kustomize base in
k8s/base rendered through the example overlay, by tests/kustomize_build.py, cross-checked with
`kubectl kustomize` where kubectl exists) and of the example files in k8s/*.yaml:

- ray.io kinds against the KubeRay v1.7 CRD schemas in ../shared/schemas, made strict (an unknown
  field is an error, as kubeconform does), plus the rules the operator only enforces at reconcile
  time (see shared/schemas/README.md);
- core kinds with the `kubernetes_validate` package (bundled schemas, strict mode);
- our own policies: non-root containers, memory requests == limits, S3 credentials only through
  Secret references, token auth on, head with num-cpus "0", nothing published outside the cluster;
- how runs are sized and launched: no hand-set actor counts, nightly runs pass --incremental
  --resume, training uses the CPUs its pods reserve, RayJobs carry deletion rules and deadlines,
  nothing deletes a run, and image, namespace and bucket come from the overlay alone.

Each check is a plain function returning the problems it finds, and has a test that feeds it a
deliberately broken object, so a check that can never fail cannot pass unnoticed.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kustomize_build import UnsupportedKustomization, build, copy_overlay

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "k8s"
BASE = K8S_DIR / "base"
OVERLAY = K8S_DIR / "overlays" / "example"
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
IMAGE_NAME = "ghcr.io/example/distcls"
IMAGE = f"{IMAGE_NAME}:0.1.0"
PLACEHOLDER = "REPLACE_ME"
SETTINGS = "distcls-settings"  # the overlay's ConfigMap; key `bucket`
BUCKET_REF = "$(DISTCLS_BUCKET)"
# Flags that size label/evaluate's inference actor pool (the elastic sizing of issue 13).
ACTOR_FLAGS = {"--min-actors", "--max-actors", "--cpus-per-actor", "--gpus-per-actor", "--memory-per-actor"}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are ~56k lines

needs_schemas = pytest.mark.skipif(
    not SCHEMA_DIR.is_dir(),
    reason=f"KubeRay CRD schemas not found at {SCHEMA_DIR} (the repository must sit beside shared/)",
)


# --------------------------------------------------------------------------- loading manifests


def _load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc]


@functools.cache
def _rendered() -> tuple[dict[str, Any], ...]:
    return tuple(build(OVERLAY))


@functools.cache
def _manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(label, object) for every object the example overlay renders, plus the example files in
    k8s/*.yaml that are applied by hand (the S3 Secret template)."""
    found = [(f"overlays/example:{doc['kind']}/{_name(doc)}", doc) for doc in _rendered()]
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for index, doc in enumerate(_load_all(path.read_text())):
            found.append((f"{path.name}#{index}:{doc.get('kind')}/{_name(doc)}", doc))
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
    raise LookupError(f"no {kind} named {name} in the rendered overlay or k8s/*.yaml")


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
        problems += [f"{where}: {p}" for p in deletion_rule_violations(spec)]
    for where, spec in ray_cluster_specs(doc):
        for group in spec.get("workerGroupSpecs") or []:
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            if low > high:
                problems.append(f"{where} group {group.get('groupName')}: minReplicas {low} > maxReplicas {high}")
    return problems


def deletion_rule_violations(spec: dict[str, Any]) -> list[str]:
    """KubeRay v1.7's checks of deletionStrategy.deletionRules (utils/validation.go): rules exclude
    shutdownAfterJobFinishes and the legacy onSuccess/onFailure; no DeleteWorkers with the
    autoscaler; one rule per (status, policy); per status, TTLs of DeleteWorkers <= DeleteCluster
    <= DeleteSelf."""
    strategy = spec.get("deletionStrategy") or {}
    rules = strategy.get("deletionRules") or []
    if not rules:
        return []
    problems = []
    if spec.get("shutdownAfterJobFinishes"):
        problems.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
    if "onSuccess" in strategy or "onFailure" in strategy:
        problems.append("legacy onSuccess/onFailure and deletionRules are mutually exclusive")
    autoscaling = (spec.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling")
    ttls: dict[str, dict[str, int]] = {}
    for index, rule in enumerate(rules):
        condition = rule.get("condition") or {}
        status = condition.get("jobStatus") or f"deployment:{condition.get('jobDeploymentStatus')}"
        if autoscaling and rule["policy"] == "DeleteWorkers":
            problems.append(f"deletionRules[{index}]: DeleteWorkers is not supported with autoscaling")
        if rule["policy"] in ttls.setdefault(status, {}):
            problems.append(f"deletionRules[{index}]: duplicate rule for {rule['policy']} and {status}")
        ttls[status][rule["policy"]] = condition.get("ttlSeconds", 0)
    for status, by_policy in ttls.items():
        ordered = [by_policy[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in by_policy]
        if ordered != sorted(ordered):
            problems.append(f"{status}: TTLs must grow from DeleteWorkers to DeleteCluster to DeleteSelf")
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


# --------------------------------------------------------------------------- how runs are launched


def containers(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{where}.{field}[{c.get('name')}]", c)
            for where, pod in pod_specs(doc) for field in ("initContainers", "containers")
            for c in pod.get(field) or []]


def _normalized(argv: list[str]) -> list[str]:
    if argv[:1] == ["timeout"]:
        argv = argv[2:]
    words: list[str] = []
    for word in argv:
        words += word.split("=", 1) if word.startswith("--") and "=" in word else [word]
    return words


def distcls_commands(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(where, argv) of every distcls run a manifest starts: a RayJob's entrypoint (also the
    RayCronJob's template), or the words a container hands to `ray job submit` after `--`.
    A leading `timeout DURATION` is dropped and `--flag=value` split, so both forms compare."""
    found = [(f"{where}.entrypoint", shlex.split(spec["entrypoint"]))
             for where, spec in ray_job_specs(doc) if "entrypoint" in spec]
    for where, container in containers(doc):
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        if "submit" in argv and "--" in argv:
            found.append((where, argv[argv.index("--") + 1:]))
    return [(where, _normalized(argv)) for where, argv in found]


def value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def command_kind(argv: list[str]) -> str:
    match = re.match(r"jobs/(\w+)\.py$", argv[1]) if argv[:1] == ["python"] else None
    return match.group(1) if match else (argv[1] if argv[:1] == ["distcls"] else "?")


def sizing_problems(argv: list[str]) -> list[str]:
    """label/evaluate size their actor pool themselves (elastic sizing); a hand-set count would
    pin the pool to a size the autoscaling cluster cannot know in advance."""
    problems = []
    if "--concurrency" in argv:
        problems.append("--concurrency is gone: the actor pool sizes itself (--min-actors/--max-actors)")
    unknown = {w for w in argv if w.startswith("--") and "actor" in w} - ACTOR_FLAGS
    if unknown:
        problems.append(f"unknown actor flags {sorted(unknown)}")
    return problems


def nightly_problems(argv: list[str]) -> list[str]:
    return [f"a nightly run must pass {flag}" for flag in ("--incremental", "--resume") if flag not in argv]


def training_cpu_problems(argv: list[str], cluster: dict[str, Any]) -> list[str]:
    """Ray Train workers must use the CPUs their pods reserve: each worker fits in one pod, and the
    workers fill whole pods (no reserved pod with idle CPUs), within the group's maxReplicas."""
    config = yaml.safe_load((REPO / value(argv, "--config")).read_text()) if "--config" in argv else {}
    workers = int(value(argv, "--workers") or config.get("workers", 2))
    per_worker = int(value(argv, "--cpus-per-worker") or config.get("cpus_per_worker", 1))
    name = "gpu" if "--gpu" in argv else "cpu"
    (group,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == name]
    pod_cpus = quantity(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    problems = []
    ray_cpus = (group.get("rayStartParams") or {}).get("num-cpus")
    if ray_cpus is not None and float(ray_cpus) != pod_cpus:
        problems.append(f"group {name}: rayStartParams num-cpus {ray_cpus} != the pod's {pod_cpus:g} CPUs")
    if pod_cpus % per_worker:
        problems.append(f"--cpus-per-worker {per_worker} does not divide the {name} pods' {pod_cpus:g} CPUs")
    if (workers * per_worker) % pod_cpus:
        problems.append(f"{workers} workers x {per_worker} CPUs leave CPUs of a {pod_cpus:g}-CPU {name} pod idle")
    if workers * per_worker > group["maxReplicas"] * pod_cpus:
        problems.append(f"{workers} workers x {per_worker} CPUs exceed {group['maxReplicas']} {name} pods")
    return problems


def rayjob_lifecycle_problems(spec: dict[str, Any]) -> list[str]:
    """A RayJob with its own cluster must give the cluster back whatever happens: deletion rules
    for success and for every failure (jobDeploymentStatus Failed also covers runs that never got
    to Ray), a deadline for getting the cluster up, and one for the whole run."""
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules") or []
    conditions = {json.dumps(r["condition"].get("jobStatus") or {"deployment": r["condition"].get("jobDeploymentStatus")})
                  for r in rules if r["policy"] == "DeleteCluster"}
    problems = [f"no DeleteCluster rule for {c}" for c in ('"SUCCEEDED"', '{"deployment": "Failed"}')
                if c not in conditions]
    if not any(r["policy"] == "DeleteSelf" for r in rules):
        problems.append("no DeleteSelf rule: finished RayJob objects would pile up")
    active, pre = spec.get("activeDeadlineSeconds"), spec.get("preRunningDeadlineSeconds")
    if not active or active > 24 * 3600:
        problems.append(f"activeDeadlineSeconds must be set, at most a day: {active}")
    if not pre or (active and pre >= active):
        problems.append(f"preRunningDeadlineSeconds must be set, below activeDeadlineSeconds: {pre}")
    return problems


def _has_bucket_env(container: dict[str, Any]) -> bool:
    return any(env["name"] == "DISTCLS_BUCKET"
               and (env.get("valueFrom") or {}).get("configMapKeyRef") == {"name": SETTINGS, "key": "bucket"}
               for env in container.get("env") or [])


def bucket_problems(doc: dict[str, Any]) -> list[str]:
    """Every s3:// URI of a run is under $(DISTCLS_BUCKET), and the container whose command the
    kubelet expands it in (the submitter, for a RayJob) reads it from the overlay's ConfigMap."""
    problems = [f"{where}: {word} does not start with s3://{BUCKET_REF}/"
                for where, argv in distcls_commands(doc) for word in argv
                if "s3://" in word and not word.startswith(f"s3://{BUCKET_REF}/")]
    for where, spec in ray_job_specs(doc):
        if BUCKET_REF in spec.get("entrypoint", ""):
            submitters = ((spec.get("submitterPodTemplate") or {}).get("spec") or {}).get("containers") or []
            if not submitters or not _has_bucket_env(submitters[0]):
                problems.append(f"{where}: the submitter container must take DISTCLS_BUCKET from {SETTINGS}")
    for where, container in containers(doc):
        words = [*(container.get("command") or []), *(container.get("args") or [])]
        if any(BUCKET_REF in w for w in words) and not _has_bucket_env(container):
            problems.append(f"{where}: uses {BUCKET_REF} without env DISTCLS_BUCKET from {SETTINGS}")
    return problems


def deleting_containers(doc: dict[str, Any]) -> list[str]:
    """Nothing a manifest runs may delete objects: a run is never removed while it works."""
    return [where for where, c in containers(doc)
            if "delete" in [*(c.get("command") or []), *(c.get("args") or [])]]


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


_CONCURRENCY = re.compile(r"--concurrency\b|^\s*concurrency\s*:", re.MULTILINE)


def shipped_texts() -> dict[str, str]:
    """What users deploy and run: k8s/, cluster/, the job entrypoints and their configs."""
    paths = [*K8S_DIR.rglob("*.yaml"), *(REPO / "cluster").iterdir(), *(REPO / "jobs" / "configs").iterdir(),
             REPO / "jobs" / "label.py", REPO / "jobs" / "train.py"]
    texts = {str(p.relative_to(REPO)): p.read_text() for p in paths if p.is_file()}
    texts["README.md#Run on a Ray cluster"] = readme_section("Run on a Ray cluster")
    texts["README.md#Run on Kubernetes"] = readme_section("Run on Kubernetes")
    return texts


def rayjob_from(cron: dict[str, Any]) -> dict[str, Any]:
    """The RayJob a RayCronJob creates (what the operator validates at reconcile time)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "distcls-nightly-label-x1"},
            "spec": copy.deepcopy(cron["spec"]["jobTemplate"])}


# --------------------------------------------------------------------------- tests: inventory


def test_manifests_cover_the_deliverables():
    present = {(doc["kind"], _name(doc)) for _, doc in _manifests()}
    assert {
        ("Namespace", "distcls"),
        ("ServiceAccount", "distcls"),
        ("ConfigMap", SETTINGS),
        ("Secret", "distcls-s3"),
        ("RayCluster", "distcls"),
        ("CronJob", "distcls-nightly-label"),
        ("CronJob", "distcls-train"),
        ("RayCronJob", "distcls-nightly-label"),
    } <= present
    # The launchers need no Kubernetes API access, so there is no RBAC to get wrong.
    assert not {kind for kind, _ in present} & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    # Secrets live only in files that say they are examples, never in the kustomize tree.
    assert not any(doc["kind"] == "Secret" for doc in _rendered())
    for path in K8S_DIR.rglob("*.yaml"):
        if any(doc.get("kind") == "Secret" for doc in _load_all(path.read_text())):
            assert path.name.endswith(".example.yaml") and path.parent == K8S_DIR, path


def _canonical(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(doc, sort_keys=True) for doc in docs)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("changes", [{}, {"namespace": "elsewhere", "images": [
    {"name": IMAGE_NAME, "newName": "registry.test/team/distcls", "newTag": "1.2.3"}]}], ids=["example", "changed"])
def test_renderer_agrees_with_kubectl_kustomize(changes, tmp_path):
    overlay = copy_overlay(OVERLAY, tmp_path / "overlay", **changes) if changes else OVERLAY
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True).stdout
    assert _canonical(build(overlay)) == _canonical(_load_all(out))


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    copy_overlay(OVERLAY, tmp_path / "patched", patches=[{"path": "x.yaml"}])
    with pytest.raises(UnsupportedKustomization, match="patches"):
        build(tmp_path / "patched")
    copy_overlay(OVERLAY, tmp_path / "hashed", generatorOptions={})
    with pytest.raises(UnsupportedKustomization, match="hash"):
        build(tmp_path / "hashed")


def test_image_namespace_and_bucket_are_set_in_the_overlay_alone(tmp_path):
    overlay = copy_overlay(OVERLAY, tmp_path / "mine", namespace="ml-batch",
                           images=[{"name": IMAGE_NAME, "newName": "registry.test/team/distcls", "newTag": "9.9.9"}],
                           configMapGenerator=[{"name": SETTINGS, "literals": ["bucket=my-lake-bucket"]}])
    docs = build(overlay)
    text = json.dumps(docs)
    for doc in docs:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == "ml-batch"
        else:
            assert doc["metadata"]["namespace"] == "ml-batch", doc["metadata"]
        for where, container in containers(doc):
            if "distcls" in container["image"]:
                assert re.fullmatch(r"registry\.test/team/distcls:9\.9\.9", container["image"]), (where, container["image"])
    settings = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == SETTINGS]
    assert [d["data"] for d in settings] == [{"bucket": "my-lake-bucket"}]
    # No other copy of the example values survives anywhere (commands, env, URIs, addresses).
    assert "ghcr.io/example" not in text and "example-bucket" not in text
    assert not re.search(r"namespace=distcls|\.distcls\.svc|s3://(?!\$\(DISTCLS_BUCKET\))", text)


def test_base_names_only_placeholders_the_overlay_replaces():
    for path in BASE.glob("*.yaml"):
        for doc in _load_all(path.read_text()):
            if doc["kind"] == "Kustomization":
                continue
            assert doc["metadata"].get("namespace", "distcls") == "distcls", path.name
            for where, container in containers(doc):
                assert re.fullmatch(rf"{re.escape(IMAGE)}(-gpu)?", container["image"]), (path.name, where)
            assert bucket_problems(doc) == [], path.name


def test_bucket_check_catches_a_literal_bucket_and_a_missing_env():
    cronjob = the("CronJob", "distcls-nightly-label")
    assert bucket_problems(cronjob) == []
    args = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    args[args.index(next(a for a in args if a.startswith("--output=")))] = "--output=s3://example-bucket/labels/"
    assert any("does not start with" in p for p in bucket_problems(cronjob))
    cron = the("RayCronJob", "distcls-nightly-label")
    cron["spec"]["jobTemplate"]["submitterPodTemplate"]["spec"]["containers"][0].pop("env")
    assert any("submitter" in p for p in bucket_problems(cron))


# --------------------------------------------------------------------------- tests: schemas


@needs_schemas
@pytest.mark.parametrize("doc", manifests(*CRD_FILES))
def test_ray_objects_match_strict_kuberay_schema(doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_errors(doc) == []


@needs_schemas
def test_strict_schema_rejects_misspelt_field():
    doc = the("RayCronJob", "distcls-nightly-label")
    head = doc["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]
    head["rayStartParms"] = head.pop("rayStartParams")
    errors = schema_errors(doc)
    assert any("rayStartParms" in e and "$.spec.jobTemplate.rayClusterSpec.headGroupSpec" in e for e in errors), errors
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
def test_schema_knows_the_lifecycle_fields_we_use():
    """deletionRules and preRunningDeadlineSeconds exist in the v1.7 schema with these shapes: a
    misspelt policy or condition, or a string deadline, is rejected."""
    doc = the("RayCronJob", "distcls-nightly-label")
    template = doc["spec"]["jobTemplate"]
    assert template["deletionStrategy"]["deletionRules"] and template["preRunningDeadlineSeconds"]
    template["deletionStrategy"]["deletionRules"][0]["policy"] = "DeleteClusterNow"
    template["deletionStrategy"]["deletionRules"][1]["condition"]["jobState"] = "SUCCEEDED"
    template["preRunningDeadlineSeconds"] = "30m"
    errors = schema_errors(doc)
    for field in ("deletionRules[0].policy", "jobState", "preRunningDeadlineSeconds"):
        assert any(field in e for e in errors), (field, errors)


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


def test_the_nightly_rayjob_passes_the_operator_rules():
    assert operator_rule_violations(rayjob_from(the("RayCronJob", "distcls-nightly-label"))) == []


def _drop_cluster_spec(doc):
    doc["spec"].pop("rayClusterSpec")


def _ttl_without_shutdown(doc):
    doc["spec"].pop("deletionStrategy")
    doc["spec"]["ttlSecondsAfterFinished"] = 600


def _rules_with_shutdown(doc):
    doc["spec"]["shutdownAfterJobFinishes"] = True


def _delete_workers_with_autoscaler(doc):
    doc["spec"]["deletionStrategy"]["deletionRules"].append(
        {"policy": "DeleteWorkers", "condition": {"jobStatus": "FAILED", "ttlSeconds": 0}})


def _self_before_cluster(doc):
    doc["spec"]["deletionStrategy"]["deletionRules"][1]["condition"]["ttlSeconds"] = 60


def _min_above_max(doc):
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 9


def _long_rayjob_name(doc):
    doc["metadata"]["name"] = "distcls-" + "x" * 40  # 48 characters


@pytest.mark.parametrize("breakage", [_drop_cluster_spec, _ttl_without_shutdown, _rules_with_shutdown,
                                      _delete_workers_with_autoscaler, _self_before_cluster, _min_above_max,
                                      _long_rayjob_name])
def test_operator_rules_catch_broken_rayjob(breakage: Callable[[dict], None]):
    doc = rayjob_from(the("RayCronJob", "distcls-nightly-label"))
    assert operator_rule_violations(doc) == []
    breakage(doc)
    assert operator_rule_violations(doc)


def test_operator_rules_catch_long_raycronjob_name():
    cron = the("RayCronJob", "distcls-nightly-label")
    cron["metadata"]["name"] = "distcls-nightly-label-" + "x" * 15  # 37 characters
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
    pod["containers"][0]["securityContext"] = {"runAsNonRoot": True, "runAsUser": 1000}
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
    for path in K8S_DIR.rglob("*.yaml"):
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


# --------------------------------------------------------------------------- tests: runs


def _commands() -> list[Any]:
    return [pytest.param(doc, where, argv, id=f"{label}:{where}")
            for label, doc in _manifests() for where, argv in distcls_commands(doc)]


def test_every_run_is_found():
    kinds = sorted((doc["kind"], command_kind(argv)) for _, doc in _manifests() for _, argv in distcls_commands(doc))
    assert kinds == [("CronJob", "label"), ("CronJob", "train"), ("RayCronJob", "label")]


@pytest.mark.parametrize("doc, where, argv", _commands())
def test_runs_use_the_cli_from_the_image_and_size_themselves(doc, where, argv):
    assert argv[:2] in (["python", "jobs/label.py"], ["python", "jobs/train.py"]), argv
    assert (REPO / value(argv, "--config")).is_file()  # shipped in the image under /home/ray/app
    assert "pip" not in argv and "runtimeEnvYAML" not in json.dumps(doc)  # code is in the image
    assert sizing_problems(argv) == []
    if doc["metadata"]["labels"]["app.kubernetes.io/component"] == "nightly-label":
        assert nightly_problems(argv) == []


@pytest.mark.parametrize("argv, expected", [
    ("python jobs/label.py --concurrency 8", "--concurrency is gone"),
    ("python jobs/label.py --actors 8", "unknown actor flags"),
], ids=["concurrency", "misspelt"])
def test_sizing_check_catches_hand_set_pools(argv, expected):
    assert any(expected in p for p in sizing_problems(argv.split()))
    assert sizing_problems("python jobs/label.py --max-actors 16 --cpus-per-actor 2".split()) == []


def test_nightly_check_catches_a_run_that_cannot_resume():
    # The nightly entrypoint as shipped before --resume existed.
    old = "python jobs/label.py --config jobs/configs/nightly_label.yaml --input s3://b/lake/ --incremental"
    assert nightly_problems(old.split()) == ["a nightly run must pass --resume"]


def test_training_uses_the_cpus_its_pods_reserve():
    train = the("CronJob", "distcls-train")
    ((_, argv),) = distcls_commands(train)
    cluster = the("RayCluster", "distcls")["spec"]
    assert training_cpu_problems(argv, cluster) == []
    assert training_cpu_problems([*argv, "--gpu"], cluster) == []


@pytest.mark.parametrize("change, expected", [
    ({"--workers": "4", "--cpus-per-worker": "1"}, "idle"),  # what shipped before: 4 of 8 CPUs used
    ({"--cpus-per-worker": "3"}, "does not divide"),
    ({"--workers": "12"}, "exceed"),
], ids=["half-used-pod", "fragmented", "too-many"])
def test_training_cpu_check_catches_mismatches(change, expected):
    ((_, argv),) = distcls_commands(the("CronJob", "distcls-train"))
    for flag, new in change.items():
        argv[argv.index(flag) + 1] = new
    assert any(expected in p for p in training_cpu_problems(argv, the("RayCluster", "distcls")["spec"]))
    cluster = the("RayCluster", "distcls")["spec"]
    cluster["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = "4"
    ((_, shipped),) = distcls_commands(the("CronJob", "distcls-train"))
    assert any("num-cpus" in p for p in training_cpu_problems(shipped, cluster))


def test_rayjobs_give_their_cluster_back_and_have_deadlines():
    specs = [spec for _, doc in _manifests() for _, spec in ray_job_specs(doc)]
    assert specs
    for spec in specs:
        assert rayjob_lifecycle_problems(spec) == []
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is True


def test_lifecycle_check_catches_the_old_shutdown_only_rayjob():
    spec = the("RayCronJob", "distcls-nightly-label")["spec"]["jobTemplate"]
    del spec["deletionStrategy"], spec["preRunningDeadlineSeconds"]
    spec.update(shutdownAfterJobFinishes=True, ttlSecondsAfterFinished=600)  # what shipped before
    problems = rayjob_lifecycle_problems(spec)
    assert any("SUCCEEDED" in p for p in problems) and any("Failed" in p for p in problems)
    assert any("DeleteSelf" in p for p in problems) and any("preRunning" in p for p in problems)


def test_one_nightly_schedule_is_active_and_both_run_the_same_command():
    cronjob = the("CronJob", "distcls-nightly-label")
    cron = the("RayCronJob", "distcls-nightly-label")
    assert [cronjob["spec"].get("suspend", False), cron["spec"]["suspend"]] == [False, True]
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == (cronjob["spec"]["schedule"], cronjob["spec"]["timeZone"])
    ((_, launched),) = distcls_commands(cronjob)
    ((_, templated),) = distcls_commands(cron)
    assert launched == templated
    # The training template never runs on its own.
    assert the("CronJob", "distcls-train")["spec"]["suspend"] is True
    text = (BASE / "raycronjob-nightly-label.yaml").read_text()
    assert "RayCronJob feature" in text and "--feature-gates=RayCronJob=true" in text


@pytest.mark.parametrize("name", ["distcls-nightly-label", "distcls-train"])
def test_launchers_reach_the_standing_cluster_with_its_token_and_nothing_else(name):
    cronjob = the("CronJob", name)
    cluster = the("RayCluster", "distcls")
    job = cronjob["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"][:3] == ["ray", "job", "submit"]
    assert f"--address=http://{cluster['metadata']['name']}-head-svc:8265" in container["command"]
    token = {e["name"]: e for e in container["env"]}["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}
    # The run's own `timeout` stops it on the cluster before the Job's deadline kills the pod
    # (which alone would leave the Ray job running).
    hours = int(re.fullmatch(r"(\d+)h", container["args"][1]).group(1))
    assert container["args"][0] == "timeout" and 0 < hours * 3600 < job["activeDeadlineSeconds"]
    # A scheduled run never starts beside the previous one (the Job lasts as long as the run).
    assert cronjob["spec"].get("suspend") or cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["successfulJobsHistoryLimit"] <= 5 and cronjob["spec"]["failedJobsHistoryLimit"] <= 5


@pytest.mark.parametrize("doc", manifests())
def test_nothing_deletes_a_run(doc):
    assert deleting_containers(doc) == []


def test_delete_check_catches_the_old_clean_up_step():
    cronjob = the("CronJob", "distcls-nightly-label")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    pod["initContainers"] = [{"name": "delete-previous-run", "image": "registry.k8s.io/kubectl:v1.36.2",
                              "command": ["kubectl", "delete", "rayjobs.ray.io", "--selector=x=y"]}]
    assert deleting_containers(cronjob) == ["spec.jobTemplate.spec.template.spec.initContainers[delete-previous-run]"]


def test_documented_run_now_creates_a_new_job_and_deletes_nothing():
    texts = [readme_section("Run on Kubernetes"), *(p.read_text() for p in K8S_DIR.rglob("*.yaml"))]
    for text in texts:
        assert not re.search(r"kubectl\b[^\n]*\bdelete\b", text), text[:80]
    section = readme_section("Run on Kubernetes")
    assert "kubectl apply -k k8s/overlays/example" in section
    assert re.search(r"kubectl -n \S+ create job --from=cronjob/distcls-nightly-label \S*\$\(date \+%s\)", section)


def test_no_hand_set_concurrency_anywhere():
    texts = shipped_texts()
    assert {"k8s/base/cronjob-nightly-label.yaml", "jobs/configs/nightly_label.yaml", "cluster/aws.yaml"} <= set(texts)
    assert {name: _CONCURRENCY.findall(text) for name, text in texts.items() if _CONCURRENCY.search(text)} == {}
    assert _CONCURRENCY.search("python jobs/label.py --concurrency 8") and _CONCURRENCY.search("concurrency: 8\n")
    assert not _CONCURRENCY.search("concurrencyPolicy: Forbid")
