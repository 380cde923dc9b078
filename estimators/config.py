"""Settings of the estimator stage, as one dataclass read from YAML.

    cfg = load_config("configs/estimator.yaml", max_steps=200)   # overrides win over the file

Unknown keys and values of the wrong type are refused with a one-line
SpecmoeError, so a typo in the YAML never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from specmoe.config_yaml import load_dataclass_yaml
from specmoe.errors import SpecmoeError
from specmoe.paths import CONFIGS_DIR

DEFAULT_CONFIG_PATH = CONFIGS_DIR / "estimator.yaml"

ACTIVATIONS = ("silu", "gelu", "relu", "tanh")


@dataclasses.dataclass
class EstimatorConfig:
    # --- correction networks (one per target layer)
    width: int | str = "auto"       # hidden width of each correction MLP; "auto": the widest up to
                                    # max_width that keeps the estimator within max_param_share
    max_width: int = 64             # the widest correction MLP "auto" picks
    depth: int = 1                  # hidden layers of each correction MLP
    activation: str = "silu"
    add_shared: bool = False        # quasi state also adds shared_l(s_l) (families with a shared expert)
    routing_features: bool = False  # correction also reads m_l, layer l's routing as a weighted multi-hot [E]
    normed_features: bool = False   # correction also reads s_l = LN_moe_l(r_l)
    max_param_share: float = 0.02   # refuse estimators above this share of the model's expert parameters
    # --- optimisation
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    batch_size: int = 1024          # tokens per training batch (per device)
    eval_batch_size: int = 4096     # tokens per validation / evaluation batch
    max_epochs: int = 5
    max_steps: int = -1             # -1: no step limit
    patience: int = 3               # validations without improvement before early stopping
    min_delta: float = 0.0          # smallest mean-recall gain that counts as improvement
    val_every_steps: int | None = None   # validate every N training steps (None: once per epoch)
    # --- data
    val_fraction: float = 0.1       # share of whole sequences held out for validation
    buffer_mb: int = 512            # host memory for the shuffled group of shards in flight
    num_workers: int = 0            # DataLoader workers
    verify_traces: bool = True      # sha256 every shard before training
    # --- hardware
    device: str = "auto"            # cpu | cuda | auto
    devices: int | str = 1          # GPUs (or CPU processes); "auto" = all visible GPUs; >1 uses DDP
    precision: str = "auto"         # auto: bf16-mixed on GPU, 32 on CPU; or any Lightning precision string
    model_dtype: str = "auto"       # dtype the model is loaded in (only norms/routers are used, in fp32)
    cpu_threads: int = 0            # torch intra-op threads on CPU (0: torch's default)
    seed: int = 0                   # seeds weights, shuffling and splits: same seed, same machine, same result
    deterministic: bool = True      # deterministic kernels (Lightning's Trainer(deterministic=True))
    progress_bar: bool = True       # progress on stderr while training and evaluating (`--quiet` turns it off)

    def validate(self) -> "EstimatorConfig":
        def bad(msg: str) -> SpecmoeError:
            return SpecmoeError(f"estimator config: {msg}")

        if self.width != "auto" and (isinstance(self.width, str) or self.width < 1):
            raise bad(f"width must be a positive int or 'auto' (got {self.width!r})")
        if self.depth < 1 or self.max_width < 1:
            raise bad(f"depth and max_width must be at least 1 (got depth={self.depth}, max_width={self.max_width})")
        if self.activation not in ACTIVATIONS:
            raise bad(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise bad(f"val_fraction must lie strictly between 0 and 1 (got {self.val_fraction})")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise bad("batch_size and eval_batch_size must be positive")
        if self.max_epochs < 1 and self.max_steps < 1:
            raise bad("give max_epochs or max_steps a positive value")
        if self.lr <= 0:
            raise bad(f"lr must be positive (got {self.lr})")
        if self.patience < 1:
            raise bad(f"patience must be at least 1 (got {self.patience})")
        if self.val_every_steps is not None and self.val_every_steps < 1:
            raise bad("val_every_steps must be positive or null")
        if self.device not in ("cpu", "cuda", "auto"):
            raise bad(f"device must be cpu, cuda or auto (got {self.device!r})")
        if not (self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1)):
            raise bad(f"devices must be a positive int or 'auto' (got {self.devices!r})")
        if not 0.0 < self.max_param_share <= 1.0:
            raise bad("max_param_share must lie in (0, 1]")
        if self.cpu_threads < 0:
            raise bad("cpu_threads must be 0 (torch's default) or positive")
        if self.buffer_mb < 1 or self.num_workers < 0:
            raise bad("buffer_mb must be positive and num_workers non-negative")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, **overrides: Any) -> EstimatorConfig:
    """EstimatorConfig from a YAML file (None: configs/estimator.yaml if present, else
    the defaults), then `overrides` (keys whose value is None are ignored)."""
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    return load_dataclass_yaml(EstimatorConfig, path, "estimator config", **overrides).validate()
