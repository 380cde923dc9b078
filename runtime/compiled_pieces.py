"""The decode step's pieces as functions of their modules and buffers, compiled once for all layers.

A decode layer run by the model's own modules launches about eighty small kernels
(each RMSNorm alone is half a dozen elementwise ones); inside a CUDA graph each still
costs a few microseconds, which at batch 1 is most of a layer's time. Compiled with
torch.compile they fuse into a handful. Each function below takes the layer's modules
and tensors as arguments rather than reading them from the engine, so one compiled
graph serves every layer of a kind (the modules' parameters are graph inputs) and
nothing recompiles per layer. They write into the caller's static buffers, as the
captured graphs need.

`Pieces(compile=False)` runs the same functions eagerly: CUDA graphs capture either.
"""

from __future__ import annotations

import os
import warnings

import torch

from specmoe.moe_block import indexed_available, routed_output

from . import telemetry


def attention_block(layer, x, rope, mask, pos, cache, cache_kw: str, r_out, s_out, host_part=None) -> None:
    """r = x + attn(LN(x)), s = LN_post(r), into r_out and s_out. `host_part`: the CPU's experts
    of the layer before (float32, in pinned memory), first added to x, rounded once as the
    eager path adds them, and cleared for the next step: compiled, one kernel reads it where
    a copy and two kernels would run."""
    if host_part is not None:
        add_host_part(x, host_part)
    h = layer.input_layernorm(x)
    a = layer.self_attn(hidden_states=h, position_embeddings=rope, attention_mask=mask,
                        position_ids=pos.reshape(1, 1), **{cache_kw: cache})[0]
    r_out.copy_(x + a)
    s_out.copy_(layer.post_attention_layernorm(r_out))


def add_host_part(x, host_part) -> None:
    """x += the CPU's part (float32, rounded once into x's dtype), then the part cleared."""
    x.add_(host_part.view(x.shape))
    host_part.zero_()


def dense_mlp(mlp, r, s, x_out) -> None:
    x_out.copy_(r + mlp(s))


def route(family, router, s, ids_out, w_out, wsel_out, wsel_from=None) -> None:
    """The true routing of s into ids_out / w_out; wsel_out gets the weights the experts will
    use (the true ones, or `wsel_from`: a prediction's, in speculation)."""
    logits = family.router_logits(router, s)
    ids, w = family.route(router, logits)
    ids_out.copy_(ids)
    w_out.copy_(w)
    wsel_out.copy_(w if wsel_from is None else wsel_from)


def experts_from_slots(family, experts, shared, s, stack, slots, weights, r, x_out, strategy: str = "auto") -> None:
    """x = r + sum_j w_j Expert_{slot_j}(s) (+ shared(s))."""
    _residual(routed_output(family, experts, s, stack, slots, weights, strategy=strategy), shared, s, r, x_out)


def _residual(out, shared, s, r, x_out) -> None:
    """x = r + out (+ shared(s))."""
    if shared is not None:
        out = out + shared(s).to(out.dtype)
    x_out.copy_(r + out.reshape(x_out.shape))


def experts_from_table(family, experts, shared, s, stack, table_row, zero_slot: int, ids, weights, r, x_out,
                       host_reads=None) -> None:
    """The same with slots looked up in the device table; experts not on the GPU (the zero
    slot) weigh 0 here and are added afterwards. `host_reads` (host stack, expert -> its row,
    take table [k + 1]): of n misses, the first take[n] in routing order are computed here
    from their weights in host memory, read in place over PCIe."""
    slots = table_row[ids]
    hit = slots != zero_slot
    w = weights * hit.to(weights.dtype)
    strategy = "auto"
    if indexed_available(s.device):
        # A miss on the indexed kernel reads no weight (a negative slot); on the zero slot it
        # would read a whole expert for a product weighed 0, once per miss.
        slots, strategy = torch.where(hit, slots, torch.full_like(slots, -1)), "indexed"
    if host_reads is None:
        experts_from_slots(family, experts, shared, s, stack, slots, w, r, x_out, strategy)
        return
    host_stack, rows, take = host_reads
    miss = ~hit
    rank = torch.cumsum(miss.to(torch.long), dim=-1)          # 1, 2, ... at each miss
    read = miss & (rank <= take[rank[..., -1:]])
    # Rows not read are -1: the indexed kernel reads nothing for them.
    host_rows = torch.where(read, rows[ids], torch.full_like(ids, -1))
    out = routed_output(family, experts, s, stack, slots, w, strategy=strategy)
    # Indexed: only the rows read cross PCIe (a dense strategy would read every expert there).
    out = out + routed_output(family, experts, s, host_stack, host_rows, weights * read.to(weights.dtype),
                              strategy="indexed")
    _residual(out, shared, s, r, x_out)


def add_experts(family, experts, s, stack, slots, weights, mask, x) -> None:
    """x += sum_j w_j m_j Expert_{slot_j}(s): the experts a table lookup missed, once on the GPU."""
    out = routed_output(family, experts, s, stack, slots, weights * mask.to(weights.dtype))
    x.copy_(x + out.reshape(x.shape))


def head(norm, lm_head, x, logits_out) -> None:
    logits_out.copy_(lm_head(norm(x)[0, -1:]).float())


def predict(family, kind, residual, s, ids, weights, pid_out, pw_out, source_norm, target_norm, router,
            default_vectors, shared, correction, routing_features, normed_features) -> None:
    """The estimators stage's prediction of a later layer from this one (estimators.predict_target,
    on one target's parts) into pid_out / pw_out. The parts come as arguments: one trace serves
    every layer of a kind. Compiled, its thirty-odd float32 kernels (default mix, norm, router,
    top-k, sort by weight) fuse into a few."""
    from estimators import SourceState, predict_target

    state = SourceState(residual=residual, ids=ids, weights=weights, normed=s)
    pid, pw = predict_target(family, kind, state, source_norm=source_norm, target_norm=target_norm, router=router,
                             default_vectors=default_vectors, shared=shared, correction=correction,
                             routing_features=routing_features, normed_features=normed_features)
    pid_out.copy_(pid)
    pw_out.copy_(pw)


def add_hits(predicted, true, hits, exact) -> None:
    """The prediction's hit counters (telemetry.add_hits): compiled, one kernel where eager
    launches eight."""
    telemetry.add_hits(predicted, true, hits, exact)


_FUNCTIONS = ("attention_block", "dense_mlp", "route", "experts_from_slots", "experts_from_table", "add_experts",
              "head", "add_hits", "predict")
# The pieces whose shapes do not depend on the GPU expert budget. The expert pieces take the
# slot stack, whose length is the budget: compiled, every budget would be a new compilation
# (and past torch's recompile limit, eager anyway); they are a few kernels in any case.
_COMPILED = ("attention_block", "dense_mlp", "route", "head", "add_hits", "predict")
_compiled: dict[tuple[str, str, str | None], object] = {}


class Pieces:
    """The functions above, compiled (shared by every engine of the process, so benchmark
    modes compile once) or eager. A piece whose compilation fails runs eagerly from then
    on, with one warning."""

    def __init__(self, compile: bool, backend: str = "inductor", mode: str | None = None):
        # mode: torch.compile's (inductor); "max-autotune-no-cudagraphs" tunes the matrix
        # products too. Modes that capture CUDA graphs themselves are not for pieces that
        # are captured here.
        self.compile, self.backend, self.mode = compile, backend, mode
        if compile and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
            # Inductor's default is a pool of compile worker processes, one per core, started
            # beside the compilation; while they start they take the cores that CPU experts
            # (`cpu`) run on, whose parallel regions then wait for time slices. The pieces
            # are a few small graphs: compiling them in this process costs about as much.
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = 1

    def __getattr__(self, name: str):
        fn = globals()[name] if name in _FUNCTIONS else None
        if fn is None:
            raise AttributeError(name)
        if not self.compile or name not in _COMPILED:
            return fn
        key = (name, self.backend, self.mode)
        if key not in _compiled:
            extra = {"mode": self.mode} if self.mode else {}
            _compiled[key] = _Guarded(name, torch.compile(fn, dynamic=False, backend=self.backend, **extra), fn)
        return _compiled[key]


class _Guarded:
    def __init__(self, name, compiled, eager):
        self.name, self.compiled, self.eager, self.failed = name, compiled, eager, False

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any compiler failure: the eager function is exact
                self.failed = True
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                warnings.warn(f"specmoe: compiling the decode piece {self.name} failed ({first}); "
                              "it runs uncompiled", stacklevel=2)
        return self.eager(*args, **kwargs)
