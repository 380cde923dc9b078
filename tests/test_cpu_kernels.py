"""The CPU expert kernels (runtime/cpu_kernels.py, runtime/csrc) against float64 references.

Weights in bf16, fp16 and fp32 are exact in fp32 and the kernels accumulate in fp32, so
the only error left is the order of fp32 sums: a relative error far below 1e-5. Every
instruction set this CPU runs is checked, and so is the torch fallback."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import pytest
import torch
from transformers.activations import ACT2FN

import runtime
from runtime import cpu_kernels
from runtime.config import RuntimeConfig
from runtime.cpu_experts import CpuExperts
from runtime.expert_layout import ExpertLayout
from runtime.host_store import HostExpertStore
from specmoe.families import FAMILIES
from tests.tiny_models import tiny_model

TOL = 1e-5
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (in, out): the Qwen3-30B-A3B gate_up and down shapes, then sizes with every kind of tail
SIZES = ((2048, 1536), (768, 2048), (100, 33), (7, 1))


@pytest.fixture(scope="module")
def backends() -> list[str]:
    """Every native instruction set this machine runs, then torch."""
    module = cpu_kernels.load()
    return (list(module.isas()) if module is not None else []) + ["torch"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def matrices(n: int, in_dim: int, out_dim: int, dtype, in_out: bool, gen) -> list[torch.Tensor]:
    shape = (in_dim, out_dim) if in_out else (out_dim, in_dim)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("in_dim,out_dim", SIZES)
@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_gemv_batch_matches_float64(backends, monkeypatch, dtype, in_out, in_dim, out_dim, n):
    gen = torch.Generator().manual_seed(in_dim * 7 + out_dim + n)
    weights = matrices(n, in_dim, out_dim, dtype, in_out, gen)
    x = torch.randn(n, in_dim, generator=gen)
    ref = torch.stack([x[i].double() @ w.double() if in_out else w.double() @ x[i].double()
                       for i, w in enumerate(weights)])
    for backend in backends:
        monkeypatch.setenv(cpu_kernels.ENV, backend)
        assert cpu_kernels.backend() == backend
        out = torch.full((n, out_dim), float("nan"))
        assert cpu_kernels.gemv_batch(weights, x, weights_in_out=in_out, out=out) is out
        assert torch.isfinite(out).all(), f"{backend}: not every output was written"
        assert rel_err(out, ref) < TOL, backend


def test_results_do_not_depend_on_threads(backends):
    gen = torch.Generator().manual_seed(3)
    weights = matrices(8, 768, 2048, torch.bfloat16, False, gen)
    x = torch.randn(8, 768, generator=gen)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(cpu_kernels.gemv_batch(weights, x))
    finally:
        torch.set_num_threads(threads)
    # each output is summed by one task in one order, whoever runs it
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_many_regions_from_several_threads_give_the_same_results(backends):
    """The kernels' own thread pool: hundreds of regions back to back, at several sizes, from
    two Python threads at once (the kernels release the GIL; the pool runs one region at a
    time), each result equal to the one computed alone."""
    if backends[0] == "torch":
        pytest.skip("no native kernels")
    from concurrent.futures import ThreadPoolExecutor

    gen = torch.Generator().manual_seed(5)
    cases = [(matrices(n, 100, 33, torch.bfloat16, False, gen), torch.randn(n, 100, generator=gen))
             for n in (1, 3, 8)]
    expected = [cpu_kernels.gemv_batch(w, x) for w, x in cases]

    def hammer(offset: int) -> bool:
        return all(torch.equal(cpu_kernels.gemv_batch(*cases[(i + offset) % 3]), expected[(i + offset) % 3])
                   for i in range(150))

    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(hammer, (0, 1)))


# ---------------------------------------------------------------- experts of a real host store


def store_parts(family: str, dtype: torch.dtype):
    model = tiny_model(family).to(dtype)
    parts = runtime.parts_from_model(model, RuntimeConfig(device="cpu", max_context=64))
    assert not parts.store.pinned
    return parts


def reference(parts, layer: int, x: torch.Tensor, work) -> torch.Tensor:
    """sum of w * Expert_e(x[t]) in float64, by the family's own expert code."""
    experts = parts.family.experts(parts.model, layer)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, e, w in work:
        tensors = {k: v.double() for k, v in parts.store.expert(layer, e).items()}
        out[t] += w * parts.family.apply_expert(experts, tensors, x[t:t + 1].double())[0]
    return out


def random_work(tokens: int, num_experts: int, k: int, gen, distinct: bool) -> list[tuple[int, int, float]]:
    """k (expert, weight) pairs per token; with `distinct` no expert serves two tokens."""
    order = torch.randperm(num_experts, generator=gen).tolist()
    work = []
    for t in range(tokens):
        experts = order[t * k:(t + 1) * k] if distinct else torch.randperm(num_experts, generator=gen)[:k].tolist()
        work += [(t, e, float(w)) for e, w in zip(experts, torch.rand(k, generator=gen) + 0.1)]
    return work


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_cpu_experts_match_the_family_code(backends, monkeypatch, family, dtype):
    parts = store_parts(family, dtype)
    store, spec = parts.store, parts.spec
    layer = spec.moe_layers[-1]
    experts = parts.family.experts(parts.model, layer)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, spec.hidden_size, generator=gen).to(dtype)
    # every expert at batch 1 (the kernels), and three tokens with experts shared between them
    # (those run as one torch product per expert, in the store's dtype)
    for work in (random_work(2, spec.num_experts, spec.top_k, gen, distinct=True),
                 random_work(3, spec.num_experts, spec.top_k, gen, distinct=False)):
        ref = reference(parts, layer, x, work)
        shared = len({e for _, e, _ in work}) < len(work)
        for backend in backends:
            monkeypatch.setenv(cpu_kernels.ENV, backend)
            cpu = CpuExperts(parts.family, store)
            out = cpu.submit(experts, layer, x, work).result()
            cpu.close()
            assert out.dtype == torch.float32 and out.shape == x.shape and cpu.seconds > 0
            in_bf16 = dtype == torch.bfloat16 and (backend == "torch" or shared)
            assert rel_err(out, ref) < (2e-2 if in_bf16 else TOL), (backend, shared)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_expert_outputs_read_the_store_in_place(backends, monkeypatch, family):
    parts = store_parts(family, torch.bfloat16)
    store, spec, fam = parts.store, parts.spec, parts.family
    layer = spec.moe_layers[0]
    experts = fam.experts(parts.model, layer)
    gen = torch.Generator().manual_seed(2)
    ids = [5, 0, 7, 5, 2]
    x = torch.randn(len(ids), spec.hidden_size, generator=gen)
    ref = torch.stack([fam.apply_expert(experts, {k: v.double() for k, v in store.expert(layer, e).items()},
                                        x[i:i + 1].double())[0] for i, e in enumerate(ids)])
    views = [store.expert(layer, e)["gate_up_proj"] for e in ids]
    gate_up = torch.stack([x[i].double() @ fam.in_out(v.double()) for i, v in enumerate(views)])
    for backend in backends:
        monkeypatch.setenv(cpu_kernels.ENV, backend)
        assert cpu_kernels.covers(store) == (backend != "torch")
        assert rel_err(cpu_kernels.gemv_batch(views, x, weights_in_out=fam.weights_in_out), gate_up) < TOL
        if backend != "torch":  # the torch path computes in bf16
            assert rel_err(cpu_kernels.expert_outputs(fam, experts, store, layer, ids, x), ref) < TOL
    with pytest.raises(ValueError, match="expert ids"):
        monkeypatch.setenv(cpu_kernels.ENV, backends[0])
        cpu_kernels.expert_outputs(fam, experts, store, layer, [spec.num_experts], x[:1])


# ---------------------------------------------------------------- one token, fused (expert_sum)
#
# The fused call adds a float32 silu (exp to about 2 ulp) and a float32 weighted sum of n
# outputs to the products: a few more roundings of the same size, so TOL holds.

FUSED_SIZES = ((2048, 768), (100, 33))  # (H, I): Qwen3-30B-A3B, then tails everywhere


class SiluExperts(torch.nn.Module):
    """A stock experts module as far as the glu reads it: hidden_act "silu"."""

    def __init__(self, act: str = "silu"):
        super().__init__()
        self.act_fn = ACT2FN[act]


@functools.lru_cache(maxsize=None)
def swiglu_store(dtype: torch.dtype, in_out: bool, hidden: int, inter: int) -> HostExpertStore:
    """Ten random SwiGLU experts in layers 1 and 4, stored [out, in] or [in, out]."""
    shapes = {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}
    if in_out:
        shapes = {k: v[::-1] for k, v in shapes.items()}
    store = HostExpertStore(ExpertLayout.from_shapes(shapes, dtype), [1, 4], 10, pin=False)
    gen = torch.Generator().manual_seed(hidden + inter + 2 * in_out)
    for layer in store.layers:
        for e in range(store.num_experts):
            for name, view in store.expert(layer, e).items():
                fan_in = hidden if name == "gate_up_proj" else inter
                view.copy_(torch.randn(view.shape, generator=gen) * 2 / fan_in ** 0.5)
    return store


def swiglu_reference(store, layer: int, ids, weights, x: torch.Tensor, in_out: bool) -> torch.Tensor:
    """sum_i w_i down_i(silu(gate_i x) * up_i x) in float64, from the store's tensors."""
    x = x.double().reshape(-1)
    out = torch.zeros_like(x)
    for e, w in zip(ids, weights):
        t = store.expert(layer, e)
        gate_up, down = t["gate_up_proj"].double(), t["down_proj"].double()
        if in_out:
            gate_up, down = gate_up.T, down.T
        gate, up = (gate_up @ x).chunk(2)
        out += w * (down @ (gate * torch.sigmoid(gate) * up))
    return out[None]


def swiglu_family(in_out: bool):
    return dataclasses.replace(FAMILIES["qwen3_moe"], weights_in_out=True) if in_out else FAMILIES["qwen3_moe"]


def assert_expert_sum_close(monkeypatch, backends, family, experts, store, layer, ids, weights, x, ref, hidden):
    """expert_sum on every backend against `ref`: None on torch (no native call), else close."""
    for backend in backends:
        monkeypatch.setenv(cpu_kernels.ENV, backend)
        out = cpu_kernels.expert_sum(family, experts, store, layer, ids, weights, x)
        if backend == "torch":
            assert out is None
            continue
        assert out.dtype == torch.float32 and out.shape == (1, hidden)
        assert rel_err(out, ref) < TOL, (backend, len(ids))


@pytest.mark.parametrize("hidden,inter", FUSED_SIZES)
@pytest.mark.parametrize("in_out", [False, True], ids=["out_in", "in_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_expert_sum_matches_float64(backends, monkeypatch, dtype, in_out, hidden, inter):
    store = swiglu_store(dtype, in_out, hidden, inter)
    family, experts = swiglu_family(in_out), SiluExperts()
    gen = torch.Generator().manual_seed(5)
    for n, x_dtype in ((1, dtype), (3, torch.float32), (8, dtype)):
        ids = torch.randperm(store.num_experts, generator=gen)[:n].tolist()
        weights = (torch.rand(n, generator=gen) + 0.1).tolist()
        x = torch.randn(1, hidden, generator=gen).to(x_dtype)
        ref = swiglu_reference(store, 4, ids, weights, x, in_out)
        assert_expert_sum_close(monkeypatch, backends, family, experts, store, 4, ids, weights, x, ref, hidden)
    # a layer other than the store's first: blocks are addressed from the layer's own row
    monkeypatch.setenv(cpu_kernels.ENV, backends[0])
    x = torch.randn(1, hidden, generator=gen)
    if backends[0] != "torch":
        out = cpu_kernels.expert_sum(family, experts, store, 1, [9, 0], [0.5, 1.5], x)
        assert rel_err(out, swiglu_reference(store, 1, [9, 0], [0.5, 1.5], x, in_out)) < TOL


# GPT-OSS: gate_up [H, 2I] with gate and up interleaved, biases, a clamped glu. (H, I): the
# multiples of 32 of gpt-oss (2880, 2880) at a size a test reads quickly, then tails everywhere.
GPT_OSS_SIZES = ((512, 384), (100, 33))


class GptOssExperts(torch.nn.Module):
    """The glu constants of a stock GPT-OSS experts module."""

    alpha, limit = 1.702, 7.0


@functools.lru_cache(maxsize=None)
def gpt_oss_store(dtype: torch.dtype, hidden: int, inter: int) -> HostExpertStore:
    """Ten random GPT-OSS experts in layers 1 and 4. Projections come out about five times
    the unit scale, so both clamps at limit 7 bite on a good share of the columns."""
    shapes = {"gate_up_proj": (hidden, 2 * inter), "gate_up_proj_bias": (2 * inter,),
              "down_proj": (inter, hidden), "down_proj_bias": (hidden,)}
    store = HostExpertStore(ExpertLayout.from_shapes(shapes, dtype), [1, 4], 10, pin=False)
    gen = torch.Generator().manual_seed(hidden + inter)
    for layer in store.layers:
        for e in range(store.num_experts):
            for name, view in store.expert(layer, e).items():
                scale = {"gate_up_proj": 5 / hidden ** 0.5, "down_proj": 1 / inter ** 0.5}.get(name, 1.0)
                view.copy_(torch.randn(view.shape, generator=gen) * scale)
    return store


def gpt_oss_reference(store, layer: int, ids, weights, x: torch.Tensor, experts) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i w_i (down_i glu(x gate_up_i + b_i) + b_down_i) [1, H], the gate_up values
    before the clamps [n, 2I]) in float64, from the store's tensors."""
    alpha, limit = experts.alpha, experts.limit
    x = x.double().reshape(-1)
    out = torch.zeros_like(x)
    gate_ups = []
    for e, w in zip(ids, weights):
        t = {k: v.double() for k, v in store.expert(layer, e).items()}
        gate_up = x @ t["gate_up_proj"] + t["gate_up_proj_bias"]
        gate_ups.append(gate_up)
        gate = torch.minimum(gate_up[0::2], torch.tensor(limit, dtype=torch.float64))
        up = gate_up[1::2].clamp(-limit, limit)
        a = (up + 1) * gate / (1 + torch.exp(-alpha * gate))
        out += w * (a @ t["down_proj"] + t["down_proj_bias"])
    return out[None], torch.stack(gate_ups)


@pytest.mark.parametrize("hidden,inter", GPT_OSS_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_expert_sum_gpt_oss_matches_float64(backends, monkeypatch, dtype, hidden, inter):
    store = gpt_oss_store(dtype, hidden, inter)
    family, experts = FAMILIES["gpt_oss"], GptOssExperts()
    gen = torch.Generator().manual_seed(8)
    for n, x_dtype in ((1, dtype), (3, torch.float32), (8, dtype)):
        ids = torch.randperm(store.num_experts, generator=gen)[:n].tolist()
        weights = (torch.rand(n, generator=gen) + 0.1).tolist()
        x = torch.randn(1, hidden, generator=gen).to(x_dtype)
        ref, gate_up = gpt_oss_reference(store, 4, ids, weights, x, experts)
        # the clamps bite: gates above the limit, ups past it on both sides
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
        assert (gate > experts.limit).any() and (up > experts.limit).any() and (up < -experts.limit).any()
        assert_expert_sum_close(monkeypatch, backends, family, experts, store, 4, ids, weights, x, ref, hidden)
    # a layer other than the store's first, and the biases of the right experts
    if backends[0] != "torch":
        monkeypatch.setenv(cpu_kernels.ENV, backends[0])
        x = torch.randn(1, hidden, generator=gen)
        out = cpu_kernels.expert_sum(family, experts, store, 1, [9, 0], [0.5, 1.5], x)
        assert rel_err(out, gpt_oss_reference(store, 1, [9, 0], [0.5, 1.5], x, experts)[0]) < TOL


@pytest.mark.parametrize("glu", ["swiglu", "gpt_oss"])
def test_expert_sum_does_not_depend_on_threads(backends, glu):
    if backends[0] == "torch":
        pytest.skip("no native kernels")
    if glu == "swiglu":
        hidden, inter = FUSED_SIZES[0]
        store = swiglu_store(torch.bfloat16, False, hidden, inter)
        family, experts = swiglu_family(False), SiluExperts()
    else:
        hidden, inter = GPT_OSS_SIZES[0]
        store = gpt_oss_store(torch.bfloat16, hidden, inter)
        family, experts = FAMILIES["gpt_oss"], GptOssExperts()
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(6))
    ids, weights = [3, 9, 0, 7, 1, 4, 8, 2], [0.3, 0.05, 0.2, 0.1, 0.15, 0.07, 0.08, 0.05]
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(cpu_kernels.expert_sum(family, experts, store, 4, ids, weights, x))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_expert_sum_applies_only_to_the_glus_it_knows(backends, monkeypatch):
    if backends[0] == "torch":
        pytest.skip("no native kernels")
    monkeypatch.setenv(cpu_kernels.ENV, backends[0])
    store = swiglu_store(torch.float32, False, *FUSED_SIZES[1])
    x = torch.randn(1, FUSED_SIZES[1][0])
    family = swiglu_family(False)
    assert cpu_kernels.expert_sum(family, torch.nn.SiLU(), store, 1, [0], [1.0], x) is None  # no act_fn
    assert cpu_kernels.expert_sum(family, SiluExperts("swish"), store, 1, [0], [1.0], x) is not None
    assert cpu_kernels.expert_sum(family, SiluExperts("gelu"), store, 1, [0], [1.0], x) is None
    # a store in [out, in] read by a family that stores [in, out]: the shapes do not fit
    assert cpu_kernels.expert_sum(swiglu_family(True), SiluExperts(), store, 1, [0], [1.0], x) is None
    # GPT-OSS: its own glu, biases and [in, out] weights
    parts = store_parts("gpt_oss", torch.float32)
    layer = parts.spec.moe_layers[0]
    experts = parts.family.experts(parts.model, layer)
    fam, gpt_store = parts.family, parts.store
    x = torch.randn(1, parts.spec.hidden_size)
    assert cpu_kernels.expert_sum(fam, experts, gpt_store, layer, [1, 2], [0.5, 0.5], x) is not None
    assert cpu_kernels.expert_sum(fam, torch.nn.Module(), gpt_store, layer, [1], [1.0], x) is None  # no alpha, limit
    other_glu = dataclasses.replace(fam, glu_fn=lambda experts, gate_up: fam.glu_fn(experts, gate_up))
    assert cpu_kernels.expert_sum(other_glu, experts, gpt_store, layer, [1], [1.0], x) is None
    assert cpu_kernels.expert_sum(dataclasses.replace(fam, weights_in_out=False), experts, gpt_store, layer,
                                  [1], [1.0], x) is None
    # a bias that is not one value per output column
    shapes = {"gate_up_proj": (64, 66), "gate_up_proj_bias": (33,), "down_proj": (33, 64)}
    odd = HostExpertStore(ExpertLayout.from_shapes(shapes, torch.float32), [0], 2, pin=False)
    assert cpu_kernels.expert_sum(fam, experts, odd, 0, [1], [1.0], torch.randn(1, 64)) is None


def test_expert_sum_bad_input_is_a_clear_value_error(backends, monkeypatch):
    if backends[0] == "torch":
        pytest.skip("no native kernels")
    monkeypatch.setenv(cpu_kernels.ENV, backends[0])
    hidden, inter = FUSED_SIZES[1]
    store = swiglu_store(torch.bfloat16, False, hidden, inter)
    family, experts = swiglu_family(False), SiluExperts()
    x = torch.randn(1, hidden)
    with pytest.raises(ValueError, match=r"expert id 10 is not in \[0, 10\)"):
        cpu_kernels.expert_sum(family, experts, store, 1, [2, 10], [0.5, 0.5], x)
    with pytest.raises(ValueError, match="expert id -1"):
        cpu_kernels.expert_sum(family, experts, store, 1, [-1], [1.0], x)
    with pytest.raises(ValueError, match="2 expert ids but 1 weights"):
        cpu_kernels.expert_sum(family, experts, store, 1, [2, 3], [1.0], x)
    with pytest.raises(ValueError, match=rf"\[1, {hidden}\]"):
        cpu_kernels.expert_sum(family, experts, store, 1, [2], [1.0], torch.randn(2, hidden))
    # no experts: a zero output, not garbage
    assert torch.equal(cpu_kernels.expert_sum(family, experts, store, 1, [], [], x), torch.zeros(1, hidden))
    # the glu and bias arguments, checked by the extension itself
    out = torch.empty(1, hidden)
    layout = store.layout
    args = (x.data_ptr(), 0, out.data_ptr(), [1], [1.0], store.blocks.data_ptr(), layout.block_bytes,
            *layout.offsets, hidden, inter, cpu_kernels._DTYPE_CODES[layout.dtype], False, store.num_experts)
    native = cpu_kernels.load().expert_glu_sum
    with pytest.raises(ValueError, match="glu 2"):
        native(*args, glu=2)
    with pytest.raises(ValueError, match="alpha and limit"):
        native(*args, glu=1, limit=float("nan"))
    for bias in ({"gate_up_bias_offset": layout.block_bytes - 2}, {"down_bias_offset": -2}):
        with pytest.raises(ValueError, match="bias offset"):
            native(*args, **bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_cpu_experts_decode_matches_float64(backends, monkeypatch, family, dtype):
    """One token, distinct experts: the fused call for either glu (the tiny GPT-OSS has
    limit 0.5, so its clamps bite)."""
    parts = store_parts(family, dtype)
    spec = parts.spec
    layer = spec.moe_layers[-1]
    experts = parts.family.experts(parts.model, layer)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, spec.hidden_size, generator=gen).to(dtype)
    if backends[0] != "torch":
        def unfused(*args):
            raise AssertionError("the decode path left the fused call")

        monkeypatch.setattr(cpu_kernels, "expert_outputs", unfused)
    for k in (1, spec.top_k, spec.num_experts):
        work = random_work(1, spec.num_experts, k, gen, distinct=True)
        ref = reference(parts, layer, x, work)
        for backend in backends[:-1]:
            monkeypatch.setenv(cpu_kernels.ENV, backend)
            cpu = CpuExperts(parts.family, parts.store)
            out = cpu.compute(experts, layer, x, work)
            buf = torch.full((1, spec.hidden_size), float("nan"))
            again = cpu.compute(experts, layer, x, work, out=buf)   # the layer's prepared call, into buf
            cpu.close()
            assert out.dtype == torch.float32 and out.shape == x.shape and cpu.seconds > 0
            assert rel_err(out, ref) < TOL, (backend, k)
            assert rel_err(again, ref) < TOL, (backend, k)
            if backend != "torch":   # the native call wrote the sum where it was asked to
                assert again.data_ptr() == buf.data_ptr()


# ---------------------------------------------------------------- fallback and bad input


def test_failed_build_falls_back_to_torch_with_one_warning(monkeypatch):
    def no_compiler(verbose):
        raise RuntimeError("no C++ compiler (c++) on PATH")

    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setattr(cpu_kernels, "_build", no_compiler)
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert cpu_kernels.backend() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_kernels.available()
        w = torch.randn(4, 6).to(torch.bfloat16)
        x = torch.randn(1, 6)
        out = cpu_kernels.gemv_batch([w], x)
    assert rel_err(out, (w.double() @ x[0].double())[None]) < TOL


def test_bad_input_is_a_clear_value_error(monkeypatch):
    w = torch.randn(4, 6).to(torch.bfloat16)
    x = torch.randn(1, 6)
    cases = [
        (([w], x.to(torch.bfloat16)), "float32"),
        (([w], torch.randn(1, 5)), r"\[1, 6\]"),
        (([w, w], x), r"\[2, 6\]"),
        (([w, torch.randn(4, 7).to(torch.bfloat16)], torch.randn(2, 6)), "one shape"),
        (([w.to(torch.float64)], x), "bfloat16, float16 or float32"),
        (([torch.randn(2, 4, 6).to(torch.bfloat16)], x), "2-D"),
        (([torch.randn(6, 4).to(torch.bfloat16).t()], x), "contiguous"),
        (([], x), "non-empty"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            cpu_kernels.gemv_batch(*args)
    with pytest.raises(ValueError, match="out must be"):
        cpu_kernels.gemv_batch([w], x, out=torch.empty(1, 3))
    monkeypatch.setenv(cpu_kernels.ENV, "sse9")
    with pytest.raises(ValueError, match=cpu_kernels.ENV):
        cpu_kernels.backend()


def test_prefetch_hint_is_read_from_the_environment(monkeypatch):
    """SPECMOE_CPU_PREFETCH picks the locality the kernels are built with (a build of their own
    each); an unknown value is an error, not a silent fall back to torch."""
    monkeypatch.delenv(cpu_kernels.PREFETCH_ENV, raising=False)
    assert cpu_kernels._prefetch_locality() == 3
    monkeypatch.setenv(cpu_kernels.PREFETCH_ENV, "NTA")
    assert cpu_kernels._prefetch_locality() == 0
    monkeypatch.setenv(cpu_kernels.PREFETCH_ENV, "l2")
    with pytest.raises(ValueError, match="expected cache or nta"):
        cpu_kernels._prefetch_locality()


def test_prepared_sum_refuses_a_wrong_out():
    if not cpu_kernels.available():
        pytest.skip("the native kernels are not built here")
    parts = store_parts("qwen3_moe", torch.bfloat16)
    layer = parts.spec.moe_layers[0]
    call = cpu_kernels.prepare_sum(parts.family, parts.family.experts(parts.model, layer), parts.store, layer)
    x = torch.randn(1, parts.spec.hidden_size)
    for bad in (torch.empty(1, parts.spec.hidden_size, dtype=torch.bfloat16), torch.empty(2, parts.spec.hidden_size),
                torch.empty(parts.spec.hidden_size, 2).t()[:1]):
        with pytest.raises(ValueError, match="out must be a contiguous float32"):
            call(x, [0, 1], [0.5, 0.5], bad)


def table_layer_buffers(hidden: int, k: int, num_experts: int, dtype=torch.bfloat16):
    return dict(ready=torch.full((1,), -1, dtype=torch.int64), ids=torch.zeros(k, dtype=torch.int64),
                weights=torch.zeros(k, dtype=torch.float32), x=torch.zeros(hidden, dtype=dtype),
                present=torch.zeros(num_experts, dtype=torch.uint8), out=torch.full((hidden,), float("nan")),
                gate=torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("reads", [None, [0, 1, 1, 2, 2]], ids=["no_reads", "reads"])
def test_table_layer_computes_what_the_gpu_did_not(backends, monkeypatch, reads):
    """The run-ahead step's CPU part: waits for the layer's routing to land, sums exactly the
    experts neither in the GPU's table nor read by its experts graph (the first reads[m] of
    the m missed, in routing order), then opens the gate; a float64 reference of that sum."""
    if backends[0] == "torch":
        pytest.skip("no native kernels")
    monkeypatch.setenv(cpu_kernels.ENV, backends[0])
    hidden, inter = FUSED_SIZES[1]
    store, family, experts = swiglu_store(torch.bfloat16, False, hidden, inter), swiglu_family(False), SiluExperts()
    buf = table_layer_buffers(hidden, 4, store.num_experts)
    reads_t = None if reads is None else torch.tensor(reads, dtype=torch.int64)
    call = cpu_kernels.bind_table_layer(family, experts, store, 4, reads=reads_t, **buf)
    gen = torch.Generator().manual_seed(3)
    for step, (ids, on_gpu) in enumerate([([7, 2, 9, 0], {2}), ([1, 3, 5, 8], {1, 3, 5, 8}), ([6, 4, 0, 2], set())]):
        buf["ids"].copy_(torch.tensor(ids))
        buf["weights"].copy_(torch.rand(4, generator=gen))
        buf["x"].copy_(torch.randn(hidden, generator=gen))
        buf["present"].zero_()
        buf["present"][list(on_gpu)] = 1
        buf["ready"].fill_(step)
        hits, read, computed, waited, spent = call(step, step + 10)
        missed = [j for j, e in enumerate(ids) if e not in on_gpu]
        skip = 0 if reads is None else reads[len(missed)]
        cpu = missed[skip:]
        ref = swiglu_reference(store, 4, [ids[j] for j in cpu], buf["weights"][cpu].tolist(), buf["x"], False)
        assert (hits, read, computed) == (len(ids) - len(missed), skip, len(cpu))
        assert waited >= 0 and spent >= 0
        assert int(buf["gate"]) == step + 10
        if cpu:
            assert rel_err(buf["out"][None], ref) < TOL
        else:
            assert torch.equal(buf["out"], torch.zeros(hidden))


def test_table_layer_waits_for_the_routing_and_gives_up_clearly(backends, monkeypatch):
    """It spins until another thread (the GPU's copy, in a decode step) writes the step count,
    and after its timeout raises without opening the gate (the caller does that)."""
    if backends[0] == "torch":
        pytest.skip("no native kernels")
    import threading
    import time

    monkeypatch.setenv(cpu_kernels.ENV, backends[0])
    hidden, inter = FUSED_SIZES[1]
    store, family, experts = swiglu_store(torch.float32, False, hidden, inter), swiglu_family(False), SiluExperts()
    buf = table_layer_buffers(hidden, 2, store.num_experts, torch.float32)
    buf["ids"].copy_(torch.tensor([3, 5]))
    buf["weights"].copy_(torch.tensor([0.25, 0.75]))
    buf["x"].copy_(torch.randn(hidden))
    call = cpu_kernels.bind_table_layer(family, experts, store, 1, reads=None, timeout_s=5.0, **buf)
    writer = threading.Timer(0.05, lambda: buf["ready"].fill_(41))
    start = time.perf_counter()
    writer.start()
    _, _, computed, waited, _ = call(41, 1)
    assert computed == 2 and waited >= 0.03 and time.perf_counter() - start >= 0.05
    ref = swiglu_reference(store, 1, [3, 5], [0.25, 0.75], buf["x"], False)
    assert rel_err(buf["out"][None], ref) < TOL

    late = cpu_kernels.bind_table_layer(family, experts, store, 1, reads=None, timeout_s=0.05, **buf)
    with pytest.raises(RuntimeError, match="did not reach host memory within"):
        late(42, 2)
    assert int(buf["gate"]) == 1   # not opened by a failed call
    buf["ready"].fill_(42)
    buf["ids"][1] = store.num_experts
    with pytest.raises(ValueError, match=r"expert id 10 is not in \[0, 10\)"):
        late(42, 2)
    with pytest.raises(ValueError, match="present must be a contiguous uint8"):
        cpu_kernels.bind_table_layer(family, experts, store, 1, reads=None,
                                     **{**buf, "present": torch.zeros(store.num_experts, dtype=torch.bool)})


def test_layer_queue_runs_a_steps_parts_in_order_and_opens_every_gate(backends, monkeypatch):
    """A decode step's CPU parts on the queue's thread: each waits for its own routing (written
    here later, as the GPU's copies would land), computes, and opens its gate, in order, while
    the submitting thread goes on. A part that fails (an expert id out of range) and the parts
    behind it still open their gates; `wait` raises the failure once, and the queue runs the
    next step's parts."""
    if backends[0] == "torch":
        pytest.skip("no native kernels")
    import time

    monkeypatch.setenv(cpu_kernels.ENV, backends[0])
    hidden, inter = FUSED_SIZES[1]
    store, family, experts = swiglu_store(torch.bfloat16, False, hidden, inter), swiglu_family(False), SiluExperts()
    gate = torch.zeros(1, dtype=torch.int32)
    layers, bufs = [], []
    gen = torch.Generator().manual_seed(5)
    stored = [1, 4, 1]   # the store's layers; a step's parts are bound each to buffers of its own
    for layer in stored:
        buf = {**table_layer_buffers(hidden, 2, store.num_experts), "gate": gate}
        layers.append(cpu_kernels.bind_table_layer(family, experts, store, layer, reads=None, **buf))
        bufs.append(buf)
    queue = cpu_kernels.LayerQueue()
    for step in (1, 2):
        for layer, buf in enumerate(bufs):
            buf["ids"].copy_(torch.tensor([layer, 9 - layer]))
            buf["weights"].copy_(torch.rand(2, generator=gen))
            buf["x"].copy_(torch.randn(hidden, generator=gen))
        bad = step == 1
        if bad:
            bufs[1]["ids"][0] = store.num_experts
        began = time.monotonic_ns()
        tickets = [queue.submit(part, step, 3 * step + layer) for layer, part in enumerate(layers)]
        assert tickets == list(range(3 * step - 2, 3 * step + 1))   # one count over the queue's life
        for layer, buf in enumerate(bufs):
            time.sleep(0.01)
            if not (bad and layer == 2):   # behind a failure a part only opens its gate
                assert int(gate) < 3 * step + layer   # nothing opened before its routing landed
                assert not queue.ran(tickets[layer])
            buf["ready"].fill_(step)
            if not bad:   # the host counts each layer as its part finishes
                assert queue.wait_for(tickets[layer]) and int(gate) >= 3 * step + layer
        if bad:
            assert not queue.wait_for(tickets[2])   # the host stops counting at a failure
            with pytest.raises(RuntimeError, match=r"expert id 10 is not in \[0, 10\)"):
                queue.wait()
            assert int(gate) == 3 * step + 2
            continue
        queue.wait()
        assert queue.idle() and int(gate) == 3 * step + 2
        spans = [part.span() for part in layers]
        assert began <= spans[0][0] and all(a <= b for a, b in spans) and spans[-1][1] <= time.monotonic_ns()
        assert all(spans[i][1] <= spans[i + 1][0] for i in range(2))   # in order, one at a time
        for layer, (part, buf) in enumerate(zip(layers, bufs)):
            ref = swiglu_reference(store, stored[layer], buf["ids"].tolist(), buf["weights"].tolist(), buf["x"], False)
            assert rel_err(buf["out"][None], ref) < TOL
            assert part.stats()[2] == 2


def test_layer_queue_refuses_a_forked_child_clearly(backends):
    """A child forked after the queue was made has the object but not its thread: submitting
    there is one clear error, not a step that waits forever."""
    if backends[0] == "torch":
        pytest.skip("no native kernels")
    import multiprocessing

    hidden, inter = FUSED_SIZES[1]
    store, family, experts = swiglu_store(torch.float32, False, hidden, inter), swiglu_family(False), SiluExperts()
    part = cpu_kernels.bind_table_layer(family, experts, store, 1, reads=None,
                                        **table_layer_buffers(hidden, 2, store.num_experts, torch.float32))
    queue = cpu_kernels.LayerQueue()
    ctx = multiprocessing.get_context("fork")
    said = ctx.Queue()

    def child():
        try:
            queue.submit(part, 0, 1)
            said.put("submitted")
        except RuntimeError as e:
            said.put(str(e))

    proc = ctx.Process(target=child)
    proc.start()
    proc.join(30)
    assert "forked" in said.get(timeout=5)
    assert queue.idle()
