"""A real local Ray cluster for the Ray-backend tests: a head (no engine slot) and worker nodes that each
declare one `kvt_slot` (a custom resource standing in for a GPU), all on 127.0.0.1, small (1 CPU, 80 MiB
object store, no dashboard). Skips with the reason when ray is missing or cannot start, unless
KVT_REQUIRE_RAY=1 (CI), where that fails the test."""

from __future__ import annotations

import os
from typing import Any, Optional

import pytest

# Ray maps 127.0.0.1 to the host's outward address unless it believes it is on a laptop: keep every
# node, the GCS and the driver on loopback (nothing leaves this machine)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

SLOT = "kvt_slot"
NODE = dict(num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=80 * 2**20)


def _unavailable(why: str) -> None:
    if os.environ.get("KVT_REQUIRE_RAY") == "1":
        pytest.fail(f"KVT_REQUIRE_RAY=1 but {why}: run `make ray`")
    pytest.skip(why)


class LocalCluster:
    def __init__(self, workers: int = 2):
        try:
            import ray
            from ray.cluster_utils import Cluster
        except ImportError as e:
            _unavailable(f"ray is not installed ({e})")
        self.ray = ray
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args={
                **NODE, "include_dashboard": False,
                "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                                   "health_check_failure_threshold": 3}})
            self.workers: list[Any] = []
            for _ in range(workers):
                self.add_worker()
        except Exception as e:  # noqa: BLE001 - whatever stops Ray from starting here
            _unavailable(f"a local Ray cluster cannot start here: {type(e).__name__}: {e}")

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_worker(self) -> Any:
        n = self.cluster.add_node(**NODE, resources={SLOT: 1})
        self.workers.append(n)
        return n

    def kill_worker(self, node_id: Optional[str] = None) -> None:
        """The node (raylet, its workers) dies at once, as a host losing power would."""
        victim = next((n for n in self.workers if node_id is None or n.node_id == node_id), None)
        assert victim is not None, f"no worker node {node_id}"
        self.cluster.remove_node(victim, allow_graceful=False)
        self.workers.remove(victim)

    def ensure_workers(self, n: int) -> None:
        while len(self.workers) < n:
            self.add_worker()
        self.cluster.wait_for_nodes()

    def shutdown(self) -> None:
        if self.ray.is_initialized():
            self.ray.shutdown()
        self.cluster.shutdown()
