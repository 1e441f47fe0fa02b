"""``ServeConfig``: everything an operator tunes about the service, and the rules that tie it together.

The serve config YAML's ``args`` (``serving/serve_config.yaml``, the RayService's ``serveConfigV2``)
validate against it; docs/operations.md's table of defaults is generated from it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posterfusion.locations import Location


class ServeConfig(BaseModel):
    """Everything an operator tunes; the serve config YAML's ``args`` validate against this."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: Location = Field(description="model bundle: a directory on every node, or a URI (s3://bucket/models/v3) "
                            "each replica loads it from (downloaded once per node)")
    max_batch_size: int = Field(8, ge=1, le=256, description="most posters one model call takes")
    batch_wait_timeout_s: float = Field(0.02, ge=0, le=5, description="how long a batch waits to fill while other "
                                        "posters are in flight (a poster alone is scored at once)")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0, description="autoscaling target per model replica, "
                                                  ">= max_batch_size; default: max_batch_size")
    upscale_delay_s: float = Field(3.0, ge=0, description="how long the load must stay above the target before "
                                   "a model replica is added (Serve's upscale_delay_s)")
    downscale_delay_s: float = Field(60.0, ge=0, description="how long it must stay below before one is removed "
                                     "(Serve's downscale_delay_s)")
    autoscaling_look_back_s: float = Field(30.0, gt=0, le=600, description="window the ongoing requests are "
                                           "averaged over (Serve's look_back_period_s); the load reaches Serve every "
                                           "third of it, at most every 10 s")
    max_ongoing_requests: int | None = Field(None, ge=1, description="in flight per replica, >= max_batch_size; "
                                             "default: twice max_batch_size, at least 16")
    max_queued_requests: int = Field(64, ge=1, description="queued beyond that → 503")
    rollout_surge_percent: int = Field(25, ge=1, le=100, description="replicas a new model may start beyond the "
                                       "running count, in % of it (at least one): old replicas serve until their "
                                       "replacements are healthy")
    replica_cpus: float = Field(0.5, gt=0)
    replica_gpus: float = Field(0.0, ge=0)
    model_in_ingress: bool = Field(True, description="score in the HTTP ingress replica (one hop); false: a "
                                   "separate PosterModel deployment, so parsing scales apart from the model")
    ingress_cpus: float = Field(0.1, gt=0, description="with model_in_ingress false: each ingress replica's CPUs")
    ingress_replicas: int = Field(1, ge=1, description="with model_in_ingress false: ingress replicas")
    max_upload_bytes: int = Field(8_000_000, ge=1, description="largest poster accepted (413 above)")
    max_pixels: int = Field(16_000_000, ge=1, description="largest poster in pixels (413 above; checked before "
                            "decoding)")
    max_metadata_bytes: int = Field(16_384, ge=2, description="largest metadata JSON (413 above)")
    max_batch_posters: int = Field(32, ge=1, description="most posters in one /v1/predict/batch")
    access_log: bool = Field(False, description="Serve's own log line per request and replica call; the "
                             "project's request metrics count every answer either way")

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.target_ongoing_requests is None:
            self.target_ongoing_requests = float(self.max_batch_size)
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = max(16, 2 * self.max_batch_size)
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        if self.target_ongoing_requests < self.max_batch_size:
            raise ValueError(f"target_ongoing_requests ({self.target_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}): autoscaling would add replicas before a batch can fill")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError("max_replicas must be >= min_replicas and >= 1")
        return self
