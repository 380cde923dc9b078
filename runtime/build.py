"""Assemble an Engine: model skeleton on the device, experts in the host store, slots,
predictor and miss policy, from a RuntimeConfig."""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from specmoe.errors import SpecmoeError

from .budget import slots_for_budget
from .config import RuntimeConfig
from .cpu_experts import CpuExperts
from .engine import Engine
from .expert_layout import ExpertLayout
from .host_store import HostExpertStore
from .offloaded_moe import OffloadedMoE
from .predict import RecordedRouting, build_predictor
from .slots import ExpertSlots
from .streams import Streams
from .telemetry import Telemetry


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SpecmoeError(f"--device {name} needs CUDA, but no GPU is visible (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SpecmoeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def load(config: RuntimeConfig | None = None, *, progress: bool = True, recorded: RecordedRouting | None = None,
         **overrides) -> Engine:
    """An Engine for the model in `config` (a RuntimeConfig; keyword overrides win), loaded
    without materialising its experts: non-expert weights go to the device, experts stream
    from the safetensors files into the host store."""
    from specmoe.skeleton import load_skeleton

    from .config import load_config

    config = config if config is not None else load_config(**overrides)
    if overrides and config is not None:
        config = RuntimeConfig(**{**config.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}).validate()
    device = resolve_device(config.device)
    skeleton = load_skeleton(config.model, device=str(device), dtype=config.dtype, experts="none")
    reader = skeleton.reader
    dtype = skeleton.dtype
    layout = ExpertLayout.from_shapes(reader.expert_shapes(), dtype)

    def source(layer: int, expert: int, out: Mapping[str, torch.Tensor]) -> None:
        reader.expert(layer, expert, dtype=dtype, out=out)

    info = {"model": skeleton.model_id}
    return assemble(skeleton.model, skeleton.family, skeleton.spec, layout, source, config, device,
                    tokenizer=skeleton.tokenizer, progress=progress, recorded=recorded, info=info)


def from_model(model, config: RuntimeConfig, *, tokenizer=None, progress: bool = False,
               recorded: RecordedRouting | None = None) -> Engine:
    """An Engine over a model already loaded with its experts (tests, random-weight benchmarks):
    the experts are copied into the host store and the model's own expert tensors freed."""
    from specmoe.families import detect_family

    family = detect_family(model)
    spec = family.spec(model)
    device = resolve_device(config.device)
    experts0 = family.experts(model, spec.moe_layers[0])
    shapes = {k: tuple(v.shape) for k, v in family.expert_tensors(experts0, 0).items()}
    dtype = next(iter(family.expert_tensors(experts0, 0).values())).dtype
    layout = ExpertLayout.from_shapes(shapes, dtype)

    def source(layer: int, expert: int, out: Mapping[str, torch.Tensor]) -> None:
        for name, t in family.expert_tensors(family.experts(model, layer), expert).items():
            out[name].copy_(t)

    return assemble(model, family, spec, layout, source, config, device, tokenizer=tokenizer, progress=progress,
                    recorded=recorded, fill_then=lambda: _drop_expert_params(model, family, spec), move_model=True)


def _drop_expert_params(model, family, spec) -> None:
    for l in spec.moe_layers:
        experts = family.experts(model, l)
        for name, p in list(experts.named_parameters(recurse=False)):
            setattr(experts, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                      requires_grad=False))


def _move_materialised(model, device: torch.device) -> None:
    # Module.to() refuses meta tensors; the dropped experts stay on meta.
    for t in list(model.parameters()) + list(model.buffers()):
        if not t.is_meta:
            t.data = t.data.to(device)


def assemble(model, family, spec, layout: ExpertLayout, source: Callable, config: RuntimeConfig,
             device: torch.device, *, tokenizer=None, progress: bool = True, recorded=None,
             fill_then: Callable | None = None, move_model: bool = False, info: dict | None = None) -> Engine:
    config.validate()
    streams = Streams(device)
    store = HostExpertStore(layout, spec.moe_layers, spec.num_experts, pin=streams.cuda)
    store.fill(source, progress=progress)
    if fill_then is not None:
        fill_then()
    if move_model:
        _move_materialised(model, device)
    model.eval()

    prefetch = config.resolved_prefetch()
    lookahead = config.lookahead or 1
    if config.estimators and config.lookahead is None:
        from estimators.checkpoint import read_config

        lookahead = int(read_config(config.estimators)["lookahead"])
    predictor = build_predictor(prefetch, model, family, spec, estimators=config.estimators,
                                default_vectors=config.default_vectors, lookahead=lookahead, recorded=recorded,
                                oracle_hit_rate=config.oracle_hit_rate, device=device)
    if predictor is not None:
        lookahead = predictor.lookahead
    if config.on_miss == "speculate" and predictor is None:
        raise SpecmoeError("--on-miss speculate executes predicted experts: choose a predictor with --prefetch "
                           "(current, quasi, learned, hybrid or oracle)")
    free = torch.cuda.mem_get_info(device)[0] if streams.cuda else None
    total = len(spec.moe_layers) * spec.num_experts
    num_slots = slots_for_budget(config.gpu_expert_budget, layout.block_bytes, total, spec.top_k, lookahead,
                                 predictor is not None, free)
    slots = ExpertSlots(layout, num_slots, device, config.eviction)
    telemetry = Telemetry(tuple(spec.moe_layers), device, track_hits=config.track_hits)
    cpu = CpuExperts(family, store, config.cpu_threads or None) if config.on_miss == "cpu" else None
    moe = OffloadedMoE(family, model, spec, store, slots, streams, config.on_miss, predictor, telemetry, cpu)
    max_context = min(config.max_context, spec.max_position_embeddings)
    details = dict(info or {})
    details.update({"family": family.name, "device": str(device), "dtype": str(layout.dtype).replace("torch.", ""),
                    "prefetch": prefetch, "on_miss": config.on_miss, "eviction": config.eviction,
                    "lookahead": lookahead, "gpu_slots": num_slots, "gpu_expert_bytes": slots.nbytes,
                    "expert_block_bytes": layout.block_bytes, "host_expert_bytes": store.nbytes,
                    "total_experts": total})
    return Engine(model, family, spec, moe, streams, telemetry, max_context=max_context, tokenizer=tokenizer,
                  info=details)
