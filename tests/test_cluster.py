"""cluster.yaml against Ray's own cluster-launcher checks, and bootstrapped against a simulated
AWS account (moto server on loopback): no real cloud is contacted."""

import copy
import re
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

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

    # the repository is uploaded and installed with the Ray extra on every node
    remote = [r for r, local in config["file_mounts"].items() if local == "."]
    assert remote, "the project folder is not in file_mounts"
    assert any(remote[0] in cmd and "[ray]" in cmd and "pip install" in cmd for cmd in config["setup_commands"])


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
