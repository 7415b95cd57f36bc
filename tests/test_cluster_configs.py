"""Offline checks of cluster/: the Ray cluster launcher configs and the image they run.

The launcher configs go through the same preparation `ray up` applies before validating
(`prepare_config`: merge the provider's defaults.yaml, the on-prem node type, per-type worker
bounds) and then Ray's own `validate_config` against the ray-schema.json shipped in the wheel.
Both are offline; the AWS-specific steps that follow in `ray up` (instance-type lookup, IAM, key
pairs, security groups) call AWS and are not run. A fixture makes any network use a test failure.

Every policy check is a function returning the problems it finds, with a test that feeds it a
deliberately broken config, so a check that cannot fail cannot pass unnoticed.
"""
from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import socket
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CONFIGS = ["aws.yaml", "onprem.yaml"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGE = f"ghcr.io/example/distcls:{PYPROJECT['project']['version']}"
RAY_VERSION = "2.60.0"
TORCH_VERSION = "2.14.1"
TORCHVISION_VERSION = "0.29.1"
TOKEN_PATH_IN_CONTAINER = "/home/ray/.ray/auth_token"  # Ray's default path for the `ray` user
SETUP_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
START_KEYS = ("head_start_ray_commands", "worker_start_ray_commands")
RUNTIME_FETCH = re.compile(r"pip3? install|conda install|git clone|github\.com|curl |wget ")
CONSTRAINTS = "cluster/constraints.txt"
# The GPU image's torch build and the oldest NVIDIA driver that runs it (CUDA 13.0: >= 580).
GPU_TORCH_INDEX = "https://download.pytorch.org/whl/cu130"
MIN_DRIVER = 580
CODE_PATHS = ("distcls/", "jobs/", "README.md")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Any socket connection (e.g. boto3 reaching AWS) fails the test instead of leaving the box."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def raw(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def prepared(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` validates: Ray's own preparation, then Ray's own schema validation."""
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def commands(config: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    found = [cmd for key in keys for cmd in config.get(key) or []]
    for node_type in (config.get("available_node_types") or {}).values():
        found += [cmd for key in keys for cmd in node_type.get(key) or []]
    return found


def ray_start_commands(config: dict[str, Any]) -> list[str]:
    return [cmd for cmd in commands(config, START_KEYS) if "ray start" in cmd]


def head_start_commands(config: dict[str, Any]) -> list[str]:
    return [cmd for cmd in config["head_start_ray_commands"] if "ray start" in cmd]


# --------------------------------------------------------------------------- checks


def head_cpu_problems(config: dict[str, Any]) -> list[str]:
    """The head advertises no CPUs, so tasks and actors never land on the control plane."""
    problems = [f"head start command lacks --num-cpus=0: {c}" for c in head_start_commands(config)
                if "--num-cpus=0" not in c.split()]
    head = config["available_node_types"][config["head_node_type"]]
    if config["provider"]["type"] != "local" and head["resources"].get("CPU") != 0:
        problems.append(f"head node type resources must set CPU: 0, got {head['resources']}")
    return problems


def worker_bound_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    for name, node_type in config["available_node_types"].items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if not 0 <= low <= high:
            problems.append(f"{name}: need 0 <= min_workers ({low}) <= max_workers ({high})")
        if name != config["head_node_type"] and high > config["max_workers"]:
            problems.append(f"{name}: max_workers {high} above the global max_workers {config['max_workers']}")
    if config["provider"]["type"] == "local" and config["max_workers"] > len(config["provider"]["worker_ips"]):
        problems.append("on-prem max_workers exceeds the number of worker_ips")
    return problems


def auth_and_dashboard_problems(config: dict[str, Any]) -> list[str]:
    problems = [f"ray start without RAY_AUTH_MODE=token: {c}" for c in ray_start_commands(config)
                if "RAY_AUTH_MODE=token" not in c.split()]
    problems += [f"head dashboard must bind 127.0.0.1 (reach it via `ray dashboard`): {c}"
                 for c in head_start_commands(config) if "--dashboard-host=127.0.0.1" not in c.split()]
    if "-e RAY_AUTH_MODE=token" not in config["docker"].get("run_options", []):
        problems.append("docker run_options must export RAY_AUTH_MODE=token to every process")
    if config.get("file_mounts", {}).get(TOKEN_PATH_IN_CONTAINER) != "~/.ray/auth_token":
        problems.append(f"file_mounts must copy ~/.ray/auth_token to {TOKEN_PATH_IN_CONTAINER}")
    return problems


def runtime_install_problems(config: dict[str, Any]) -> list[str]:
    """Code and packages are baked into the image; nodes must not install or fetch anything."""
    return [f"runs at node start: {c}" for c in commands(config, SETUP_KEYS + START_KEYS) if RUNTIME_FETCH.search(c)]


def image_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    if config["docker"].get("image") != IMAGE:
        problems.append(f"docker.image must be {IMAGE}, got {config['docker'].get('image')}")
    for name, node_type in config["available_node_types"].items():
        worker_image = (node_type.get("docker") or {}).get("worker_image")
        if worker_image not in (None, IMAGE, IMAGE + "-gpu"):
            problems.append(f"{name}: unexpected worker_image {worker_image}")
    return problems


_LITERAL_SECRETS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{40}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"RAY_AUTH_TOKEN\s*[:=]\s*[\"']?[A-Za-z0-9_\-]{16,}"),
]


def literal_secrets(text: str) -> list[str]:
    return [m.group(0) for pattern in _LITERAL_SECRETS for m in pattern.finditer(text)]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    return [(line.split(None, 1)[0].upper(), (line.split(None, 1) + [""])[1]) for line in logical]


def dockerfile_problems(text: str) -> list[str]:
    problems = []
    instructions = dockerfile_instructions(text)
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    for name, want in [("RAY_VERSION", RAY_VERSION), ("TORCH_VERSION", TORCH_VERSION),
                       ("TORCHVISION_VERSION", TORCHVISION_VERSION)]:
        if args.get(name) != want:
            problems.append(f"ARG {name} must default to {want}, got {args.get(name)}")
    base = args.get("BASE_IMAGE", "").replace("${RAY_VERSION}", args.get("RAY_VERSION", ""))
    if not re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py311-cpu", base):
        problems.append(f"default BASE_IMAGE must be rayproject/ray:{RAY_VERSION}-py311-cpu, got {base}")
    if args.get("TORCH_INDEX_URL") != "https://download.pytorch.org/whl/cpu":
        problems.append("the default (CPU) variant must take torch from the CPU wheel index")
    pip_runs = [a for i, a in instructions if i == "RUN" and "pip install" in a]
    for run in pip_runs:
        if "--no-cache-dir" not in run:
            problems.append(f"pip install without --no-cache-dir: {run[:60]}")
        for token in shlex.split(run):
            if re.match(r"^(torch|torchvision)($|[\[<>=!~])", token) and "==" not in token:
                problems.append(f"unpinned {token}")
    if not any(re.search(r"\bpip install\b.*\s\.(\s|&|$)", run) for run in pip_runs):
        problems.append("the package itself (`pip install .`) is not installed at build time")
    copied = " ".join(a for i, a in instructions if i == "COPY")
    problems += [f"{path} not copied into the image" for path in ("pyproject.toml", "distcls/", "jobs/") if path not in copied]
    users = [a for i, a in instructions if i == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image must end as a non-root USER")
    for instruction, arguments in instructions:
        if instruction in ("ENTRYPOINT", "CMD") and RUNTIME_FETCH.search(arguments):
            problems.append(f"{instruction} installs or fetches at run time: {arguments}")
        if instruction in ("RUN", "ADD") and re.search(r"git clone|github\.com|https?://\S+\.(git|zip|tar\.gz)", arguments):
            problems.append(f"{instruction} fetches code from a repository: {arguments[:60]}")
    return problems + layer_problems(instructions)


def _copy_sources(arguments: str) -> list[str]:
    return [a for a in arguments.split() if not a.startswith("--")][:-1]


def layer_problems(instructions: list[tuple[str, str]]) -> list[str]:
    """Dependencies are installed, pinned by the lock, before any code is copied: editing code or
    the README must not invalidate the torch and dependency layers. Only torch's own dependencies
    bring CUDA libraries (no nvidia-*/cuda-* package named here)."""
    problems = []
    copies = [(i, _copy_sources(a)) for i, (kind, a) in enumerate(instructions) if kind == "COPY"]
    lock = [i for i, sources in copies if sources == [CONSTRAINTS]]
    code = [i for i, sources in copies if any(s.rstrip("/") in {p.rstrip("/") for p in CODE_PATHS} for s in sources)]
    if not lock:
        problems.append(f"{CONSTRAINTS} is not copied alone")
    first_code = min(code, default=len(instructions))
    installs = [(i, a) for i, (kind, a) in enumerate(instructions) if kind == "RUN" and "pip install" in a]
    if lock and installs and installs[0][0] < lock[0]:
        problems.append("pip installs before the lock file is copied")
    for i, run in installs:
        if i < first_code and not re.search(r"(--constraint|-c)\s+\S*constraints\.txt", run):
            problems.append(f"dependency install without the lock: {run[:60]}")
        if i > first_code and not re.search(r"pip install\b.*--no-deps", run):
            problems.append(f"installs dependencies after the code is copied (every edit reinstalls them): {run[:60]}")
        for token in shlex.split(run.replace("\\n", " ")):
            if re.match(r"^(nvidia|cuda)[-_]", token):
                problems.append(f"installs a CUDA package by hand: {token}")
    torch_runs = [i for i, run in installs if re.search(r"\btorch==", run)]
    if not torch_runs or torch_runs[0] > first_code:
        problems.append("torch is not installed before the code is copied")
    return problems


def constraints_problems(constraints: str, pyproject: dict[str, Any], dockerfile_args: dict[str, str]) -> list[str]:
    """The lock pins every dependency of pyproject.toml (and boto3) at a version its specifier
    allows, agrees with the Dockerfile's torch/torchvision/Ray pins, and leaves distcls out."""
    problems, pins = [], {}
    for line in constraints.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line.strip())
        if not match:
            problems.append(f"not a name==version pin: {line}")
            continue
        pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    if "distcls" in pins:
        problems.append("the lock pins distcls itself")
    for text in [*pyproject["project"]["dependencies"], "boto3"]:
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name not in pins:
            problems.append(f"{requirement.name} is not pinned")
        elif not requirement.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"{requirement.name}=={pins[name]} does not satisfy pyproject's {requirement.specifier}")
    for name, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION"), ("ray", "RAY_VERSION")):
        if pins.get(name) != dockerfile_args.get(arg):
            problems.append(f"lock pins {name}=={pins.get(name)}, the Dockerfile's {arg} is {dockerfile_args.get(arg)}")
    return problems


def dockerfile_args(text: str) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in dockerfile_instructions(text) if i == "ARG" and "=" in a)


# --------------------------------------------------------------------------- tests: launcher configs


@pytest.mark.parametrize("name", CONFIGS)
def test_launcher_config_passes_rays_preparation_and_schema(name):
    config = prepared(raw(name))
    assert config["cluster_name"].startswith("distcls")
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("name", CONFIGS)
def test_ray_schema_rejects_misspelt_fields(name):
    config = raw(name)
    config["head_start_ray_command"] = config.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_command"):
        prepared(config)
    config = raw(name)
    config["docker"]["pull_befor_run"] = True
    with pytest.raises(jsonschema.ValidationError, match="pull_befor_run"):
        prepared(config)


def test_ray_schema_rejects_misspelt_node_type_field():
    config = raw("aws.yaml")
    config["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        prepared(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_policies_hold(name):
    config = prepared(raw(name))
    assert head_cpu_problems(config) == []
    assert worker_bound_problems(config) == []
    assert auth_and_dashboard_problems(config) == []
    assert runtime_install_problems(config) == []
    assert image_problems(config) == []


def test_aws_node_types_and_iam():
    config = prepared(raw("aws.yaml"))
    types = config["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert types["head"]["max_workers"] == 0  # filled in by Ray's preparation
    assert types["cpu_worker"]["max_workers"] > types["cpu_worker"]["min_workers"] == 0  # autoscales from zero
    assert types["gpu_worker"]["max_workers"] > types["gpu_worker"]["min_workers"] == 0
    assert types["gpu_worker"]["docker"]["worker_image"] == IMAGE + "-gpu"
    assert re.match(r"^(g|p)\d", types["gpu_worker"]["node_config"]["InstanceType"])
    for node_type in types.values():  # S3 through instance profiles, never keys
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), arn
    assert config["provider"]["cache_stopped_nodes"] is False


def test_onprem_uses_the_local_provider():
    config = prepared(raw("onprem.yaml"))
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    (node_type,) = config["available_node_types"].values()
    assert node_type["min_workers"] <= node_type["max_workers"] == len(config["provider"]["worker_ips"])
    # Object-store credentials come from a node-local env file, not from the repository.
    assert "--env-file /etc/distcls/s3.env" in config["docker"]["run_options"]


def test_head_cpu_check_catches_cpus_on_the_head():
    config = prepared(raw("aws.yaml"))
    config["head_start_ray_commands"] = [c.replace(" --num-cpus=0", "") for c in config["head_start_ray_commands"]]
    config["available_node_types"]["head"]["resources"] = {}
    assert len(head_cpu_problems(config)) == 2


def test_worker_bound_check_catches_min_above_max():
    config = prepared(raw("aws.yaml"))
    config["available_node_types"]["gpu_worker"]["min_workers"] = 5
    assert worker_bound_problems(config)
    onprem = prepared(raw("onprem.yaml"))
    onprem["max_workers"] = 10
    assert worker_bound_problems(onprem)


def test_auth_check_catches_open_dashboard_and_missing_token_mode():
    config = prepared(raw("aws.yaml"))
    config["head_start_ray_commands"] = [
        c.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0").replace("RAY_AUTH_MODE=token ", "")
        for c in config["head_start_ray_commands"]
    ]
    config["file_mounts"] = {}
    problems = auth_and_dashboard_problems(config)
    assert any("127.0.0.1" in p for p in problems)
    assert any("without RAY_AUTH_MODE" in p for p in problems)
    assert any("file_mounts" in p for p in problems)


def test_runtime_install_check_catches_rays_own_defaults():
    """Without the explicit empty setup_commands, Ray's AWS defaults would pip-install Ray and
    boto3 on every node at boot: exactly what the check is for."""
    config = raw("aws.yaml")
    for key in SETUP_KEYS:
        config.pop(key)
    problems = runtime_install_problems(prepared(config))
    assert any("pip install" in p for p in problems), problems


def test_no_literal_secrets_in_cluster_files():
    for path in CLUSTER.iterdir():
        assert literal_secrets(path.read_text()) == [], path.name


def test_literal_secret_scan_finds_planted_credentials():
    planted = "AKIAIOSFODNN7EXAMPLE\naws_secret_access_key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    assert len(literal_secrets(planted)) == 2


# --------------------------------------------------------------------------- tests: image


def test_dockerfile_pins_versions_bakes_code_and_runs_as_non_root():
    assert dockerfile_problems((CLUSTER / "Dockerfile").read_text()) == []


def test_dockerfile_pins_agree_with_pyproject():
    dependencies = PYPROJECT["project"]["dependencies"]
    assert f"torch=={TORCH_VERSION}" in dependencies
    assert f"torchvision=={TORCHVISION_VERSION}" in dependencies
    assert any(re.fullmatch(r"ray\[[^]]*\]==2\.60\.\*", d) for d in dependencies)


@pytest.mark.parametrize("breakage, expected", [
    (lambda t: t + "\nUSER root\n", "non-root"),
    (lambda t: t + '\nCMD ["bash", "-c", "pip install -U torch && ray start --head"]\n', "run time"),
    (lambda t: t.replace('"torch==${TORCH_VERSION}"', "torch"), "unpinned torch"),
    (lambda t: t.replace("ARG TORCH_VERSION=2.14.1", "ARG TORCH_VERSION=2.5.0"), "TORCH_VERSION"),
    (lambda t: t.replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.9.0"), "RAY_VERSION"),
    (lambda t: t.replace("py311-cpu", "py311-gpu", 1), "BASE_IMAGE"),
    (lambda t: t.replace("--no-cache-dir", "", 1), "--no-cache-dir"),
    (lambda t: t.replace("COPY --chown=1000:100 jobs/ ./jobs/", ""), "jobs/"),
    (lambda t: t + "\nRUN git clone https://github.com/example/distcls /tmp/x\n", "repository"),
], ids=["root", "pip-at-start", "unpinned", "torch-version", "ray-version", "gpu-default",
        "pip-cache", "no-jobs", "git-clone"])
def test_dockerfile_check_catches_breakage(breakage, expected):
    text = breakage((CLUSTER / "Dockerfile").read_text())
    problems = dockerfile_problems(text)
    assert any(expected in p for p in problems), problems


def test_dockerignore_lets_every_copied_path_through():
    """cluster/Dockerfile.dockerignore is an allow-list; a COPY source missing from it would make
    the build fail (or silently copy an empty tree)."""
    rules = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for instruction, arguments in dockerfile_instructions((CLUSTER / "Dockerfile").read_text()):
        if instruction == "COPY":
            sources = [a for a in arguments.split() if not a.startswith("--")][:-1]
            assert {s.rstrip("/") for s in sources} <= allowed, sources


_CODE_FIRST = "COPY --chown=1000:100 pyproject.toml README.md ./\nCOPY --chown=1000:100 distcls/ ./distcls/\n"


@pytest.mark.parametrize("breakage, expected", [
    # The order shipped before: code (and README) copied, then one pip install of everything.
    (lambda t: t.replace("COPY --chown=1000:100 cluster/constraints.txt /home/ray/constraints.txt\n",
                         "COPY --chown=1000:100 cluster/constraints.txt /home/ray/constraints.txt\n" + _CODE_FIRST),
     "after the code is copied"),
    (lambda t: t.replace("--constraint /home/ray/constraints.txt --index-url", "--index-url"), "without the lock"),
    (lambda t: t.replace("COPY --chown=1000:100 cluster/constraints.txt /home/ray/constraints.txt",
                         "COPY --chown=1000:100 cluster/constraints.txt pyproject.toml /home/ray/"), "copied alone"),
    (lambda t: t.replace('"torchvision==${TORCHVISION_VERSION}"\n',
                         '"torchvision==${TORCHVISION_VERSION}" nvidia-cudnn-cu13\n', 1), "CUDA package"),
], ids=["code-first", "torch-unpinned-deps", "lock-not-alone", "second-cuda"])
def test_dockerfile_layer_check_catches_breakage(breakage, expected):
    text = (CLUSTER / "Dockerfile").read_text()
    assert layer_problems(dockerfile_instructions(text)) == []
    broken = breakage(text)
    assert broken != text
    assert any(expected in p for p in dockerfile_problems(broken)), dockerfile_problems(broken)


def test_lock_agrees_with_pyproject_and_the_dockerfile():
    args = dockerfile_args((CLUSTER / "Dockerfile").read_text())
    assert constraints_problems((REPO / CONSTRAINTS).read_text(), PYPROJECT, args) == []


@pytest.mark.parametrize("breakage, expected", [
    (lambda t: t.replace("torch==2.14.1", "torch==2.13.0"), "TORCH_VERSION"),
    (lambda t: re.sub(r"(?m)^pydantic==.*$", "pydantic==1.10.0", t), "does not satisfy"),
    (lambda t: re.sub(r"(?m)^s3fs==.*\n", "", t), "s3fs is not pinned"),
    (lambda t: t + "distcls==0.1.0\n", "distcls itself"),
    (lambda t: t + "-e /work/main\n", "not a name==version"),
], ids=["torch", "pydantic-range", "missing", "self", "editable"])
def test_lock_check_catches_drift(breakage, expected):
    text = breakage((REPO / CONSTRAINTS).read_text())
    problems = constraints_problems(text, PYPROJECT, dockerfile_args((CLUSTER / "Dockerfile").read_text()))
    assert any(expected in p for p in problems), problems


def test_gpu_image_the_ami_and_the_docs_agree_on_cuda_and_driver():
    """One CUDA build everywhere (torch's cu130 wheels on the CPU base, no CUDA base image), and an
    AMI family whose driver runs it, named with the way to look its id up per region."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    readme = (REPO / "README.md").read_text()
    aws_text = (CLUSTER / "aws.yaml").read_text()
    for name, text in [("Dockerfile", dockerfile), ("README.md", readme)]:
        assert f"TORCH_INDEX_URL={GPU_TORCH_INDEX}" in text, name
        assert not re.search(r"BASE_IMAGE=\S*-(gpu|cu\d+)", text), f"{name}: a CUDA base image ships CUDA twice"
        assert re.search(rf"driver >= {MIN_DRIVER}", text), name
    assert re.search(rf"driver >= {MIN_DRIVER}", aws_text) and "torch 2.14.1+cu130" in aws_text
    assert "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)" in aws_text
    assert "aws ssm get-parameter" in aws_text
    assert "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id" in aws_text
    types = prepared(raw("aws.yaml"))["available_node_types"]
    for name, node_type in types.items():
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", node_type["node_config"]["ImageId"]), name


def _dockerignored(rules: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern decides; a pattern also matches what is under it."""
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        candidates = [path] + [path.rsplit("/", n)[0] for n in range(1, path.count("/") + 1)]
        if any(fnmatch.fnmatchcase(c, pattern) or fnmatch.fnmatchcase(c, pattern.replace("**/", "")) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_ships_code_and_lock_but_no_benchmarks():
    rules = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    shipped = ["pyproject.toml", "README.md", CONSTRAINTS, "distcls/label.py", "jobs/label.py",
               "jobs/configs/nightly_label.yaml"]
    left_out = ["bench/bench_label.py", "bench/bench_scale.py", "cluster/aws.yaml",
                ".venv/bin/python", "tests/test_k8s.py", "distcls/__pycache__/label.cpython-311.pyc"]
    assert [p for p in shipped if _dockerignored(rules, p)] == []
    assert [p for p in left_out if not _dockerignored(rules, p)] == []
    assert (REPO / "bench" / "bench_label.py").exists()  # the paths are real
