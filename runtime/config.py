"""Settings of the runtime, one dataclass read from YAML (configs/infer.yaml).

    cfg = load_config("configs/infer.yaml", prefetch="quasi", on_miss="speculate")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from specmoe.config_yaml import load_dataclass_yaml
from specmoe.errors import SpecmoeError
from specmoe.paths import CONFIGS_DIR

from .eviction import POLICIES
from .predict import MODES

DEFAULT_CONFIG_PATH = CONFIGS_DIR / "infer.yaml"
ON_MISS = ("speculate", "fetch", "cpu", "auto")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
CACHE_FILLS = ("prompt", "recent")


@dataclasses.dataclass
class RuntimeConfig:
    model: str | None = None              # hub id or local directory (None: the bundled demo model)
    estimators: str | None = None         # a `train` checkpoint directory (learned / hybrid, default vectors)
    default_vectors: str | None = None    # a complete `trace` directory (quasi without estimators)
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                   # auto keeps the checkpoint's dtype; bf16 | fp16 | fp32
    gpu_expert_budget: str | int = "0"         # bytes, with units (8GiB), or a share of all expert bytes (25%); 0 = minimum
    prefetch: str = "auto"                # none | current | quasi | learned | hybrid | oracle | auto
    on_miss: str = "auto"                 # speculate | fetch | cpu | auto (fetch or cpu: runtime.miss_policy)
    eviction: str = "lru"                 # lru | lfu
    lookahead: int | None = None          # layers ahead; None: the estimator's own (1 without one)
    max_context: int = 4096               # KV cache length (prompt + new tokens)
    cpu_threads: int = 0                  # threads for CPU experts (0: the cores but one; torch's own count kept)
    track_hits: bool = True               # count prediction hits (also in speculate, one router per layer)
    oracle_hit_rate: float = 1.0          # oracle predictor thinned to this recall (benchmarks)
    cuda_graphs: bool = True              # replay decode steps from CUDA graphs (CUDA only)
    compile: bool = True                  # fuse the graphs' pieces with torch.compile (with cuda_graphs)
    compile_mode: str = "default"         # torch.compile mode: default | max-autotune-no-cudagraphs
    device_table: bool = True             # exact decode looks experts up on the device, fixes misses after
    # `cpu`: share of predicted misses copied ahead; None: starts from the measured bandwidths and
    # follows the host during decode (copies of a layer just done when the CPU finishes its misses)
    cpu_copy_share: float | None = None
    # `cpu`: share of a layer's misses copied when its routing is read (the GPU computes them while
    # the CPU computes the others); None: on CUDA starts as cpu_copy_share and follows the host
    cpu_demand_share: float | None = 0.0
    prefetch_window: int = 0              # exact graphed decode: predicted copies in flight at once (0: all)
    # graphed `cpu` decode with nothing copied during decode (no predictor, no demand copies): queue
    # the graphs after a layer behind a gate while the CPU computes its misses (CUDA); with native
    # CPU kernels the whole step is queued and the CPU's parts run on a thread of their own
    run_ahead: bool = True
    # exact decode (graphed, device table): share of a layer's misses the GPU computes by reading their
    # weights in place in host memory over PCIe, beside the CPU (`cpu`) or the copies (`fetch`); None
    # (`auto` on the command line, the default): `cpu` on CUDA measures both channels at start and
    # gives the GPU whole misses by 0.75 of its part (runtime.build.HOST_READ_SHADE); otherwise 0
    host_read_share: float | None = None
    # grouped-query attention under `sdpa`: a decoded token attends with torch's grouped-query
    # kernel, without the copy of the KV cache per query head that the stock path makes
    grouped_attention: bool = True
    # what the GPU's expert slots hold once a prompt has run, when they cannot hold every expert:
    # `prompt`, each layer's experts the prompt used most (the budget shared evenly among layers);
    # `recent`, whatever the prompt's last copies left there (the last layers, whole)
    cache_fill: str = "prompt"

    def validate(self) -> "RuntimeConfig":
        if self.prefetch != "auto" and self.prefetch not in MODES:
            raise SpecmoeError(f"unknown prefetch {self.prefetch!r}; choose one of auto, {', '.join(MODES)}")
        if self.on_miss not in ON_MISS:
            raise SpecmoeError(f"unknown on_miss {self.on_miss!r}; choose one of {', '.join(ON_MISS)}")
        if self.eviction not in POLICIES:
            raise SpecmoeError(f"unknown eviction {self.eviction!r}; choose one of {', '.join(POLICIES)}")
        if self.max_context < 2:
            raise SpecmoeError(f"max_context must be at least 2 (got {self.max_context})")
        if self.lookahead is not None and self.lookahead < 1:
            raise SpecmoeError(f"lookahead must be at least 1 (got {self.lookahead})")
        if self.host_read_share is not None and not (isinstance(self.host_read_share, (int, float))
                                                     and 0.0 <= self.host_read_share <= 1.0):
            raise SpecmoeError(f"host_read_share must be in [0, 1] or auto (got {self.host_read_share})")
        if self.host_read_share and self.on_miss == "speculate":
            raise SpecmoeError("host_read_share applies to exact decode (on_miss fetch or cpu), not speculate")
        for name in ("cpu_copy_share", "cpu_demand_share"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise SpecmoeError(f"{name} must be in [0, 1] (got {value})")
        if self.compile_mode not in COMPILE_MODES:
            raise SpecmoeError(f"unknown compile_mode {self.compile_mode!r}; choose one of {', '.join(COMPILE_MODES)} "
                               "(the runtime captures CUDA graphs itself)")
        if self.prefetch_window < 0:
            raise SpecmoeError(f"prefetch_window must be 0 (no window) or positive (got {self.prefetch_window})")
        if self.cache_fill not in CACHE_FILLS:
            raise SpecmoeError(f"unknown cache_fill {self.cache_fill!r}; choose one of {', '.join(CACHE_FILLS)}")
        if self.cpu_threads < 0:
            raise SpecmoeError("cpu_threads must be 0 (the cores but one) or positive")
        return self

    def resolved_prefetch(self) -> str:
        """`auto`: the estimators' deployed predictors when given, else quasi with default
        vectors from a trace, else the router on the current state (runtime.build.configure
        makes it none where `cpu` decode runs ahead without one, or nothing lies ahead)."""
        if self.prefetch != "auto":
            return self.prefetch
        if self.estimators:
            return "hybrid"
        return "quasi" if self.default_vectors else "current"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, **overrides: Any) -> RuntimeConfig:
    """The YAML at `path` (default: configs/infer.yaml), then `overrides` (None: not given).
    `host_read_share="auto"` stands for the YAML's null, which an override cannot say."""
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    auto = overrides.get("host_read_share") == "auto"
    if auto:
        del overrides["host_read_share"]
    config = load_dataclass_yaml(RuntimeConfig, path, "infer config", **overrides)
    if auto:
        config.host_read_share = None
    return config.validate()
