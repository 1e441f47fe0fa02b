"""Getting a Ray cluster: attach to a given address, or start a loopback-only local one."""

from posterfusion.cluster.local import (
    ClusterConfig,
    ClusterInfo,
    cpu_budget,
    prepare_environment,
    ray_cluster,
)

__all__ = ["ClusterConfig", "ClusterInfo", "cpu_budget", "prepare_environment", "ray_cluster"]
