"""cluster.yaml against Ray's own cluster-launcher checks, and bootstrapped against a simulated
AWS account (moto server on loopback): no real cloud is contacted."""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import free_port
from ray_fixtures import stop_process_group

ROOT = Path(__file__).resolve().parent.parent


def load_cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def ray_checks(config: dict) -> dict:
    """What `ray up` does to a config before it talks to the cloud: defaults, docker check, schema."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def test_cluster_yaml_passes_ray_validation():
    config = ray_checks(load_cluster_yaml())
    assert config["provider"]["type"] == "aws"
    assert config["idle_timeout_minutes"] > 0
    assert config["provider"]["cache_stopped_nodes"] is False, "idle GPU nodes must be terminated, not stopped"

    head = config["available_node_types"][config["head_node_type"]]
    assert not head["resources"].get("GPU") and head["max_workers"] == 0
    workers = worker_types(config)
    assert len(workers) >= 2
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert 0 < node_type["max_workers"] <= config["max_workers"], name
        assert node_type["resources"]["GPU"] >= 1, name
        assert "IamInstanceProfile" in node_type["node_config"], f"{name} has no S3 access"
    # a 24 GB class and an 80 GB class
    instance_types = {t["node_config"]["InstanceType"] for t in workers.values()}
    assert any(t.startswith(("g5.", "g6.")) for t in instance_types), instance_types
    assert any(t.startswith(("p4de.", "p5.", "p5e.", "p5en.")) for t in instance_types), instance_types


def test_cluster_yaml_image_and_install_match_the_project():
    config = load_cluster_yaml()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = {re.split(r"[\[=<>]", d)[0]: d for d in pyproject["project"]["optional-dependencies"]["ray"]}
    assert pinned["ray"].endswith(f"=={ray.__version__}"), "pyproject's ray pin and the installed Ray differ"

    image = config["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py3(?P<minor>\d+)-(gpu|cu\d+)", image)
    assert match, f"not a Ray GPU image tag: {image}"
    assert match["ray"] == ray.__version__
    low = re.search(r">=\s*3\.(\d+)", pyproject["project"]["requires-python"])
    assert int(match["minor"]) >= int(low[1])

    # the repository is uploaded and installed on every node with the extras the README's cluster
    # walkthrough runs (the job, and the metrics job), with boto3 and aiobotocore at the versions
    # pyproject pins (together they fix botocore for s3fs)
    remote = [r for r, local in config["file_mounts"].items() if local == "."]
    assert remote, "the project folder is not in file_mounts"
    install = [cmd for cmd in config["setup_commands"]
               if "pip install" in cmd and f'"{remote[0]}[ray,metrics]"' in cmd]
    assert len(install) == 1, config["setup_commands"]
    for pin in pyproject["project"]["optional-dependencies"]["test"]:
        if pin.startswith(("boto3==", "aiobotocore==")):
            assert f'"{pin}"' in install[0], f"cluster.yaml does not install {pin}"


def break_resources(config):
    config["available_node_types"]["gpu.24gb.a10g"]["resources"]["GPU"] = 0.5


def break_top_level_key(config):
    config["idle_timeout_minute"] = config.pop("idle_timeout_minutes")


def break_head_type(config):
    config["head_node_type"] = "ray.head.default"


def break_min_workers(config):
    for node_type in worker_types(config).values():
        node_type["min_workers"] = config["max_workers"]


def break_docker(config):
    del config["docker"]["container_name"]


def break_node_type(config):
    del config["available_node_types"]["gpu.80gb.a100"]["node_config"]


@pytest.mark.parametrize(
    "breakage, error, message",
    [
        (break_resources, ValidationError, "not of type 'integer'"),
        (break_top_level_key, ValidationError, "'idle_timeout_minute' was unexpected"),
        (break_head_type, ValueError, "must be one of `available_node_types`"),
        (break_min_workers, ValueError, "sum of `min_workers`"),
        (break_docker, AssertionError, "container & image name"),
        (break_node_type, ValidationError, "'node_config' is a required property"),
    ],
)
def test_broken_cluster_yaml_fails_validation(breakage, error, message):
    config = load_cluster_yaml()
    breakage(config)
    with pytest.raises(error, match=re.escape(message)):
        ray_checks(config)


def test_cluster_yaml_bootstraps_on_simulated_aws(s3_endpoint, monkeypatch, tmp_path):
    """`ray up`'s AWS bootstrap (resource autodetection, IAM, key pair, subnets, security groups)
    against moto's EC2/IAM: the declared CPU/GPU counts must match the instance types' real ones."""
    import boto3
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("HOME", str(tmp_path))  # the key pair's .pem lands in ~/.ssh
    config = ray_checks(load_cluster_yaml())
    region = config["provider"]["region"]

    # The head's default instance profile, as an earlier `ray up` leaves it (creating it sleeps 30 s).
    iam = boto3.client("iam", region_name=region)
    iam.create_role(RoleName="ray-autoscaler-v1", AssumeRolePolicyDocument="{}")
    iam.create_instance_profile(InstanceProfileName="ray-autoscaler-v1")
    iam.add_role_to_instance_profile(InstanceProfileName="ray-autoscaler-v1", RoleName="ray-autoscaler-v1")

    undeclared = copy.deepcopy(config)
    for node_type in undeclared["available_node_types"].values():
        node_type["resources"] = {}
    detected = AWSNodeProvider.fillout_available_node_types_resources(undeclared)["available_node_types"]
    for name, node_type in worker_types(config).items():
        for resource, count in node_type["resources"].items():
            assert detected[name]["resources"][resource] == count, (name, resource)

    resolved = AWSNodeProvider.bootstrap_config(AWSNodeProvider.fillout_available_node_types_resources(config))
    assert resolved["head_node"]["IamInstanceProfile"]["Arn"].endswith("instance-profile/ray-autoscaler-v1")
    for name, node_type in resolved["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["SubnetIds"] and node_config["SecurityGroupIds"] and node_config["KeyName"], name
    assert Path(resolved["auth"]["ssh_private_key"]).is_file()


# ----------------------------------------------------------------------------- autoscaling, locally


class LocalAutoscalingCluster:
    """A Ray head whose autoscaler adds and removes worker nodes on this machine.

    The provider is Ray's fake multi-node one, as in `ray.cluster_utils.AutoscalingCluster`;
    that class can't be used as is: its config template is missing from the 2.60 wheel, and it
    runs `ray stop --force`, which ends every Ray process on the host. This head gets its own
    ports and temp dir, runs in its own process group, and stopping it signals only that group
    (the fake worker nodes are started by its autoscaler, inside the group).
    """

    def __init__(self, head_cpus: int, worker_node_types: dict, idle_timeout_minutes: float, tmp: Path):
        self.head_cpus = head_cpus
        self.tmp = tmp
        ip = ray._private.services.get_node_ip_address()
        self.address = f"{ip}:{free_port()}"
        self.config = {
            "cluster_name": "sdbatch-autoscaler-test",
            "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
            "provider": {"type": "fake_multinode", "gcs_address": self.address, "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head_cpus, "GPU": 0}, "node_config": {}, "max_workers": 0},
                **worker_node_types,
            },
            "head_node_type": "ray.head.default",
            "auth": {}, "docker": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }
        self.env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled")
        self.env.pop("RAY_ADDRESS", None)
        self.process = self.gcs = None

    def __enter__(self):
        config = self.tmp / "autoscaling.json"
        config.write_text(json.dumps(self.config))
        # a short temp dir: Ray's unix socket paths must stay under ~107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="sdb-as-")
        self.log = open(self.tmp / "head.log", "w")
        port = self.address.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={port}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
             f"--autoscaling-config={config}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--object-store-memory={200 * 2**20}"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            executable=str(Path(sys.executable).parent / "ray"))
        try:
            self.wait_for(lambda: self.alive_nodes(), 60, "the head node to start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        try:
            stop_process_group(self.process, grace_s=30)
        finally:
            self.log.close()
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def alive_nodes(self) -> list[dict[str, float]]:
        """Total resources of each alive node, read from the cluster's GCS."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        if self.process.poll() is not None:
            raise RuntimeError(f"the head exited; see {self.tmp / 'head.log'}")
        try:
            self.gcs = self.gcs or GcsClient(address=self.address)
            nodes = self.gcs.get_all_node_info(timeout=5)
        except Exception:  # GCS not up yet
            self.gcs = None
            return []
        return [dict(n.resources_total) for n in nodes.values() if n.state == GcsNodeInfo.ALIVE]

    def gpu_nodes(self) -> int:
        return sum(1 for n in self.alive_nodes() if n.get("GPU", 0) > 0)

    def wait_for(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.5)


def cluster_limits(cluster: LocalAutoscalingCluster, env: dict, tmp: Path) -> dict | None:
    """What the job's driver, connected to `cluster`, finds the cluster can grow to."""
    result = tmp / "limits.json"
    # into a file: a driver's stdout also carries the autoscaler's event lines
    code = ("import json, pathlib, ray, sdbatch.jobs.common as jobs; ray.init(address=%r, logging_level='ERROR'); "
            "pathlib.Path(%r).write_text(json.dumps(jobs._max_cluster_resources()))" % (cluster.address, str(result)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(result.read_text())


@pytest.mark.autoscaler
@pytest.mark.timeout(300)
def test_job_grows_a_cluster_from_zero_gpu_nodes_and_it_shrinks_back(tiny_safetensors, tmp_path):
    """`--workers auto` on a cluster with no GPU node yet: the job's GPU actors make the
    autoscaler add GPU nodes up to the node type's max (logical GPUs: the model runs on CPU),
    every row is generated once, and the nodes are removed once idle."""
    import pyarrow.parquet as pq

    # the sweep example: 48 rows of 25 steps keep one actor busy long enough for the pool to grow
    prompts = tmp_path / "sweep.parquet"
    subprocess.run([sys.executable, str(ROOT / "jobs/sweep/expand.py"), str(ROOT / "jobs/sweep/spec.yaml"),
                    str(prompts)], check=True, capture_output=True)
    gpu_node = {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 150 * 2**20},
                "node_config": {}, "min_workers": 0, "max_workers": 2}
    with LocalAutoscalingCluster(2, {"gpu.fake": gpu_node}, idle_timeout_minutes=0.2, tmp=tmp_path) as cluster:
        assert cluster.gpu_nodes() == 0
        # `ray up` leaves the cluster's config on the head, where `ray job submit` runs the driver
        home = tmp_path / "home"
        home.mkdir()
        (home / "ray_bootstrap_config.yaml").write_text(json.dumps(cluster.config))
        driver_env = dict(cluster.env, HOME=str(home))
        out = tmp_path / "out"
        job = subprocess.Popen(
            [sys.executable, "-m", "sdbatch.jobs", "run", str(prompts), "--model", str(tiny_safetensors),
             "--output", str(out), "--workers", "auto", "--width", "64", "--height", "64", "--batch-size", "2",
             "--address", cluster.address],
            env=driver_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        most_gpu_nodes = 0
        while job.poll() is None:
            most_gpu_nodes = max(most_gpu_nodes, cluster.gpu_nodes())
            time.sleep(0.5)
        log = job.stdout.read()
        assert job.returncode == 0, log
        assert most_gpu_nodes == gpu_node["max_workers"], f"GPU nodes never exceeded {most_gpu_nodes}\n{log}"

        manifest = pq.read_table(out / "manifest").to_pylist()
        ids = [r["id"] for r in manifest]
        assert len(ids) == len(set(ids)), "a row was recorded twice"
        assert set(ids) == set(pq.read_table(prompts).column("id").to_pylist())
        assert all(Path(r["image"].removeprefix("file://")).is_file() for r in manifest)
        # how the rows spread over the actors depends on when the second node comes up: not asserted

        # the pool's bound: from the head's config file; without one, an autoscaler of unknown reach
        assert cluster_limits(cluster, driver_env, tmp_path)["GPU"] == gpu_node["max_workers"]
        assert cluster_limits(cluster, cluster.env, tmp_path) is None

        cluster.wait_for(lambda: cluster.gpu_nodes() == 0, 120, "the idle GPU nodes to be removed")
