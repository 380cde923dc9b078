"""The runtime: MoE decoding with experts in host memory, driven by trained estimators.

    import runtime
    engine = runtime.load(model="checkpoints/demo-moe", estimators="checkpoints/demo-estimator-h1",
                          prefetch="hybrid", on_miss="fetch", gpu_expert_budget="25%")
    for token in engine.generate(prompt_ids, max_new_tokens=64):
        ...
    engine.telemetry.summary()

Where the time goes, in reading order: engine.py (the decode loop), offloaded_moe.py
(one MoE layer: routing, prediction, copies, miss policy: the hot path), slots.py
(GPU expert cache), host_store.py, predict.py, cpu_experts.py, telemetry.py, cli.py
(`infer`).
"""

from .build import ModelParts, configure, from_model, load, load_parts, parts_from_model
from .config import RuntimeConfig, load_config
from .engine import Engine, make_sampler

__all__ = ["load", "from_model", "load_parts", "parts_from_model", "configure", "ModelParts", "Engine", "RuntimeConfig", "load_config", "make_sampler"]
