"""The CPU expert kernels (runtime/cpu_kernels.py, runtime/csrc) against float64 references.

Weights in bf16, fp16 and fp32 are exact in fp32 and the kernels accumulate in fp32, so
the only error left is the order of fp32 sums: a relative error far below 1e-5. Every
instruction set this CPU runs is checked, and so is the torch fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

import runtime
from runtime import cpu_kernels
from runtime.config import RuntimeConfig
from runtime.cpu_experts import CpuExperts
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
