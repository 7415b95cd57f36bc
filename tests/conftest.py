"""Shared fixtures: a real S3 server on 127.0.0.1, a real local Ray (one node or several), and
small image lakes (a deterministic CIFAR-10 subset, or synthetic images that need no data)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from faultstore import FaultStore

REPO = Path(__file__).resolve().parents[1]
CIFAR_TARBALL = REPO.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"

# Fake credentials for the moto server. Set before any boto/pyarrow client is made so that
# nothing in the tests can reach a real AWS account.
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-canary-7f3a9",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
})
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("RAY_ADDRESS", None)
# Ray's per-task worker processes inherit this: no usage reporting from tests.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Token authentication stays on in tests, as in production, with one token for this test session
# shared by every Ray it starts (local, multi-node, `ray start --head`). Set before Ray is
# imported: Ray reads the mode once per process.
_TOKEN = Path(tempfile.mkdtemp(prefix="distcls-ray-token-")) / "auth_token"
_TOKEN.write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_TOKEN)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1 (the way s3fs tests itself); exported as AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    os.environ.pop("AWS_ENDPOINT_URL", None)
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A new empty bucket per test."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture()
def fault_store(s3_endpoint: str) -> Iterator[FaultStore]:
    """A fault-injecting proxy in front of the S3 server (faultstore.py); set ``.faults``."""
    with FaultStore(s3_endpoint, stall_s=3) as store:
        yield store


@pytest.fixture(scope="session")
def upload_folder(s3_endpoint: str) -> Callable[[Path, str], str]:
    """upload_folder(local_dir, "bucket/prefix") -> "s3://bucket/prefix", keeping relative paths."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)

    def upload(local: Path, target: str) -> str:
        bucket, _, prefix = target.partition("/")
        for file in sorted(Path(local).rglob("*")):
            if file.is_file():
                key = "/".join(p for p in (prefix, file.relative_to(local).as_posix()) if p)
                client.upload_file(str(file), bucket, key)
        return f"s3://{target}"

    return upload


class _RayMode:
    """One Ray per test process at a time: switching between a single node and a multi-node
    cluster shuts the other down, so tests group by file to keep restarts rare."""

    def __init__(self) -> None:
        self.mode: str | None = None
        self.cluster = None

    def use(self, mode: str) -> None:
        import ray

        if self.mode == mode and ray.is_initialized():
            return
        self.shutdown()
        if mode == "local":
            # "local": never join a Ray left running on this machine (ray_current_cluster).
            # log_to_driver=False, as the CLI's own ray.init (runtime.ensure_ray): with it on, the
            # raylet's "N PYTHON worker processes have been started" warning reached the test's
            # stdout, which a command's JSON summary must have to itself.
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        else:
            from ray.cluster_utils import Cluster

            # Three nodes of one CPU each: the head and two workers, all on this machine.
            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            for _ in range(2):
                self.cluster.add_node(num_cpus=1)
            self.cluster.wait_for_nodes()
            ray.init(address=self.cluster.address, log_to_driver=False)
        self.mode = mode

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        self.mode = None


_RAY = _RayMode()


@pytest.fixture(scope="session", autouse=True)
def _ray_teardown() -> Iterator[None]:
    yield
    _RAY.shutdown()


@pytest.fixture()
def ray_local() -> None:
    """A local single-node Ray with 2 CPUs."""
    _RAY.use("local")


@pytest.fixture()
def no_ray() -> None:
    """This process's Ray stopped: for tests that start a Ray of their own (two on 2 cores compete)."""
    _RAY.shutdown()


@pytest.fixture()
def ray_cluster():
    """Three Ray nodes (1 CPU each) on this machine; yields the ray.cluster_utils.Cluster."""
    _RAY.use("cluster")
    return _RAY.cluster


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """cifar_root(n) -> an ImageFolder lake with the first ``n`` images of every CIFAR-10 class,
    unpacked once per size per session."""
    if not CIFAR_TARBALL.exists():
        pytest.skip(f"shared data not present: {CIFAR_TARBALL}")
    cache: dict[int, Path] = {}

    def build(per_class: int) -> Path:
        if per_class not in cache:
            target = tmp_path_factory.mktemp(f"cifar{per_class}")
            with tarfile.open(CIFAR_TARBALL) as archive:
                members = [m for m in archive.getmembers()
                           if m.isfile() and m.name.endswith(".jpg") and int(Path(m.name).stem) < per_class]
                archive.extractall(target, members=members, filter="data")
            cache[per_class] = target / "train"
        return cache[per_class]

    return build


@pytest.fixture(scope="session")
def synthetic_lake(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """synthetic_lake(per_class, labelled=True, seed=0) -> a lake of drawn shapes (no shared data)."""
    from distcls.synthetic import make_lake

    cache: dict[tuple, Path] = {}

    def build(per_class: int, labelled: bool = True, seed: int = 0) -> Path:
        key = (per_class, labelled, seed)
        if key not in cache:
            root = tmp_path_factory.mktemp("synthetic")
            make_lake(root, per_class, seed=seed, labelled=labelled)
            cache[key] = root
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid (untrained, seeded) simple_cnn artifact over the synthetic classes, for jobs that
    need some model but not a good one."""
    import torch

    from distcls.artifact import ModelInfo, save_model
    from distcls.models import create_model
    from distcls.storage import Store
    from distcls.synthetic import CLASSES

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    info = ModelInfo(arch="simple_cnn", classes=list(CLASSES), image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    save_model(create_model("simple_cnn", num_classes=len(CLASSES)), info, Store(str(folder)))
    return folder


@pytest.fixture(scope="session")
def model_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A briefly trained simple_cnn artifact (confident enough for label comparisons), made once
    per session for every labeling test."""
    from oddfiles import tiny_model as trained_tiny_model

    return trained_tiny_model(tmp_path_factory.getbasetemp() / "label-model")


@pytest.fixture()
def s3_auth(s3_endpoint: str) -> Iterator[dict[str, str]]:
    """Make the moto server check signatures against its IAM users (it accepts any keys by
    default), yielding one user's working keys; the server is shared, so auth is switched off after."""
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_endpoint)
    user = f"user-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]

    def set_free_requests(count: str) -> None:
        request = urllib.request.Request(f"{s3_endpoint}/moto-api/reset-auth", data=count.encode(),
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request).close()

    set_free_requests("0")
    try:
        yield {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        set_free_requests("inf")


@dataclass
class RayHead:
    """A Ray head of a test's own, in its own session: `gcs` is its GCS address (for RAY_ADDRESS),
    `dashboard` its dashboard URL (for job submission)."""

    process: subprocess.Popen
    gcs: str
    dashboard: str
    temp_dir: str

    def stop(self) -> None:
        """Stop everything this head started, and only that: its process group, then whatever is
        left in its session (Ray gives worker processes groups of their own; the fake autoscaler's
        nodes are children of its monitor). Never `ray stop`, which stops every Ray on the machine."""
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)  # a head of this test's own: no need to wait for a graceful stop
        except subprocess.TimeoutExpired:
            pass
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, session = int(stat.parent.name), int(stat.read_text().rpartition(")")[2].split()[3])
            except (OSError, ValueError, IndexError):
                continue
            if session == self.process.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(*args: str, env: dict[str, str] | None = None, gcs_port: int | None = None) -> RayHead:
    """`ray start --head --block` with ``args``, in a new session, on ports nobody else holds. It
    inherits this session's token authentication settings."""
    gcs_port, dashboard_port = gcs_port or free_port(), free_port()
    # The agents' default ports are fixed: another Ray on this machine may hold them already, and
    # a head whose agent cannot bind answers every submission with "No available agent".
    agent_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    # Short and outside pytest's deep tmp path: Ray's unix sockets live under it (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
         f"--port={gcs_port}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
         "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", *agent_ports, *args],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # `python` in a job's entrypoint is the head's: this environment's interpreter, as in the image.
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})})
    return RayHead(process, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", temp_dir)


# The fake multi-node provider's config (Ray's example.yaml is not in the wheel): a head with no
# CPUs and worker types that start at zero nodes, as in cluster/ and k8s/. Its node types cannot
# declare `memory` (the provider passes it on as a custom resource), so the autoscaler cannot
# place demands that reserve memory: tests pass --memory-per-actor 0.
_FAKE_CLUSTER = {
    "cluster_name": "distcls-test", "max_workers": 3, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu": {"resources": {"CPU": 1, "object_store_memory": 150 * 2**20}, "node_config": {},
                "min_workers": 0, "max_workers": 2},
        "gpu": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 150 * 2**20}, "node_config": {},
                "min_workers": 0, "max_workers": 1},
    },
    "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
}


@pytest.fixture(scope="session")
def autoscaling_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray cluster that starts with a 0-CPU head and no worker nodes, whose real autoscaler
    (Ray's fake multi-node provider: real raylets on this machine) adds 1-CPU nodes (up to 2) and
    a 1-CPU + 1-GPU node (up to 1; this machine has no CUDA) on demand. Yields its GCS address.
    Not ray.cluster_utils.AutoscalingCluster: its start() runs `ray stop --force`."""
    _RAY.shutdown()
    gcs_port = free_port()
    config = json.loads(json.dumps(_FAKE_CLUSTER))
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"  # the provider's default is port 6379
    config_file = tmp_path_factory.mktemp("fake-cluster") / "cluster.json"
    config_file.write_text(json.dumps(config))
    head = start_ray_head(f"--autoscaling-config={config_file}", "--num-cpus=0", "--object-store-memory=100000000",
                          env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}, gcs_port=gcs_port)
    try:
        _wait_for_autoscaler(head.gcs)
        yield head.gcs
    finally:
        head.stop()


def _wait_for_autoscaler(gcs: str, timeout: float = 120) -> None:
    """Until the autoscaler has published its first status (what distcls reads to tell an
    autoscaling cluster from a fixed one)."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray._raylet import GcsClient

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            status = GcsClient(address=gcs).internal_kv_get(DEBUG_AUTOSCALING_STATUS.encode(), namespace=None)
            if status and "autoscaler_report" in json.loads(status):
                return
        except Exception:  # the GCS is not up yet
            pass
        time.sleep(1)
    raise AssertionError(f"the fake autoscaler at {gcs} published no status in {timeout:.0f} s")
