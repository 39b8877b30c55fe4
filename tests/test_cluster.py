"""Scale-out: the cluster configs in cluster/ pass Ray's own validation, and `ray job submit` trains on a
real two-node Ray cluster started on this machine with `ray start`, also when a node dies mid-run."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import COMMON, REPO, losses, write_rows

from sftcore.checkpoint import checkpoint_problem, read_trainer_state
from sftcore.config import build_parser

CLUSTER = REPO / "cluster"
RAY = str(Path(sys.executable).parent / "ray")


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_autoscaler_configs_pass_rays_own_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(config))  # what `ray up` runs before it touches the cloud
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}, "the head must take no training or encoding work"
    workers = {name: node for name, node in nodes.items() if name != config["head_node_type"]}
    assert workers and all(node["min_workers"] == 0 and node["max_workers"] >= 1 for node in workers.values())
    setup = " ".join(config["setup_commands"])
    assert "-e ~/sft-trajectory" in setup and config["file_mounts"]["~/sft-trajectory"] == "."
    # checkpoints and data go to a bucket: every worker reaches it with the head's cloud identity
    for node in workers.values():
        identity = node["node_config"].get("IamInstanceProfile") or node["node_config"]["serviceAccounts"][0]
        assert identity in ({"Name": "ray-autoscaler-v1"},) or identity["email"].startswith("ray-autoscaler-sa-v1@")


def test_rayjob_manifest_names_a_valid_entrypoint_and_installs_the_project():
    documents = list(yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text()))
    claim = next(d for d in documents if d["kind"] == "PersistentVolumeClaim")
    job = next(d for d in documents if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and "ReadWriteMany" in claim["spec"]["accessModes"]

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "workflows/train.py"]
    cfg = vars(build_parser().parse_args(argv[2:]))  # exits (fails the test) on an unknown or bad flag
    assert cfg["output_dir"].startswith("/mnt/shared/") and cfg["data_path"].startswith("/mnt/shared/")

    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    project = [r for r in importlib.metadata.requires("sftcore") if "extra ==" not in r]
    needed = {re.split(r"[<>=\[; ]", r)[0] for r in project} - {"ray"}  # the image has Ray
    installed = {d.split(">")[0].split("=")[0] for d in runtime_env["pip"]}
    assert needed <= installed, f"the RayJob would miss {needed - installed}"

    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["rayVersion"] in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    for pod in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        mounts = pod["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in mounts
        assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


# --- a real two-node cluster on this machine ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A head and worker nodes started with `ray start` on loopback, each with its own temp dir and
    ports, so Ray sees separate nodes. Token auth as `ray start --head` sets it up."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.nodes: list[Path] = []

    def _start(self, name: str, *args: str, hide: Path | None = None) -> None:
        """hide: a directory this node sees as an empty tmpfs (its own mount namespace), like a path on
        one machine's local disk that another machine does not have."""
        temp_dir = self.root / name
        command = [RAY, "start", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir)]
        command += ["--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port())]
        command += ["--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port())]
        command += ["--runtime-env-agent-port", str(free_port()), *args]
        if hide is not None:
            mount = f'mount -t tmpfs none {shlex.quote(str(hide))} && exec "$@"'
            command = ["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", mount, "sh", *command]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        self.nodes.append(temp_dir)

    def start_head(self, cpus: int) -> None:
        self._start(
            "head",
            "--head",
            "--port",
            str(self.gcs_port),
            "--num-cpus",
            str(cpus),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
        )

    def add_node(self, cpus: int, hide: Path | None = None) -> Path:
        self._start(f"node{len(self.nodes)}", "--address", self.address, "--num-cpus", str(cpus), hide=hide)
        return self.nodes[-1]

    def wait_for_nodes(self, count: int) -> None:
        script = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
        for _ in range(60):
            done = subprocess.run(
                [sys.executable, "-c", script],
                env={**self.env, "RAY_ADDRESS": self.address},
                capture_output=True,
                text=True,
            )
            if done.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(2)
        raise AssertionError(f"the cluster never had {count} alive nodes: {done.stdout[-500:]} {done.stderr[-500:]}")

    def job(self, command: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, "job", command, "--address", f"http://127.0.0.1:{self.dashboard_port}", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )

    def job_status(self, submission_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, from the job server's API."""
        script = (
            "import sys; from ray.job_submission import JobSubmissionClient; "
            "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)"
        )
        address = f"http://127.0.0.1:{self.dashboard_port}"
        done = subprocess.run(
            [sys.executable, "-c", script, address, submission_id], env=self.env, capture_output=True, text=True
        )
        return done.stdout.strip().splitlines()[-1] if done.returncode == 0 else f"unknown: {done.stderr[-1000:]}"

    def train_worker_nodes(self) -> list[str]:
        """The node id of every Ray Train worker this cluster has run, live or finished."""
        script = (
            "from ray.util.state import list_actors; "
            "print(' '.join(a.node_id for a in list_actors(filters=[('class_name', '=', 'RayTrainWorker')], "
            "detail=True, limit=1000)))"
        )
        env = {**self.env, "RAY_ADDRESS": self.address}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    def kill_node(self, temp_dir: Path) -> None:
        """SIGKILL every process of one node (its raylet, agents and the workers they started), as when
        a machine is lost."""
        pids = {
            int(p)
            for p in subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()
        }
        children = set()
        for pid in pids:
            children |= {
                int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
            }
        for pid in pids | children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        for temp_dir in reversed(self.nodes):
            self.kill_node(temp_dir)


@pytest.fixture
def cluster(tmp_path_factory):
    # Ray's socket paths must stay short: a short root under /tmp, not pytest's deep tmp_path.
    root = Path("/tmp") / f"sftc-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    local = LocalCluster(root)
    try:
        yield local
    finally:
        local.stop()
        shutil.rmtree(root, ignore_errors=True)


def can_unshare_mounts() -> bool:
    probe = ["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", "mount -t tmpfs none /mnt"]
    return shutil.which("unshare") is not None and subprocess.run(probe, capture_output=True).returncode == 0


def submit_command(submission_id: str, output_dir: Path, data: str, model: str, *extra: str, wait=True) -> list[str]:
    train = [sys.executable, "workflows/train.py", "--output_dir", str(output_dir), "--data_path", data]
    train += ["--model_name_or_path", model, "--num-workers", "2", "--per_device_batch_size", "1", *COMMON, *extra]
    submit = ["submit", "--submission-id", submission_id, "--working-dir", "."] + ([] if wait else ["--no-wait"])
    return [*submit, "--", *train]


@pytest.mark.slow
def test_ray_job_submit_trains_on_two_nodes_into_shared_storage(tmp_path, tiny_model, cluster):
    cluster.start_head(cpus=1)
    cluster.add_node(cpus=1)
    cluster.wait_for_nodes(2)
    shared = tmp_path / "shared" / "run"  # one file system, seen by both nodes: shared storage
    data = write_rows(tmp_path / "rows.jsonl", 16)
    args = ("--max_steps", "6", "--save_steps", "2", "--report_to", "none", "--placement_strategy", "STRICT_SPREAD")
    submitted = cluster.job(*submit_command("sft-two-nodes", shared, data, tiny_model, *args))
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-2000:]
    assert "step 6/6" in submitted.stdout  # the driver's and workers' logs streamed back
    assert "ray: joined the cluster at" in submitted.stdout  # joined, did not start its own Ray
    assert cluster.job_status("sft-two-nodes") == "SUCCEEDED"

    nodes = cluster.train_worker_nodes()
    assert len(nodes) == 2 and len(set(nodes)) == 2, f"not one worker per node: {nodes}"
    for name in ("checkpoint-2", "checkpoint-4", "final"):
        assert checkpoint_problem(shared / name) is None, name
    assert sorted(losses(shared)) == [1, 2, 3, 4, 5, 6]
    assert read_trainer_state(shared / "final").step == 6


@pytest.mark.slow
def test_a_node_lost_mid_run_restarts_from_the_last_checkpoint_and_the_job_succeeds(tmp_path, tiny_model, cluster):
    cluster.start_head(cpus=2)
    worker_node = cluster.add_node(cpus=1)
    cluster.wait_for_nodes(2)
    shared = tmp_path / "shared" / "run"
    data = write_rows(tmp_path / "rows.jsonl", 40)
    args = ["--max_steps", "20", "--save_steps", "4", "--report_to", "none", "--max_failures", "1"]
    # SPREAD: one worker per node while both live; after the loss, both fit on the head (2 CPUs).
    args += ["--placement_strategy", "SPREAD", "--cpus_per_worker", "1", "--packing", "false"]
    submitted = cluster.job(*submit_command("sft-node-lost", shared, data, tiny_model, *args, wait=False))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    metrics = shared / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= 6:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(cluster.job("logs", "sft-node-lost").stdout[-4000:])
    cluster.kill_node(worker_node)

    while time.time() < deadline and (status := cluster.job_status("sft-node-lost")) in ("PENDING", "RUNNING"):
        time.sleep(3)
    logs = cluster.job("logs", "sft-node-lost").stdout
    assert status == "SUCCEEDED", status + logs[-6000:]
    assert re.search(r"resumed from \S+/checkpoint-\d+ at step \d+", logs), logs[-6000:]
    assert sorted(losses(shared)) == list(range(1, 21))
    assert read_trainer_state(shared / "final").step == 20
    assert checkpoint_problem(shared / "final") is None


@pytest.mark.slow
@pytest.mark.skipif(not can_unshare_mounts(), reason="needs mount namespaces (root or CAP_SYS_ADMIN)")
def test_a_node_local_output_dir_on_a_multi_node_cluster_is_refused_before_training(tmp_path, tiny_model, cluster):
    node_local = tmp_path / "node-local"  # the second node sees an empty tmpfs here, not the head's files
    node_local.mkdir()
    cluster.start_head(cpus=1)
    cluster.add_node(cpus=1, hide=node_local)
    cluster.wait_for_nodes(2)
    data = write_rows(tmp_path / "rows.jsonl", 8)
    submitted = cluster.job(*submit_command("sft-local-dir", node_local / "run", data, tiny_model, "--max_steps", "2"))
    assert submitted.returncode != 0
    assert cluster.job_status("sft-local-dir") == "FAILED"
    message = r"error: --output_dir \S+ is on this node's disk only: node\(s\) \S+ \(id \w{8}\) of this 2-node cluster"
    assert re.search(message, submitted.stdout), submitted.stdout[-3000:]
    assert "Traceback" not in submitted.stdout
    assert not list((node_local / "run").glob("checkpoint-*")) and not (node_local / "run" / "final").exists()
