"""Run jobs.label on a simulated multi-node Ray cluster and break it while it works.

Used by tests/test_node_failure.py (run as a script, in its own process: it owns the cluster).
A watcher thread follows the run root and, in order:
1. kills a Ray Train worker process once CAM training has a registered checkpoint;
2. removes the worker node running CRF mining (else the CAM network actor) once the first CAM
   shard exists;
3. removes the node running a labelling task (else the IRNet actor) as soon as it sees one
   (synthesis of a few images can write every shard within one state-API call).
The cluster starts with three worker nodes, so one survives (nodes can only be added from the
main thread, which runs the job).
Prints one JSON line with what it did and the run summary.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import threading
import time

import ray
from ray.cluster_utils import Cluster
from support import label_versions  # tests/ is this script's directory

from pipeline.config import load_config
from pipeline.io import layout, storage
from pipeline.orchestrate import run_label

NODE = {"num_cpus": 2, "object_store_memory": 150 * 2**20}


def wait_for(condition, timeout: float = 300.0, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"condition not met in {timeout} s: {condition.__doc__}")


def alive_actors(name_part: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000) if name_part in a.class_name]


class Chaos(threading.Thread):
    def __init__(self, cluster: Cluster, nodes: list, root: str):
        super().__init__(daemon=True)
        self.cluster, self.nodes, self.root = cluster, nodes, root
        self.events: list[str] = []
        self.error: str | None = None

    def remove_node_of(self, node_id: str, what: str) -> None:
        node = next(n for n in self.nodes if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)
        self.events.append(f"removed the node running {what}")

    def run(self) -> None:
        try:
            self.kill_training_worker()
            self.kill_node_during("cams", layout.cams_dir(self.root), "mine_and_write", "CamNetwork")
            self.kill_node_during("synthesis", None, "label_and_write", "IrnNetwork")
        except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
            self.error = f"{type(err).__name__}: {err}"

    def kill_training_worker(self) -> None:
        def registered_checkpoint():
            """a CAM training checkpoint registered by the Ray Train controller"""
            for path in glob.glob(os.path.join(self.root, "models", "cam-*", "checkpoint_manager_snapshot.json")):
                with open(path) as f:
                    if json.load(f).get("checkpoint_results"):
                        return True
            return False

        wait_for(registered_checkpoint)
        worker = alive_actors("RayTrainWorker")[0]
        os.kill(worker.pid, signal.SIGKILL)
        self.events.append(f"killed training worker pid {worker.pid}")

    def kill_node_during(self, stage: str, directory: str | None, task: str, actor: str) -> None:
        """Remove the node running a ``task`` (else the ``actor``) once ``stage`` wrote a shard in
        ``directory``; with no directory, as soon as either is seen (a fast stage may write all its
        shards within one state-API call)."""
        from ray.util.state import list_tasks

        ours = {n.node_id for n in self.nodes}  # the state API still lists a removed node's tasks

        def busy_node():
            """a node running a task or actor of the stage (after its first shard, if it has a directory)"""
            shards = storage.list_files(directory, ".parquet") if directory else []
            if directory and not shards:
                return None
            running = [t.node_id for t in list_tasks(filters=[("state", "=", "RUNNING")], limit=1000)
                       if task in t.name and t.node_id in ours]
            hosts = [a.node_id for a in alive_actors(actor) if a.node_id in ours]
            if running or hosts:
                return len(shards), running, hosts
            if shards:  # after the first shard with nothing running: the stage is over
                raise RuntimeError(f"{stage}: found no {task} task or {actor} actor on a live node")
            return None

        shards, running, hosts = wait_for(busy_node, poll=0.02)
        victim = f"a running {task} task" if running else f"the {actor} actor"
        self.remove_node_of((running or hosts)[0], victim)
        if not directory:
            images = self.labels_images()
            shards = len(storage.list_files(images, ".parquet")) if images else 0
        self.events.append(f"{stage}: {shards} shards written when the node was removed")

    def labels_images(self) -> str | None:
        versions = label_versions(self.root)
        return storage.join(layout.labels_dir(self.root, versions[0]), "images") if versions else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    # A removed node is declared dead after 5 missed 1 s health checks (Ray's default: 5 x 3 s).
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 150 * 2**20,
                                                            "_system_config": health})
    nodes = [cluster.add_node(**NODE) for _ in range(3)]
    cluster.wait_for_nodes()
    cfg = load_config(args.config, args.overrides + [f"ray.address={cluster.address}"])
    ray.init(address=cluster.address)
    chaos = Chaos(cluster, nodes, cfg.run.root)
    chaos.start()
    state = run_label(cfg)
    chaos.join(timeout=5)
    print(json.dumps({"events": chaos.events, "error": chaos.error, "stages": state["stages"]}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
