"""Assemble an Engine: model skeleton on the device, experts in the host store, slots,
predictor and miss policy, from a RuntimeConfig."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from specmoe.errors import SpecmoeError
from specmoe.paths import display_path

from .budget import slots_for_budget
from .config import RuntimeConfig
from .cpu_experts import CpuExperts
from .decode_attention import use_grouped_decode_attention
from .engine import Engine
from .expert_layout import ExpertLayout
from .host_store import HostExpertStore
from .miss_policy import choose_on_miss, cpu_runs_ahead_without_prediction, expected_misses
from .offloaded_moe import OffloadedMoE
from .predict import RecordedRouting, build_predictor, lookahead_of
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


@dataclasses.dataclass
class ModelParts:
    """What every mode of one model shares: the model skeleton on the device and the host store."""

    model: object
    family: object
    spec: object
    store: HostExpertStore
    device: torch.device
    tokenizer: object = None
    info: dict = dataclasses.field(default_factory=dict)


def load(config: RuntimeConfig | None = None, *, progress: bool = True, recorded: RecordedRouting | None = None,
         **overrides) -> Engine:
    """An Engine for the model in `config` (a RuntimeConfig; keyword overrides win), loaded
    without materialising its experts: non-expert weights go to the device, experts stream
    from the safetensors files into the host store."""
    from .config import load_config

    if config is None:
        config = load_config(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None}).validate()
    return configure(load_parts(config, progress=progress), config, recorded=recorded)


def load_parts(config: RuntimeConfig, progress: bool = True) -> ModelParts:
    from specmoe.skeleton import load_skeleton

    config.validate()
    device = resolve_device(config.device)
    skeleton = load_skeleton(config.model, device=str(device), dtype=config.dtype, experts="none")
    reader = skeleton.reader
    dtype = skeleton.dtype
    layout = ExpertLayout.from_shapes(reader.expert_shapes(), dtype)
    store = HostExpertStore(layout, skeleton.spec.moe_layers, skeleton.spec.num_experts, pin=device.type == "cuda")

    def source(layer: int, expert: int, out: Mapping[str, torch.Tensor]) -> None:
        reader.expert(layer, expert, dtype=dtype, out=out)

    store.fill(source, progress=progress)
    skeleton.model.eval()
    return ModelParts(skeleton.model, skeleton.family, skeleton.spec, store, device, skeleton.tokenizer,
                      {"model": display_path(reader.path)})


def from_model(model, config: RuntimeConfig, *, tokenizer=None, progress: bool = False,
               recorded: RecordedRouting | None = None) -> Engine:
    """An Engine over a model already loaded with its experts (tests, random-weight benchmarks):
    the experts are copied into the host store and the model's own expert tensors freed."""
    return configure(parts_from_model(model, config, tokenizer=tokenizer, progress=progress), config,
                     recorded=recorded)


def parts_from_model(model, config: RuntimeConfig, *, tokenizer=None, progress: bool = False) -> ModelParts:
    from specmoe.families import detect_family

    config.validate()
    family = detect_family(model)
    spec = family.spec(model)
    device = resolve_device(config.device)
    first = family.expert_tensors(family.experts(model, spec.moe_layers[0]), 0)
    layout = ExpertLayout.from_shapes({k: tuple(v.shape) for k, v in first.items()},
                                      next(iter(first.values())).dtype)
    store = HostExpertStore(layout, spec.moe_layers, spec.num_experts, pin=device.type == "cuda")

    def source(layer: int, expert: int, out: Mapping[str, torch.Tensor]) -> None:
        for name, t in family.expert_tensors(family.experts(model, layer), expert).items():
            out[name].copy_(t)

    store.fill(source, progress=progress)
    _drop_expert_params(model, family, spec)
    _move_materialised(model, device)
    model.eval()
    return ModelParts(model, family, spec, store, device, tokenizer, {"model": type(model).__name__})


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


def configure(parts: ModelParts, config: RuntimeConfig, *, recorded: RecordedRouting | None = None,
              predictor=None) -> Engine:
    """An Engine running `parts` in the mode `config` asks for (prefetch, miss policy, budget).
    `predictor` (a runtime.predict.RuntimePredictor) replaces the one `config.prefetch` names."""
    config.validate()
    model, family, spec, store, device = parts.model, parts.family, parts.spec, parts.store, parts.device
    layout = store.layout
    use_grouped_decode_attention(model, config.grouped_attention)
    streams = Streams(device)
    free = torch.cuda.mem_get_info(device)[0] if streams.cuda else None
    total = len(spec.moe_layers) * spec.num_experts
    telemetry = Telemetry(tuple(spec.moe_layers), device, track_hits=config.track_hits)
    cpu = CpuExperts(family, store, config.cpu_threads or None, telemetry) if config.on_miss == "cpu" else None
    measured = None   # (copy, CPU expert) bytes per second, measured once for whatever needs them
    auto_reason = None
    if config.on_miss == "auto":
        config, cpu, measured, auto_reason = _resolve_on_miss(config, parts, streams, telemetry, total, free)
    prefetch = config.resolved_prefetch()
    lookahead = lookahead_of(config)
    if config.prefetch == "auto" and len(spec.moe_layers) <= lookahead:
        prefetch = "none"  # nothing lies `lookahead` MoE layers ahead of any layer
    if config.prefetch == "auto" and predictor is None and cpu_runs_ahead_without_prediction(config, streams.cuda):
        # A predictor's copies would cost `cpu` its run-ahead step: on the H200 machine, model A at
        # a quarter of its experts on the GPU decoded in 32.4 ms with none, 45.3 with predictions
        # at 85% recall (benchmarks/results/runtime_decode.md).
        prefetch = "none"
    if predictor is None:
        predictor = build_predictor(prefetch, model, family, spec, estimators=config.estimators,
                                    default_vectors=config.default_vectors, lookahead=lookahead, recorded=recorded,
                                    oracle_hit_rate=config.oracle_hit_rate, device=device)
    if predictor is not None:
        lookahead = predictor.lookahead
    if config.on_miss == "speculate" and predictor is None:
        raise SpecmoeError("--on-miss speculate executes predicted experts: choose a predictor with --prefetch "
                           "(current, quasi, learned, hybrid or oracle)")
    num_slots = slots_for_budget(config.gpu_expert_budget, layout.block_bytes, total, spec.top_k, lookahead,
                                 predictor is not None, free)
    slots = ExpertSlots(layout, num_slots, device, config.eviction)
    moe = OffloadedMoE(family, model, spec, store, slots, streams, config.on_miss, predictor, telemetry, cpu)
    moe.device_table = config.device_table
    moe.copy_window = config.prefetch_window
    moe.cache_fill = config.cache_fill
    if cpu is not None:
        # A share set to None starts at the measured split and follows the host during decode
        # (CUDA only; on a CPU a copy is a memcpy: predictions are all copied, misses computed).
        adapt = streams.cuda and None in (config.cpu_copy_share, config.cpu_demand_share)
        if adapt and measured is None:
            measured = _channel_rates(cpu, model, family, spec, store, device)
        split = measured[0] / (measured[0] + measured[1]) if adapt else None
        for name, off_cuda in (("cpu_copy_share", 1.0), ("cpu_demand_share", 0.0)):
            value = getattr(config, name)
            setattr(moe, name, value if value is not None else split if streams.cuda else off_cuda)
        moe.adapt_copy_share = config.cpu_copy_share is None and streams.cuda
        moe.adapt_demand_share = config.cpu_demand_share is None and streams.cuda
    host_read_measured = None
    if config.host_read_share is None and cpu is not None and streams.cuda and config.device_table:
        host_read_measured = _host_read_split(moe, device)
        moe.set_host_reads(HOST_READ_SHADE * host_read_measured, whole=True)
    elif config.host_read_share:
        if not config.device_table:
            raise SpecmoeError("host_read_share needs the device table (device_table: true)")
        moe.set_host_reads(config.host_read_share)
    if num_slots >= total:
        moe.preload_all()  # a budget that holds every expert: nothing is ever copied again
    max_context = min(config.max_context, spec.max_position_embeddings)
    info = dict(parts.info)
    info.update({"family": family.name, "device": str(device), "dtype": str(layout.dtype).replace("torch.", ""),
                 "prefetch": prefetch, "on_miss": config.on_miss, "eviction": config.eviction,
                 "on_miss_auto": auto_reason,
                 # measured at start where a choice needed them: copies to the GPU, CPU experts
                 "copy_bytes_per_s": measured[0] if measured else None,
                 "cpu_expert_bytes_per_s": measured[1] if measured else None,
                 "lookahead": lookahead, "gpu_expert_budget": config.gpu_expert_budget, "gpu_slots": num_slots,
                 "gpu_expert_bytes": slots.nbytes, "expert_block_bytes": layout.block_bytes,
                 "host_expert_bytes": store.nbytes, "total_experts": total, "device_table": config.device_table,
                 "compile": config.compile and streams.cuda and config.cuda_graphs,
                 "prefetch_window": config.prefetch_window, "host_read_share": moe.host_read_share,
                 "host_read_measured": host_read_measured,
                 "cache_fill": config.cache_fill,
                 "cpu_copy_share": moe.cpu_copy_share if cpu is not None else None,
                 "cpu_demand_share": moe.cpu_demand_share if cpu is not None else None})
    engine = Engine(model, family, spec, moe, streams, telemetry, max_context=max_context,
                    tokenizer=parts.tokenizer, info=info)
    engine.parts, engine.config = parts, config
    engine.use_graphs = streams.cuda and config.cuda_graphs
    engine.compile = engine.use_graphs and config.compile
    engine.compile_mode = config.compile_mode
    engine.run_ahead = config.run_ahead
    return engine


def _resolve_on_miss(config: RuntimeConfig, parts: ModelParts, streams: Streams, telemetry, total: int, free):
    """`on_miss: auto` made `fetch` or `cpu` (runtime.miss_policy); returns the config with it, the
    CPU experts (`cpu`), the measured (copy, CPU expert) rates or None, and why. Decided before
    the predictor: the misses a layer can expect depend on the budget's share only."""
    spec, store, layout = parts.spec, parts.store, parts.store.layout
    share = slots_for_budget(config.gpu_expert_budget, layout.block_bytes, total, spec.top_k, lookahead_of(config),
                             False, free)
    cpu = measured = None
    if streams.cuda and share < total:
        cpu = CpuExperts(parts.family, store, config.cpu_threads or None, telemetry)
        measured = _channel_rates(cpu, parts.model, parts.family, spec, store, parts.device)
    choice = choose_on_miss(cuda=streams.cuda, holds_every_expert=share >= total,
                            misses_per_layer=expected_misses(spec.top_k, share, total),
                            expert_bytes=layout.block_bytes, copy_bytes_per_s=measured and measured[0],
                            cpu_bytes_per_s=measured and measured[1])
    return (dataclasses.replace(config, on_miss=choice.on_miss), cpu if choice.on_miss == "cpu" else None,
            measured, choice.reason)


def _cpu_call(cpu, experts_of, spec, store):
    """A call of the CPU experts as decode makes it (8 experts of one token), on another layer
    each time so that weights come from memory, as misses' do; and how many experts it computes.
    `experts_of(layer)`: the layer's experts module."""
    layers = spec.moe_layers
    n = min(8, spec.num_experts)
    x = torch.randn((1, spec.hidden_size)).to(store.layout.dtype)
    work = [(0, e, 1.0) for e in range(n)]
    turn = [0]

    def call():
        layer = layers[turn[0] % len(layers)]
        turn[0] += 1
        cpu.compute(experts_of(layer), layer, x, work)

    return call, n


def _channel_rates(cpu, model, family, spec, store, device: torch.device) -> tuple[float, float]:
    """Bytes per second of the two ways a miss is served, measured now on the store: copies to
    the GPU, and the CPU computing experts where they lie."""
    import statistics
    import time

    from .bench import copy_bandwidth

    copy_bw = copy_bandwidth(device, 32 << 20, 4)
    call, n = _cpu_call(cpu, lambda l: getattr(family.moe_block(model, l), family.experts_attr), spec, store)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    cpu.seconds = 0.0
    if cpu.telemetry is not None:
        cpu.telemetry.cpu_expert_seconds = 0.0
    return copy_bw, n * store.layout.block_bytes / statistics.median(times[1:])


# `host_read_share: auto` gives the GPU this much of its measured part. Measured at start on
# 8-expert calls, the part came to 0.31-0.43 in one run on the H200 machine (0.33 typically),
# and 0.43 decoded model A slower than no reads at all (38.0 against 36.4 ms at the minimum
# budget; 0.33: 31.2): inside a decode step the GPU's reads share the link and the host's
# memory with more than the measurement saw. 0.75 of the usual part is the fixed 0.25 that
# decoded fastest in every measured row (benchmarks/results/default_modes.md, runtime_decode.md).
HOST_READ_SHADE = 0.75


def _host_read_split(moe, device: torch.device) -> float:
    """The GPU's part of the two channels' rate when both run at once: the GPU reading experts
    in host memory over PCIe and the CPU computing others, measured now on the store."""
    from .bench import host_reads_beside_cpu

    call, n = _cpu_call(moe.cpu, moe._experts.__getitem__, moe.spec, moe.store)
    layer = moe.spec.moe_layers[0]
    rates = host_reads_beside_cpu(moe.store, moe.family, moe._experts[layer], moe.spec.hidden_size, call,
                                  n * moe.store.layout.tensor_bytes, device, calls=4, rounds=3)
    moe.cpu.seconds = moe.telemetry.cpu_expert_seconds = 0.0
    gpu, cpu = rates.get("with_cpu_gpu_read_bytes_per_s"), rates.get("with_cpu_cpu_expert_bytes_per_s")
    if not gpu or not cpu:
        return 0.0
    return gpu / (gpu + cpu)


def parts_random(hf_config, config: RuntimeConfig, *, seed: int = 0, distinct_experts: int = 64,
                 progress: bool = True, embedding_std: float | None = None) -> ModelParts:
    """A model of `hf_config`'s shape with random weights, built without ever holding its experts
    twice: non-expert weights are drawn on the device, the host store is filled from a pool of
    `distinct_experts` random experts. For benchmarks of shapes whose checkpoints cannot be had.

    `embedding_std` draws the token embeddings wider than the other weights. With every weight
    at the config's initializer_range, the residual stream of deep layers is dominated by
    attention averages that barely change from token to token, so every token routes alike
    and any expert cache looks perfect; with embeddings wide enough to stay the larger part of
    the residual through every layer (std 8 for 48 layers of hidden 2048) each token keeps its
    own routing, close to uniform over the experts."""
    from transformers import AutoModelForCausalLM

    from specmoe.families import detect_family
    from specmoe.models import resolve_dtype

    config.validate()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype if config.dtype != "auto" else "bf16", str(device))
    family = detect_family(hf_config)
    spec = family.spec(hf_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    expert_ids = {id(p) for l in spec.moe_layers for p in family.experts(model, l).parameters()}
    std = getattr(hf_config, "initializer_range", 0.02)
    embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if id(p) in expert_ids:
                continue
            if "norm" in name.rsplit(".", 1)[-1] or "norm" in pname:
                data = torch.ones(p.shape, dtype=dtype, device=device)
            else:
                scale = embedding_std if module is embeddings and embedding_std else std
                data = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(scale).to(dtype)
            setattr(module, pname, torch.nn.Parameter(data, requires_grad=False))
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    base = family.base_model(model)
    with torch.device(device):  # its inverse frequencies are computed, not loaded
        base.rotary_emb = type(base.rotary_emb)(config=hf_config)
    for l in spec.moe_layers:  # routers spread enough that top-k picks differ between tokens
        router = family.router(model, l)
        router.weight.data.normal_(0, 1.0 / spec.hidden_size ** 0.5, generator=gen)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            owner.register_buffer(name.rsplit(".", 1)[-1], torch.zeros(buf.shape, dtype=buf.dtype, device=device))
    shapes = {k: tuple(v.shape[1:]) for k, v in
              ((n, getattr(family.experts(model, spec.moe_layers[0]), n)) for n in family.expert_params)}
    layout = ExpertLayout.from_shapes(shapes, dtype)
    store = HostExpertStore(layout, spec.moe_layers, spec.num_experts, pin=device.type == "cuda")
    host_gen = torch.Generator().manual_seed(seed)
    pool = torch.empty((distinct_experts, layout.block_bytes), dtype=torch.uint8)
    for name, view in layout.views(pool).items():
        view.copy_(torch.randn(view.shape, generator=host_gen).mul_(std).to(dtype))
    per_layer = spec.num_experts

    def source(layer: int, expert: int, out: Mapping[str, torch.Tensor]) -> None:
        store.blocks[store.row(layer, expert)].copy_(pool[(layer * per_layer + expert) % distinct_experts])

    store.fill(source, desc="random experts to host memory", progress=progress)
    model.eval()
    return ModelParts(model, family, spec, store, device, None,
                      {"model": f"random {hf_config.model_type} ({spec.num_layers} layers, {spec.num_experts} experts, "
                                f"top-{spec.top_k}, hidden {spec.hidden_size}, expert hidden "
                                f"{spec.expert_intermediate_size})"})
