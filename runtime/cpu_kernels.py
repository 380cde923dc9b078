"""Expert matrix-vector products on the host CPU, with weights read in place from the host store.

At batch 1 an expert is two matrix-vector products, bound by how fast the cores read
its weights from DRAM. Stock torch runs one product at a time, each over a handful of
cores; the C++ kernels in csrc/expert_gemv.cpp run every product of a call in one
parallel region (on the extension's own spinning thread pool, with the threads a call asks
for, torch's count by default) and widen the
bf16 / fp16 weights to fp32 exactly, accumulating in fp32: results match a float64
reference up to the order of the fp32 sums.

The extension is compiled on first use (g++ and ninja; under a minute, once: cached under
${SPECMOE_CACHE:-~/.cache/specmoe}/torch_extensions). Without a compiler, or if the build
fails, everything here falls back to torch and says so once. SPECMOE_CPU_KERNELS picks
the path: auto (default), torch, or an instruction set (avx512, avx2, scalar);
SPECMOE_CPU_PREFETCH how weights are prefetched: cache (default) or nta (non-temporal).

For one token (decode), `expert_sum` does all of an MoE layer's CPU experts in one native
call: both products, the biases, the glu and the weighted sum, so no torch op runs between
them (at batch 1 on a 16-core host that glue cost a fifth of the products' time). It knows
the glus the family descriptions mark as native (`Family.native_glu`: the plain SwiGLU with
SiLU and GPT-OSS's clamped one over interleaved columns); for any other the glu stays in
torch between two batched native products (`expert_outputs`): it is a few thousand elements.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

__all__ = ["LayerQueue", "TableLayer", "available", "backend", "bind_table_layer", "covers", "expert_outputs",
           "expert_sum", "gemv_batch", "load", "prepare_sum", "torch_expert_outputs"]

ENV = "SPECMOE_CPU_KERNELS"
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("expert_gemv.cpp", "expert_gemv_kernels.h")
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_EXPERT_TENSORS = {"gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"}

_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "module" (and its "isas") once built, or the "reason" it could not be


def _build(verbose: bool):
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) on PATH")
    if shutil.which("ninja") is None:
        # The `ninja` wheel (a dependency) puts its binary beside the interpreter's scripts,
        # which is not on PATH unless the environment is activated.
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed")
    flags = ["-O3", f"-DSPECMOE_PREFETCH_LOCALITY={_prefetch_locality()}"]
    digest = hashlib.sha256(f"{torch.__version__} {flags}".encode())
    for name in _SOURCES:
        digest.update((_CSRC / name).read_bytes())
    cache = Path(os.environ.get("SPECMOE_CACHE") or Path.home() / ".cache" / "specmoe")
    build = cache / "torch_extensions" / f"expert_gemv-{digest.hexdigest()[:16]}"
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name="specmoe_expert_gemv", sources=[str(_CSRC / "expert_gemv.cpp")],
                              extra_cflags=flags,
                              build_directory=str(build),
                              verbose=verbose)


PREFETCH_ENV = "SPECMOE_CPU_PREFETCH"
_PREFETCH_LOCALITY = {"cache": 3, "nta": 0}


def _prefetch_locality() -> int:
    """How the kernels prefetch weights, from SPECMOE_CPU_PREFETCH: `cache` (default) into
    every cache level; `nta`, non-temporal: a layer's tens of megabytes of weights then
    evict less of what the host runs next. A build of its own for each."""
    hint = os.environ.get(PREFETCH_ENV, "").strip().lower() or "cache"
    if hint not in _PREFETCH_LOCALITY:
        raise ValueError(f"{PREFETCH_ENV}={hint!r}: expected cache or nta")
    return _PREFETCH_LOCALITY[hint]


def load(verbose: bool = False):
    """The compiled extension, built on the first call in this process; None (after one
    warning) when it cannot be built."""
    if "module" not in _loaded and "reason" not in _loaded:
        _prefetch_locality()   # a bad setting is an error, not a reason to fall back to torch
        with _lock:
            if "module" not in _loaded and "reason" not in _loaded:
                try:
                    _loaded["module"] = _build(verbose)
                except Exception as err:  # noqa: BLE001 - any build failure means: use torch
                    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
                    _loaded["reason"] = f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]
                    warnings.warn(f"specmoe: CPU expert kernels unavailable ({_loaded['reason']}); "
                                  "computing CPU experts with torch", RuntimeWarning, stacklevel=2)
    return _loaded.get("module")


def _choice() -> str:
    choice = os.environ.get(ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "torch", "avx512", "avx2", "scalar"):
        raise ValueError(f"{ENV}={choice!r}: expected auto, torch, avx512, avx2 or scalar")
    return choice


def backend() -> str:
    """What computes CPU experts: an instruction set of the native kernels
    ("avx512", "avx2", "scalar") or "torch"."""
    choice = _choice()
    if choice == "torch" or load() is None:
        return "torch"
    if "isas" not in _loaded:
        _loaded["isas"] = tuple(load().isas())
    isas = _loaded["isas"]
    if choice == "auto":
        return isas[0]
    if choice not in isas:
        raise ValueError(f"{ENV}={choice}: this CPU runs only {', '.join(isas)}")
    return choice


def available() -> bool:
    """Whether the native kernels compute (built, and not switched off with SPECMOE_CPU_KERNELS=torch)."""
    return backend() != "torch"


def _native(ptrs: torch.Tensor, x: torch.Tensor, out: torch.Tensor, dtype: torch.dtype, in_out: bool,
            isa: str) -> torch.Tensor:
    # Raw addresses: every tensor here was checked by the caller and stays alive until return.
    load().gemv_batch(ptrs.data_ptr(), x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], out.shape[1],
                      _DTYPE_CODES[dtype], in_out, isa)
    return out


def _check_x(x: torch.Tensor, n: int, in_dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype != torch.float32:
        got = f"{x.dtype} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a float32 CPU tensor, got {got}")
    if tuple(x.shape) != (n, in_dim):
        raise ValueError(f"x must be [{n}, {in_dim}] (one row per matrix), got {list(x.shape)}")


def gemv_batch(weights: Sequence[torch.Tensor], x: torch.Tensor, *, weights_in_out: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = W_i @ x[i] for W_i [out, in] (or x[i] @ W_i for W_i [in, out] when
    `weights_in_out`): float32 [n, out]. Weights: n contiguous CPU tensors of one shape and
    dtype (bf16, fp16 or fp32), read in place; x float32 [n, in]."""
    weights = list(weights)
    if not weights or not all(isinstance(w, torch.Tensor) for w in weights):
        raise ValueError("weights must be a non-empty sequence of tensors")
    first = weights[0]
    if first.dtype not in _DTYPE_CODES or first.dim() != 2:
        raise ValueError(f"weights must be 2-D bfloat16, float16 or float32, got {first.dtype} {list(first.shape)}")
    for i, w in enumerate(weights):
        if w.dtype != first.dtype or w.shape != first.shape or w.device.type != "cpu" or not w.is_contiguous():
            raise ValueError(f"weights must be contiguous CPU tensors of one shape and dtype ({first.dtype} "
                             f"{list(first.shape)}); weights[{i}] is {w.dtype} {list(w.shape)} on {w.device}"
                             f"{'' if w.is_contiguous() else ', not contiguous'}")
    in_dim, out_dim = first.shape if weights_in_out else first.shape[::-1]
    _check_x(x, len(weights), in_dim)
    x = x.contiguous()
    if out is None:
        out = torch.empty(len(weights), out_dim, dtype=torch.float32)
    elif (out.dtype != torch.float32 or tuple(out.shape) != (len(weights), out_dim) or not out.is_contiguous()
          or out.device.type != "cpu"):
        raise ValueError(f"out must be a contiguous float32 CPU tensor [{len(weights)}, {out_dim}]")
    isa = backend()
    if isa == "torch":
        for i, w in enumerate(weights):
            out[i] = x[i] @ w.float() if weights_in_out else w.float() @ x[i]
        return out
    ptrs = torch.tensor([w.data_ptr() for w in weights], dtype=torch.int64)
    return _native(ptrs, x, out, first.dtype, weights_in_out, isa)


# ------------------------------------------------------------------- experts of a store


def _layout_fits(store) -> bool:
    layout = store.layout
    shapes = dict(zip(layout.names, layout.shapes))
    return (layout.dtype in _DTYPE_CODES and set(shapes) <= _EXPERT_TENSORS
            and len(shapes.get("gate_up_proj", ())) == 2 and len(shapes.get("down_proj", ())) == 2)


def covers(store) -> bool:
    """Whether the native kernels compute this store's experts (else: torch)."""
    return available() and _layout_fits(store)


def torch_expert_outputs(family, experts, store, layer: int, expert_ids: Sequence[int],
                         x_rows: torch.Tensor) -> torch.Tensor:
    """Row i: Expert_{layer, expert_ids[i]}(x_rows[i]) as float32, by the family's own torch
    code in the store's dtype, one product per distinct expert (so it is read once)."""
    x_rows = x_rows.to(store.layout.dtype)
    out = torch.empty(x_rows.shape[0], x_rows.shape[1], dtype=torch.float32)
    rows: dict[int, list[int]] = {}
    for i, e in enumerate(expert_ids):
        rows.setdefault(int(e), []).append(i)
    for e, idx in rows.items():
        out[idx] = family.apply_expert(experts, store.expert(layer, e), x_rows[idx]).float()
    return out


def expert_outputs(family, experts, store, layer: int, expert_ids: Sequence[int],
                   x_rows: torch.Tensor) -> torch.Tensor:
    """Row i: Expert_{layer, expert_ids[i]}(x_rows[i]) as float32 [n, H], unweighted.

    Native: two batched matrix-vector calls (gate_up for every row, the family's glu, down),
    weights read in place from the store; every row re-reads its expert, so this is the
    batch-1 path. Falls back to `torch_expert_outputs` where the kernels do not apply."""
    isa = backend()
    if isa == "torch" or not _layout_fits(store):
        return torch_expert_outputs(family, experts, store, layer, expert_ids, x_rows)
    ids = [int(e) for e in expert_ids]
    n = len(ids)
    if n and (min(ids) < 0 or max(ids) >= store.num_experts):
        raise ValueError(f"expert ids must lie in [0, {store.num_experts}), got {ids}")
    layout = store.layout
    shapes = dict(zip(layout.names, layout.shapes))
    first = store.blocks.data_ptr() + store.row(layer, 0) * layout.block_bytes
    in_out = bool(family.weights_in_out)

    def project(name: str, inp: torch.Tensor) -> torch.Tensor:
        in_dim, out_dim = shapes[name] if in_out else shapes[name][::-1]
        _check_x(inp, n, in_dim)
        at = first + layout.offsets[layout.names.index(name)]
        ptrs = torch.tensor([at + e * layout.block_bytes for e in ids], dtype=torch.int64)
        out = _native(ptrs, inp.contiguous(), torch.empty(n, out_dim), layout.dtype, in_out, isa)
        if name + "_bias" in shapes:
            out += store.stacked(layer)[name + "_bias"][ids]
        return out

    a = family.glu_fn(experts, project("gate_up_proj", x_rows.float()))
    return project("down_proj", a.float())


class _Fused(NamedTuple):
    hidden: int
    inter: int
    gate_up: int        # byte offsets in a block; -1: no such bias
    down: int
    gate_up_bias: int
    down_bias: int
    dtype_code: int


@functools.lru_cache(maxsize=64)
def _fused_layout(layout, in_out: bool) -> _Fused | None:
    """Sizes and offsets when the experts of `layout` are exactly gate_up [2I, H] and down
    [H, I] ([H, 2I] and [I, H] with `in_out`), each with or without its bias ([2I], [H])."""
    shapes = dict(zip(layout.names, layout.shapes))
    if layout.dtype not in _DTYPE_CODES or not {"gate_up_proj", "down_proj"} <= set(shapes) <= _EXPERT_TENSORS:
        return None
    gate_up, down = shapes["gate_up_proj"], shapes["down_proj"]
    if len(gate_up) != 2 or len(down) != 2:
        return None
    if in_out:
        gate_up, down = gate_up[::-1], down[::-1]
    hidden, inter = down
    if tuple(gate_up) != (2 * inter, hidden) or hidden < 1 or inter < 1:
        return None
    biases = {"gate_up_proj_bias": (2 * inter,), "down_proj_bias": (hidden,)}
    if any(shapes.get(name, shape) != shape for name, shape in biases.items()):
        return None
    offsets = dict(zip(layout.names, layout.offsets))
    return _Fused(hidden, inter, offsets["gate_up_proj"], offsets["down_proj"], offsets.get("gate_up_proj_bias", -1),
                  offsets.get("down_proj_bias", -1), _DTYPE_CODES[layout.dtype])


_GLU_CODES = {"swiglu": 0, "clamped_swiglu": 1}   # as expert_gemv.cpp numbers its glus


def _glu_code(family, experts) -> tuple[int, float, float] | None:
    """(glu code, alpha, limit) of the native glu that computes the family's, or None."""
    glu = family.native_glu(experts)
    if glu is None or glu.kind not in _GLU_CODES:
        return None
    return _GLU_CODES[glu.kind], glu.alpha, glu.limit


def _fused_static(family, experts, store, layer: int, threads: int = 0) -> tuple | None:
    """The arguments that say where one layer's experts are and what they are (and how many
    threads compute them: 0, torch's count), as the extension's fused calls take them after
    their per-call ones; None where they do not apply."""
    isa = backend()
    if isa == "torch":
        return None
    glu = _glu_code(family, experts)
    fused = _fused_layout(store.layout, bool(family.weights_in_out))
    if glu is None or fused is None:
        return None
    layout = store.layout
    base = store.blocks.data_ptr() + store.row(layer, 0) * layout.block_bytes
    return (base, layout.block_bytes, fused.gate_up, fused.down, fused.hidden, fused.inter, fused.dtype_code,
            bool(family.weights_in_out), store.num_experts, *glu, fused.gate_up_bias, fused.down_bias, isa,
            256 << 10, int(threads))


def prepare_sum(family, experts, store, layer: int, threads: int = 0):
    """`expert_sum` for one layer of one store, with all but the token fixed: a function
    (x, expert_ids, weights, out=None) -> out, or None where the native call does not apply.
    A decode step calls it once per layer; what it fixes is not looked up again each time.
    threads: how many compute (0: torch's count)."""
    static = _fused_static(family, experts, store, layer, threads)
    if static is None:
        return None
    hidden = _fused_layout(store.layout, bool(family.weights_in_out)).hidden
    native = load().expert_glu_sum

    def call(x: torch.Tensor, expert_ids: Sequence[int], weights: Sequence[float],
             out: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_cpu or x.shape != (1, hidden):
            got = f"{list(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a [1, {hidden}] CPU tensor, got {got}")
        x_code = _DTYPE_CODES.get(x.dtype)
        if x_code is None or not x.is_contiguous():  # the kernel widens bf16 / fp16 itself
            x, x_code = x.to(torch.float32).contiguous(), 0
        if out is None:
            out = torch.empty(1, hidden, dtype=torch.float32)
        elif not out.is_cpu or out.dtype != torch.float32 or out.shape != (1, hidden) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 [1, {hidden}] CPU tensor")
        # Raw addresses: x and out live until return, the store's blocks as long as the store.
        # Ids and weights go as they are: pybind takes any sequence of ints / floats.
        native(x.data_ptr(), x_code, out.data_ptr(), expert_ids, weights, *static)
        return out

    return call


def _host_buffer(name: str, t: torch.Tensor, dtypes: tuple, numel: int) -> None:
    if (not isinstance(t, torch.Tensor) or not t.is_cpu or t.dtype not in dtypes or t.numel() != numel
            or not t.is_contiguous()):
        got = f"{t.dtype} [{t.numel()}] on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be a contiguous {want} CPU tensor of {numel} values, got {got}")


def bind_table_layer(family, experts, store, layer: int, *, ready: torch.Tensor, ids: torch.Tensor,
                     weights: torch.Tensor, x: torch.Tensor, present: torch.Tensor, reads: torch.Tensor | None,
                     out: torch.Tensor, gate: torch.Tensor, stats: torch.Tensor | None = None,
                     timeout_s: float = 30.0, threads: int = 0) -> "TableLayer | None":
    """The CPU's part of one exact decode layer as one native call on fixed host buffers
    (`TableLayer` in csrc/expert_gemv.cpp): it waits until `ready` holds the step's count (the
    layer's `ids` [k], `weights` [k] and input `x` [H] have landed), sums the experts that are
    neither marked in `present` [num_experts] nor among the first `reads`[m] of the m missed
    into `out` [H], then writes the gate's value to `gate`, and what it did to `stats` (int64
    [7], see TableLayer.stats and span; given, it may be a row of a caller's array). None where
    the native call does not apply. The buffers must outlive the result: it keeps their
    addresses. threads: how many compute (0: torch's count)."""
    static = _fused_static(family, experts, store, layer, threads)
    if static is None:
        return None
    hidden, num_experts = _fused_layout(store.layout, bool(family.weights_in_out)).hidden, store.num_experts
    k = ids.numel() if isinstance(ids, torch.Tensor) else 0
    _host_buffer("ready", ready, (torch.int64,), 1)
    _host_buffer("ids", ids, (torch.int64,), k)
    _host_buffer("weights", weights, (torch.float32,), k)
    _host_buffer("x", x, tuple(_DTYPE_CODES), hidden)
    _host_buffer("present", present, (torch.uint8,), num_experts)
    if reads is not None:
        _host_buffer("reads", reads, (torch.int64,), k + 1)
    _host_buffer("out", out, (torch.float32,), hidden)
    _host_buffer("gate", gate, (torch.int32,), 1)
    if stats is None:
        stats = torch.zeros(7, dtype=torch.int64)
    _host_buffer("stats", stats, (torch.int64,), 7)
    native = load().table_layer(ready.data_ptr(), float(timeout_s), ids.data_ptr(), weights.data_ptr(), k,
                                x.data_ptr(), _DTYPE_CODES[x.dtype], present.data_ptr(),
                                0 if reads is None else reads.data_ptr(), out.data_ptr(), gate.data_ptr(),
                                stats.data_ptr(), *static)
    return TableLayer(native, stats, (ready, ids, weights, x, present, reads, out, gate, stats))


class TableLayer:
    """One layer's bound CPU part (bind_table_layer): called on this thread, or submitted to
    a LayerQueue; `stats()` reads what its last run did."""

    def __init__(self, native, stats: torch.Tensor, buffers: tuple):
        self.native = native
        self._view = stats.numpy()
        self._buffers = buffers   # the addresses the native side keeps must stay valid

    def __call__(self, expect: int, gate_value: int) -> tuple[int, int, int, float, float]:
        """Run it now; returns its stats."""
        self.native.run(expect, gate_value)
        return self.stats()

    def stats(self) -> tuple[int, int, int, float, float]:
        """(ids present on the GPU, ids the GPU read, experts computed here, seconds waited for
        the routing, seconds computed) of the last run."""
        v = self._view
        return int(v[0]), int(v[1]), int(v[2]), v[3] * 1e-9, v[4] * 1e-9

    def span(self) -> tuple[int, int]:
        """When its last run began and ended, in time.monotonic_ns()'s nanoseconds."""
        return int(self._view[5]), int(self._view[6])


class LayerQueue:
    """A thread of the extension's that runs submitted TableLayers in order (the CPU parts of
    one decode step) while the caller goes on; `wait()` returns once they have run and raises
    the first failure. A failed part and those behind it still open their gates."""

    def __init__(self):
        self._native = load().LayerQueue()

    def submit(self, layer: TableLayer, expect: int, gate_value: int) -> int:
        """Queue `layer` to run with (expect, gate_value); returns its ticket for wait_for."""
        return self._native.submit(layer.native, expect, gate_value)

    def wait(self) -> None:
        self._native.wait()

    def wait_for(self, ticket: int) -> bool:
        """Until the part of `ticket` and those before it have run; False if one has failed
        since the last wait() (which raises it)."""
        return self._native.wait_for(ticket)

    def idle(self) -> bool:
        return self._native.idle()

    def ran(self, ticket: int) -> bool:
        """Whether the part of `ticket` has run (without waiting)."""
        return self._native.ran(ticket)


def expert_sum(family, experts, store, layer: int, expert_ids: Sequence[int], weights: Sequence[float],
               x: torch.Tensor) -> torch.Tensor | None:
    """sum_i weights[i] * Expert_{layer, expert_ids[i]}(x) as float32 [1, H], for one token
    x [1, H] (a CPU tensor of any float dtype): one native call, weights read in place.

    None where that call does not apply (the torch backend, a glu other than the plain
    SwiGLU with SiLU or GPT-OSS's, a layout that is not gate_up + down with optional
    biases): use `expert_outputs`."""
    call = prepare_sum(family, experts, store, layer)
    return None if call is None else call(x, expert_ids, weights)
