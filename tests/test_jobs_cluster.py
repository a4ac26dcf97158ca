"""cluster.yaml and the KubeRay manifest, validated offline (no cloud, no Kubernetes)."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from tests.pipeline_helpers import REPO

RAY_VERSION = "2.60.0"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before launching anything
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_the_launcher_schema(cluster):
    prepared = _validate(cluster)
    workers = prepared["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 < workers["max_workers"] <= prepared["max_workers"]
    assert prepared["head_node_type"] == "head"


def test_cluster_yaml_pins_ray(cluster):
    import ray

    assert cluster["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert ray.__version__ == RAY_VERSION
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f"ray[default,tune,data,serve]=={RAY_VERSION}" in pyproject
    assert "ray-ml" not in (REPO / "cluster.yaml").read_text().replace("rayproject/ray-ml is deprecated", "")


def test_the_validation_catches_mistakes(cluster):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_worker"]["resources"] = {"GPU": 0.5}  # resources must be integers
    with pytest.raises(Exception, match="integer"):
        _validate(bad)
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_worker"]["node_config_typo"] = {}
    with pytest.raises(Exception):
        _validate(bad)


def test_kuberay_rayjob_matches_the_pinned_version():
    job = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == RAY_VERSION
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    assert all(RAY_VERSION in c["image"] for c in containers)
    gpu = spec["workerGroupSpecs"][0]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    config = re.search(r"--config (\S+)", job["spec"]["entrypoint"]).group(1)
    assert (REPO / config).is_file()
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in dockerfile


def test_gpu_config_sizes_the_pool_to_the_gpu_workers(cluster):
    from jobs.config import EvalConfig

    cfg = EvalConfig.model_validate(yaml.safe_load((REPO / "jobs/configs/gpu-cluster.yaml").read_text()))
    job = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert cfg.resources.gpus_per_actor == 1
    assert cfg.resources.actors <= cluster["available_node_types"]["gpu_worker"]["max_workers"]
    assert cfg.resources.actors <= job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]
