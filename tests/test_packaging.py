"""cluster.yaml passes Ray's own validation; the Dockerfile installs from what the repo has."""

import copy
import pathlib
import re

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_autoscaler_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert {"head", "gpu_worker", "cpu_worker"} <= set(types)
    assert types["head"]["resources"] == {"CPU": 0}
    assert prepared["docker"]["image"] and "~/irn-ray" in prepared["file_mounts"]
    assert "--dashboard-host=127.0.0.1" in " ".join(prepared["head_start_ray_commands"])


def test_dockerfile_copies_existing_files_and_installs_requirements():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install .*-r requirements\.txt", text)
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", text, flags=re.M)
    assert copies
    for line in copies:
        for source in line.split():
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repo"
    assert "pytest" in text and "test_purity" in text
