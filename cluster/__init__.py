"""Getting a Ray cluster: attach to a given address, or start a loopback-only local one."""

from posterfusion.cluster.local import (
    LISTING_CPUS,
    ROWS_PER_MODEL_ACTOR,
    ActorPool,
    ClusterConfig,
    ClusterInfo,
    actor_pool,
    cpu_budget,
    model_actors,
    node_cpus,
    prepare_environment,
    ray_cluster,
)

__all__ = [
    "LISTING_CPUS",
    "ROWS_PER_MODEL_ACTOR",
    "ActorPool",
    "ClusterConfig",
    "ClusterInfo",
    "actor_pool",
    "cpu_budget",
    "model_actors",
    "node_cpus",
    "prepare_environment",
    "ray_cluster",
]
