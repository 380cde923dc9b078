"""Decode steps replayed from CUDA graphs: one launch where eager PyTorch makes dozens.

At batch 1 a decode layer's GPU work takes microseconds; launching it kernel by
kernel from Python takes far longer. Each decode step is cut where the host must
decide something, and every piece in between is captured once and replayed:

    prologue        token -> x, rotary tables, attention masks (position from a device buffer)
    pre[l]          the CPU's part of the layer before (`cpu`: read in pinned memory),
                    attention, residual, router input s_l, the true routing of l, the
                    prediction for l+h (estimator predictors), prediction hits
    ----            host: table changes, or (speculate) the predicted slots (offloaded_moe)
    post[l]         the experts of l over the GPU slots (device table, or fed slots), the
                    shared expert, residual
    ----            host: reads l's ids, adds misses (the fix-up graph, or the CPU's part),
                    queues copies of predicted experts
    epilogue        final norm, LM head

A step with every expert of every MoE layer on the GPU and its prediction made inside the
graphs needs none of those decisions: its graphs are queued with none between them, the host
at most a layer ahead of the GPU, and it counts the step's uses afterwards (`all_resident`).
Nothing reads its predictions before the next layer's routing, so such steps replay graphs of
their own in which each layer's prediction runs on a second stream beside its experts, off
the GPU's path (`predicts_beside_experts`).

With the `cpu` miss policy and nothing copied during decode (no predictor, no demand
copies), the host runs ahead: each layer's graphs copy their routing, input and the step's
count into pinned memory themselves, and the graphs after a layer with a CPU part wait
behind a gate on the compute stream (streams.HostGate). Where every MoE layer has native
kernels the whole step is queued at once: each layer's CPU part (cpu_kernels.TableLayer)
goes to a thread of the extension's (cpu_kernels.LayerQueue) that spins until the layer's
count lands, computes and opens the gate, so from the GPU's routing to the GPU's next layer
there is no launch, no copy issued, no Python, and the host's own queuing is off that path.
Elsewhere the Python path queues one layer ahead and computes the part itself. Layers with
every expert on the GPU are not waited for; the host counts their hits once their routing
has landed. Off CUDA the same step runs with its pieces behind an emulated gate
(streams.QueuedGate), this thread playing the stream, when a test asks for it.

Dense layers are one graph each. The step's graphs share one memory pool and are
replayed in the order they were captured; the fix-up graph, replayed between them, has
its own. Every value that outlives a graph lives in a static buffer allocated here. The
pieces are runtime.compiled_pieces' functions, compiled once for all layers. Off CUDA
the same pieces are called in turn instead of replayed, so the CPU test suite covers
this path's host decisions.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

import torch

from .compiled_pieces import Pieces, add_host_part
from .cpu_kernels import LayerQueue
from .host_store import device_view
from .kv_cache import attention_masks
from .predict import EstimatorPredictor
from .streams import HostGate, QueuedGate


def _static_like(obj):
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj)
    return type(obj)(_static_like(o) for o in obj)


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    else:
        for d, s in zip(dst, src):
            _copy_into(d, s)


class _Eager:
    """A piece called at each replay (a CUDA graph's stand-in off CUDA); behind a QueuedGate
    when a run-ahead step is emulated."""

    def __init__(self, fn, gate=None):
        self.replay = fn if gate is None else (lambda: gate.submit(fn))


class _Tally:
    """A queued step's counting (uses, hits, the cache's order, CPU time) of its layers, in
    order, each once its CPU part has run (a resident layer: once its routing has landed),
    the parts' stats read in batches from one array (48 layers in about 0.2 ms of host time,
    against 1.5 ms counted one by one)."""

    def __init__(self, graphs, queue, begin: int):
        self.graphs, self.queue, self.begin = graphs, queue, begin
        self.parts: list = []   # (layer, its part's ticket or None: every expert on the GPU)
        self.counted = 0
        self.failed = False
        self.first = self.last = None   # the first part's start, the last counted part's end
        self.queued = self.seen = None  # when the step's last graph was queued; its last part seen done

    def count(self, block: bool) -> None:
        """Count the layers whose parts have run (block: every layer, playing an emulated
        gate's stream meanwhile); stops at a failed part (the step's wait raises it)."""
        g, moe, queue = self.graphs, self.graphs.moe, self.queue
        if self.failed:
            return
        end = self.counted
        if block:
            g.gate.run_until(queue.idle)
            end = len(self.parts)
        else:
            while end < len(self.parts) and self._ran(*self.parts[end]):
                end += 1
        if end == self.counted:
            return
        tickets = [t for _, t in self.parts[self.counted:end] if t is not None]
        if tickets and not queue.wait_for(tickets[-1]):
            self.failed = True
            return
        self.seen = time.monotonic_ns()
        # One event after every experts graph queued so far: the counted layers' slots are
        # free for reuse once it has passed.
        released = moe.streams.host_event()
        batch = []
        for layer, ticket in self.parts[self.counted:end]:
            if ticket is not None:
                batch.append(layer)
                continue
            self._count_parts(batch, released)
            batch = []
            moe.count_resident(layer, g, released, g._count)
        self._count_parts(batch, released)
        self.counted = end

    def _ran(self, layer: int, ticket) -> bool:
        if ticket is None:
            return self.graphs.moe.routing_landed(layer, self.graphs, self.graphs._count)
        return self.queue.ran(ticket)

    def _count_parts(self, layers: list[int], released) -> None:
        if not layers:
            return
        stats = self.graphs._part_stats_np[layers]
        self.graphs.moe.count_run_ahead(layers, self.graphs, released, stats)
        self.first = self.first or int(stats[0, 5])
        self.last = int(stats[-1, 6])

    def record(self) -> None:
        if self.first is not None:
            self.graphs.moe.telemetry.count_queued_step(self.begin, self.first, self.last, self.queued, self.seen,
                                                        time.monotonic_ns())


class DecodeGraphs:
    # Run-ahead steps queued whole, their CPU parts on the native queue's thread, where every
    # MoE layer has native kernels (False: the Python path, for comparisons).
    native_layers = True
    # How many CPU parts a queued step's host may have submitted ahead of the last one that
    # has run before it queues the next layer (0: no limit). The host then counts layers as
    # their parts finish instead of after queuing the whole step; on 48 layers 2, 4 and no
    # limit decoded equally fast within the noise (benchmarks/results/profile_decode_tail.md).
    queue_ahead = 2
    # Steps with every expert on the GPU queued with no host decision (all_resident); False:
    # they take the path their mode takes otherwise, reading each layer's routing (comparisons).
    resident_steps = True
    # ... with the host at most this many layers ahead of the GPU (0: the whole step at once,
    # which decoded slower on the H200 machine: benchmarks/results/profile_decode_resident.md).
    resident_depth = 1
    # Off CUDA, run ahead behind a QueuedGate (pieces wait in a queue instead of a stream):
    # no faster there, but the CPU test suite then covers the run-ahead step's host path.
    emulate_gate = False

    def __init__(self, engine):
        self.engine = e = engine
        moe = e.moe
        self.moe = moe
        dev, dt = e.device, e.dtype
        H, k = e.spec.hidden_size, e.spec.top_k
        self.token = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.pos = torch.full((1,), e.max_context - 1, dtype=torch.long, device=dev)
        self.x = torch.zeros((1, 1, H), dtype=dt, device=dev)
        self.r = torch.zeros_like(self.x)
        self.s = torch.zeros_like(self.x)
        self.logits = None
        self.ids, self.w, self.wsel, self.slot = {}, {}, {}, {}
        self.pred_ids, self.pred_w = {}, {}
        self.graphable_prediction = isinstance(moe.predictor, EstimatorPredictor)
        self.speculate = moe.on_miss == "speculate"
        self.pieces = Pieces(compile=e.compile, mode=None if e.compile_mode == "default" else e.compile_mode)
        self._rope = None
        self._masks = None
        self._graphs: list[tuple[str, int, torch.cuda.CUDAGraph]] = []
        # Layers whose experts graph reads misses from host memory (host_read_share) have a
        # second one without those reads, replayed while every expert of the layer is on the GPU.
        self._plain_posts: dict[int, object] = {}
        # Misses of a table lookup, added by one more graph: slots and 0/1 mask come in one
        # copy from pinned memory, the routing weights from the layer's buffer.
        self.fix_pack = torch.full((2, k), moe.slots.zero_slot, dtype=torch.long, device=dev)
        pin = dev.type == "cuda"
        self._fix_staging = torch.empty((2, k), dtype=torch.long, pin_memory=pin)
        self._fix_np = self._fix_staging.numpy()
        self._token_host, self._token_done = None, [None, None]   # pinned staging of a host token (_set_token)
        self.fix_w = None
        self._fix_graph = None
        # The CPU's part of each MoE layer, one row per layer: the CPU writes it in pinned memory
        # and the next graph that reads x adds it from there in place (no copy queued between the
        # gate and that graph) and clears it. A row is written again only in the next step.
        self.host_parts = torch.zeros((len(e.layers), H), dtype=torch.float32, pin_memory=pin)
        self._host_parts_dev = device_view(self.host_parts, dev) if pin else self.host_parts
        self._host_np = self.host_parts.numpy()
        # graph -> the MoE layer whose CPU part it adds: the layer just before it (-1: the
        # epilogue); none where the mode has no CPU part (only `cpu` has one)
        self._host_from = {}
        if moe.on_miss == "cpu" and moe.cpu is not None:
            moe_set = set(e._moe_layers)
            self._host_from = {l: l - 1 for l in range(1, len(e.layers)) if l - 1 in moe_set}
            if len(e.layers) - 1 in moe_set:
                self._host_from[-1] = len(e.layers) - 1
        # Off CUDA a piece runs when it is "queued": running ahead would compute the next layer
        # before this one's CPU part is added, unless the pieces wait behind an emulated gate.
        self.gate = HostGate(moe.streams) if dev.type == "cuda" else (QueuedGate() if self.emulate_gate else None)
        self.run_ahead = bool(e.run_ahead and self.gate is not None and self.gate.available
                              and moe.runs_ahead())
        self.staged: dict[int, tuple] = {}   # layer -> pinned (ids, s, w, count) its pre graph reads into
        # Counts the steps on the device (the prologue adds one); a pre graph copies it last, so
        # the host knows the layer's staged routing is this step's once the count has landed.
        self.step_count = torch.zeros(1, dtype=torch.long, device=dev)
        self._count = 0
        self._natives: dict[int, object] = {}
        # What each layer's native CPU part did at its last run (TableLayer's stats), one row
        # per layer: the host reads a step's in one go.
        self.part_stats = torch.zeros((len(engine.layers), 7), dtype=torch.int64)
        self._part_stats_np = self.part_stats.numpy()
        self._queue = None
        self._w32: dict[int, torch.Tensor] = {}
        self._part_written = False
        # Steps with every expert on the GPU replay these instead (_pieces(resident=True)), where
        # there is a prediction to take off the GPU's path: on this stream beside the experts.
        self._resident_graphs: list | None = None
        self._side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self._capture()
        # What all_resident needs besides every expert on the GPU, fixed once captured: every
        # MoE layer looks its experts up in the device table, any prediction is made in the graphs.
        self._table_only = (moe.predictor is None or self.graphable_prediction) and self._every_layer_on_table()

    # ---------------------------------------------------------------- pieces (run eagerly to warm up, then captured)

    def _prologue(self):
        e = self.engine
        x = e.embed(self.token)
        rope = e.base.rotary_emb(x, self.pos.reshape(1, 1))
        masks = attention_masks(set(e._kinds), self.pos, e.max_context, e._window, x.dtype)
        if self._rope is None:
            self._rope = _static_like(rope)
            self._masks = {k: torch.empty_like(v) for k, v in masks.items()}
        self.x.copy_(x)
        if self.run_ahead:
            self.step_count.add_(1)
        _copy_into(self._rope, rope)
        for kind, m in masks.items():
            self._masks[kind].copy_(m)
        e.cache.set_positions(self.pos)

    def _host_row(self, l: int):
        """The CPU's part of the MoE layer before graph l (-1: the epilogue) for that graph to
        add from pinned memory and clear (zeros when it had none), or None."""
        src = self._host_from.get(l)
        return None if src is None else self._host_parts_dev[src:src + 1]

    def host_part(self, layer: int) -> torch.Tensor:
        """Where the CPU writes its part of `layer` (float32 [1, H], pinned)."""
        return self.host_parts[layer:layer + 1]

    def _attention(self, l: int):
        e = self.engine
        self.pieces.attention_block(e.layers[l], self.x, self._rope, self._masks[e._kinds[l]], self.pos,
                                    e.cache.layer(l), e._cache_kw, self.r, self.s, self._host_row(l))

    def _dense(self, l: int):
        self._attention(l)
        self.pieces.dense_mlp(self.engine.layers[l].mlp, self.r, self.s, self.x)

    def _source_routing(self, l: int):
        """The routing layer l's prediction starts from: the predicted one in speculate
        (predictions chain), the true one otherwise."""
        if self.speculate and l in self.pred_ids:
            return self.pred_ids[l], self.pred_w[l]
        return self.ids[l], self.w[l]

    def _pre(self, l: int, predict: bool = True):
        """Attention, the true routing of l, its prediction's hits and (predict) the prediction
        for a later layer: the host reads it after this graph to place that layer's experts."""
        moe = self.moe
        self._attention(l)
        s = self.s.reshape(1, -1)
        if l not in self.ids:
            ids, w = moe._route(l, s)
            self.ids[l], self.w[l] = torch.empty_like(ids), torch.empty_like(w)
            self.wsel[l] = torch.empty_like(w)
            self.slot[l] = torch.full(ids.shape, moe.slots.zero_slot, dtype=torch.long, device=ids.device)
        wsel_from = self.pred_w[l] if self.speculate and l in self.pred_ids else None
        self.pieces.route(moe.family, moe._routers[l], s, self.ids[l], self.w[l], self.wsel[l], wsel_from)
        tel = moe.telemetry
        if tel.track_hits and l in self.pred_ids:
            tel.prefetch_hits_device(l, self.pred_ids[l], self.ids[l], count=False, add=self.pieces.add_hits)
        if predict:
            self._predict(l)
        if self.run_ahead:
            self._stage_reads(l)

    def _predict(self, l: int) -> None:
        """The prediction made at layer l (for predictor.target_of(l)) into pred_ids / pred_w,
        from l's residual, router input and routing, which the experts graph only reads."""
        moe = self.moe
        target = moe.predictor.target_of(l) if moe.predictor is not None else None
        if target is None or not self.graphable_prediction:
            return
        src_ids, src_w = self._source_routing(l)
        r, s = self.r.reshape(1, -1), self.s.reshape(1, -1)
        parts = moe.predictor.target_parts(target)
        if parts is None or target not in self.pred_ids:
            # Eager: a predictor without parts, or the warm-up pass sizing the buffers.
            pid, pw = moe.predictor.predict(target, r, s, src_ids, src_w, 0)
            if target not in self.pred_ids:
                self.pred_ids[target], self.pred_w[target] = torch.empty_like(pid), torch.empty_like(pw)
        if parts is None:
            self.pred_ids[target].copy_(pid)
            self.pred_w[target].copy_(pw)
        else:
            kind, parts = parts
            self.pieces.predict(moe.family, kind, r, s, src_ids, src_w, self.pred_ids[target],
                                self.pred_w[target], **parts)

    def _stage_reads(self, l: int) -> None:
        """Copies of layer l's routing and input to pinned memory, inside its pre graph: the
        host of a run-ahead step reads them once the graph is done."""
        if l not in self.staged:
            self._w32[l] = torch.empty(self.w[l].shape, dtype=torch.float32, device=self.w[l].device)
            self.staged[l] = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=self.moe.streams.cuda)
                                   for t in (self.ids[l], self.s.reshape(1, -1), self._w32[l], self.step_count))
        self._w32[l].copy_(self.w[l])
        # The count last: copies on one stream land in order.
        for host, dev in zip(self.staged[l], (self.ids[l], self.s.reshape(1, -1), self._w32[l], self.step_count)):
            self.moe.streams.copy_on_current(host, dev)

    def host_fed(self, l: int) -> bool:
        """Whether layer l's experts graph reads slots the host fed (speculation on a
        prediction) rather than looking them up in the device table (exact)."""
        if not self.moe.device_table:
            return True
        return self.speculate and (l in self.pred_ids or not self.graphable_prediction)

    def _post(self, l: int, reads: bool = True, predict: bool = False):
        """The experts of l and the residual; with `predict`, l's prediction beside them on a
        second stream (a step with every expert on the GPU: no host reads it, and the next
        layer's hit counting comes after this graph), so it does not lengthen the step."""
        if not predict or self._side is None:
            if predict:
                self._predict(l)
            self._experts(l, reads)
            return
        main = torch.cuda.current_stream(self.engine.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            self._predict(l)
        self._experts(l, reads)
        main.wait_stream(self._side)

    def _experts(self, l: int, reads: bool = True):
        moe = self.moe
        s = self.s.reshape(1, -1)
        experts, shared, stack = moe._experts[l], moe._shared[l], moe.slots.stack
        if self.host_fed(l):
            # speculate: the host placed the predicted experts and fed their slots
            self.pieces.experts_from_slots(moe.family, experts, shared, s, stack, self.slot[l], self.wsel[l],
                                           self.r, self.x)
        else:
            # exact (and the first MoE layer of speculate): slots looked up in the device table
            self.pieces.experts_from_table(moe.family, experts, shared, s, stack, moe.table_row(l),
                                           moe.slots.zero_slot, self.ids[l], self.w[l], self.r, self.x,
                                           moe.host_reads(l) if reads else None)

    def _fix(self):
        moe = self.moe
        first = moe.spec.moe_layers[0]
        self.pieces.add_experts(moe.family, moe._experts[first], self.s.reshape(1, -1), moe.slots.stack,
                                self.fix_pack[0:1], self.fix_w, self.fix_pack[1:2], self.x)

    def fix(self, layer: int, choices: list[tuple[int, int]]) -> None:
        """Add the experts of `layer` at (choice j, slot) to x, after the table graph left them out."""
        staging = self._fix_np
        staging[0] = self.moe.slots.zero_slot
        staging[1] = 0
        for j, slot in choices:
            staging[0, j] = slot
            staging[1, j] = 1
        self.fix_pack.copy_(self._fix_staging, non_blocking=True)
        self.fix_w.copy_(self.w[layer])
        self._fix_graph.replay()

    def add_host(self, layer: int, part: torch.Tensor) -> None:
        """x += part (float32 [1, H] on the host: the CPU's experts of `layer`), by the next
        graph that reads x, from pinned memory: nothing is queued on the host's path."""
        row = self.host_part(layer)
        if part.data_ptr() != row.data_ptr():   # not written in place by the CPU
            self._host_np[layer] = part.reshape(-1).numpy()
        self._part_written = True

    def _epilogue(self):
        e = self.engine
        row = self._host_row(-1)
        if row is not None:
            add_host_part(self.x, row)
        if self.logits is None:
            self.logits = e.model.lm_head(e.base.norm(self.x)[0, -1:]).float()
        self.pieces.head(e.base.norm, e.model.lm_head, self.x, self.logits)

    def _pieces(self, resident: bool = False):
        """The step's pieces in order; `resident`: the variant for steps with every expert on the
        GPU, each layer's prediction made beside its experts instead of before them."""
        e = self.engine
        yield "prologue", -1, self._prologue
        for l in range(len(e.layers)):
            if l in e._moe_layers:
                yield "pre", l, (lambda l=l: self._pre(l, predict=not resident))
                yield "post", l, (lambda l=l: self._post(l, reads=not resident, predict=resident))
            else:
                yield "dense", l, (lambda l=l: self._dense(l))
        yield "epilogue", -1, self._epilogue

    @torch.inference_mode()
    def _capture(self) -> None:
        # Predicted buffers must exist before the layers that read them are captured:
        # one eager pass allocates every static buffer. The warm-up and capture passes add to
        # the device-side hit counters: keep what earlier steps (the prefill) counted.
        tel = self.moe.telemetry
        counted = tel.save_device_counters()
        if self.engine.device.type != "cuda":
            self._capture_eager()
            tel.restore_device_counters(*counted)
            return
        side = torch.cuda.Stream(self.engine.device)
        self._graphs = self._warm_and_capture(side, passes=2)
        if self._wants_resident_variant():
            self._resident_graphs = self._warm_and_capture(side, passes=1, resident=True)
        self._count = int(self.step_count.item())   # what the warm-up passes counted
        plain_pool = torch.cuda.graph_pool_handle()   # replayed instead of a step graph, in layer order
        for l in self._reading_layers():
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=plain_pool):
                self._post(l, reads=False)
            self._plain_posts[l] = g
        if self._moe_table_layers():
            # Replayed between the step's graphs, so in a pool of its own. The fix-up adds into x:
            # keep x as it was.
            x = self.x.clone()
            self.fix_w = torch.zeros_like(self.w[self.moe.spec.moe_layers[0]])
            with torch.cuda.stream(side):
                self._fix()
            torch.cuda.current_stream(self.engine.device).wait_stream(side)
            self._fix_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._fix_graph):
                self._fix()
            self.x.copy_(x)
        tel.restore_device_counters(*counted)

    def _warm_and_capture(self, side, passes: int, resident: bool = False) -> list:
        """The step's pieces run eagerly on a side stream (compilations, library workspaces),
        then captured one graph each, in one memory pool: replayed in the order captured."""
        dev = self.engine.device
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(passes):
                for _, _, fn in self._pieces(resident):
                    fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for kind, l, fn in self._pieces(resident):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                fn()
            graphs.append((kind, l, g))
        return graphs

    def _capture_eager(self) -> None:
        """Off CUDA, each piece is 'replayed' by calling it: the same step, host decisions and
        static buffers, which lets the CPU test suite run the graphed decode path."""
        for _, _, fn in self._pieces():
            fn()
        gate = self.gate if self.run_ahead else None
        self._graphs = [(kind, l, _Eager(fn, gate)) for kind, l, fn in self._pieces()]
        self._plain_posts = {l: _Eager(lambda l=l: self._post(l, reads=False), gate) for l in self._reading_layers()}
        if self._wants_resident_variant():
            self._resident_graphs = [(kind, l, _Eager(fn)) for kind, l, fn in self._pieces(resident=True)]
        self._count = int(self.step_count.item())
        if self._moe_table_layers():
            self.fix_w = torch.zeros_like(self.w[self.moe.spec.moe_layers[0]])
            self._fix_graph = _Eager(self._fix)

    def _wants_resident_variant(self) -> bool:
        """Whether steps with every expert on the GPU get graphs of their own: a prediction made
        inside the graphs, a device table at every MoE layer, and a budget that holds every
        expert (otherwise such a step never comes)."""
        moe = self.moe
        return (self.graphable_prediction and bool(self.pred_ids) and self._every_layer_on_table()
                and moe.slots.num_slots >= len(moe.spec.moe_layers) * moe.spec.num_experts)

    def _every_layer_on_table(self) -> bool:
        """Every MoE layer's experts graph looks its slots up in the device table (none fed by
        the host)."""
        return all(not self.host_fed(l) for l in self.moe.spec.moe_layers)

    def _reading_layers(self) -> list[int]:
        return [l for l in self.moe.spec.moe_layers if not self.host_fed(l) and self.moe.host_reads(l) is not None]

    def _experts_graph(self, l: int, g):
        """The experts graph to replay for layer l: without host reads when the layer misses
        nothing (the reads' selection and second product would compute zeros)."""
        plain = self._plain_posts.get(l)
        return plain if plain is not None and self.moe.layer_resident(l) else g

    def _moe_table_layers(self) -> bool:
        return any(not self.host_fed(l) for l in self.moe.spec.moe_layers)

    def device_ms(self, repeats: int = 10, warmup: int = 2) -> float:
        """Median milliseconds of the step's graphs replayed back to back, with no host
        decision between them: the device's own time for a step (meaningful when every
        expert is resident)."""
        times = []
        graphs = self._replays(self.all_resident())
        for _ in range(warmup + repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _, _, g in graphs:
                g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        self._count = int(self.step_count.item())   # the prologue counted these replays
        return statistics.median(times[warmup:])

    def _replays(self, resident: bool) -> list:
        """(kind, layer, graph) a step replays with no host decision between them: with every
        expert on the GPU (`resident`) the graphs of its own where captured; otherwise the
        step's graphs, each experts graph without host reads where its layer misses nothing."""
        if resident and self._resident_graphs is not None:
            return self._resident_graphs
        return [(kind, l, self._experts_graph(l, g) if kind == "post" else g) for kind, l, g in self._graphs]

    @property
    def predicts_beside_experts(self) -> bool:
        """Whether steps with every expert on the GPU make their prediction beside the experts
        (graphs of their own) rather than before them."""
        return self._resident_graphs is not None

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    # ---------------------------------------------------------------- one decode step

    def _set_token(self, token: torch.Tensor) -> None:
        """The step's token into the graphs' input. A token on the host goes through one of two
        pinned buffers in turn: from pageable memory the copy would wait for the stream to drain
        (the previous step's work, when the caller did not wait for it)."""
        token = token.reshape(1, 1)
        if token.device.type != "cpu" or self.token.device.type == "cpu":
            self.token.copy_(token)
            return
        if self._token_host is None:
            self._token_host = [torch.empty((1, 1), dtype=self.token.dtype, pin_memory=True) for _ in range(2)]
        turn = self._count % 2
        if self._token_done[turn] is not None:
            self._token_done[turn].synchronize()   # the step before last has read this buffer
        self._token_host[turn].copy_(token)
        self.moe.streams.copy_on_compute(self.token, self._token_host[turn])
        self._token_done[turn] = self.moe.streams.record_on_compute()

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        e, moe = self.engine, self.moe
        self._set_token(token)
        self.pos.fill_(e.cache.length)
        moe.engine_position = e.cache.length
        moe.begin_step()
        self._count += 1
        try:
            if self.resident_steps and self.all_resident():
                self._step_resident()
            elif self.run_ahead:
                self._step_run_ahead()
            else:
                for kind, l, g in self._graphs:
                    (self._experts_graph(l, g) if kind == "post" else g).replay()
                    if kind == "pre":
                        moe.graphed_layer(l, self)
                    elif kind == "post":
                        moe.after_graphed_compute(l, self)
        except BaseException:
            # A failed step may leave CPU parts that no graph of it added (their layers' successors
            # were never queued): the next step must not add them. Its gates are all open, so the
            # stream drains.
            try:
                moe.streams.synchronize()
            finally:
                self._host_np.fill(0.0)
            raise
        e.cache.length += 1
        return self.logits.clone()

    def all_resident(self) -> bool:
        """Whether a step needs no host decision: every MoE layer looks its experts up in the
        device table and holds all of them, and any prediction is made inside the graphs."""
        return self._table_only and self.moe.all_resident()

    def _step_resident(self) -> None:
        """The step's graphs queued with no host decision between them: no layer can miss, so
        the host reads no routing and copies nothing; it counts the step's uses at the end.
        It keeps at most `resident_depth` layers queued past the one running, as the layer-by-
        layer path does (waiting for each layer's routing): on the H200 host the whole step
        queued at once decoded slower than that path (benchmarks/results/profile_decode_resident.md)."""
        streams, depth = self.moe.streams, self.resident_depth
        routed = deque()   # events after queued layers' pre graphs
        for kind, _, g in self._replays(resident=True):
            g.replay()
            if depth and kind == "pre":
                routed.append(streams.host_event())
            elif kind == "post" and len(routed) >= depth > 0:
                routed.popleft().synchronize()
        self.moe.count_resident_step(self, streams.host_event())

    def _queue_through_post(self, i: int, routed=None):
        """Replay the step's graphs from index i through the next experts graph; returns (the
        index after it, its layer, the event after it: None where nothing waits for it) or
        (end, None, None). `routed(layer)` runs once the layer's routing graph is queued."""
        moe = self.moe
        while i < len(self._graphs):
            kind, l, g = self._graphs[i]
            i += 1
            (self._experts_graph(l, g) if kind == "post" else g).replay()
            if kind == "pre":
                moe.graphed_layer(l, self)
                if routed is not None:
                    routed(l)
            elif kind == "post":
                return i, l, moe.streams.record_on_compute() if self.waits_for(l) else None
        return i, None, None

    def close(self) -> None:
        """Stop the thread of queued steps' CPU parts (it would stay until the garbage collector
        found this object)."""
        if self._queue is not None:
            self._queue.wait()   # nothing it runs may outlive the buffers it writes
            self._queue = None

    @property
    def cpu_parts_queued(self) -> bool:
        """Whether run-ahead steps queue the whole step, the CPU parts running on the native
        queue's thread (set at the first such step)."""
        return self._queue is not None

    def _native(self, layer: int):
        """Layer `layer`'s bound native CPU part (OffloadedMoE.bind_run_ahead), or None."""
        if layer not in self._natives:
            self._natives[layer] = self.moe.bind_run_ahead(layer, self)
        return self._natives[layer]

    def _layer_queue(self):
        """The thread that runs a run-ahead step's CPU parts (cpu_kernels.LayerQueue), or None:
        the Python path (native parts switched off, or not available for every MoE layer)."""
        if self._queue is None and self.run_ahead and self.native_layers:
            if all(self._native(l) is not None for l in self.moe.spec.moe_layers):
                self._queue = LayerQueue()
            else:
                self.native_layers = False   # decided once for this engine
        return self._queue

    def waits_for(self, layer: int) -> bool:
        """Whether the host of a step waits for layer `layer` before going on (the Python path
        of a CPU part); a run-ahead step counts its other layers once it is queued."""
        return not self.run_ahead or (not self.moe.layer_resident(layer) and self._layer_queue() is None)

    def _step_run_ahead(self) -> None:
        if self._layer_queue() is not None:
            self._step_queued()
        else:
            self._step_layer_ahead()

    def _step_queued(self) -> None:
        """The step queued ahead of its CPU parts: each layer with a CPU part gets a gate before
        the graphs after it, and its native part goes to the queue's thread, which waits for
        the layer's routing, computes and opens the gate while this thread queues the next
        layers (up to queue_ahead parts ahead). This thread counts each layer once its part
        has run, between its launches and then as the last parts finish."""
        moe, gate, queue = self.moe, self.gate, self._queue
        tally = _Tally(self, queue, time.monotonic_ns())
        submitted = {}   # layer: (its part's ticket, the number that opens its gate)
        tickets = []     # the step's parts so far

        def submit(layer: int) -> None:
            # Submitted once the layer's routing is queued, before its experts graph: the part
            # can start the moment the routing lands (the step's first, above all). It opens
            # its gate, failed or not; if that comes before the gate is queued, the gate passes.
            if moe.layer_resident(layer):
                return
            if self.queue_ahead and len(tickets) >= self.queue_ahead:
                behind = tickets[-self.queue_ahead]
                gate.run_until(lambda: queue.ran(behind))
                queue.wait_for(behind)   # a failure is raised once the step is queued
            seq = gate.reserve()
            tickets.append(queue.submit(self._native(layer), self._count, seq))
            submitted[layer] = (tickets[-1], seq)

        try:
            i, layer, _ = self._queue_through_post(0, submit)
            while layer is not None:
                ticket, seq = submitted.pop(layer, (None, None))
                if ticket is not None:
                    gate.close(seq)
                tally.parts.append((layer, ticket))
                i, layer, _ = self._queue_through_post(i, submit)
                tally.count(block=False)
            tally.queued = time.monotonic_ns()
            tally.count(block=True)
        finally:
            self._drive(queue)   # every part queued has run and opened its gate; raises a failure
        tally.record()

    def _drive(self, queue) -> None:
        """Wait for the queue's thread to finish the step's CPU parts (behind an emulated gate
        this thread plays the stream meanwhile)."""
        self.gate.run_until(queue.idle)
        queue.wait()

    def _step_layer_ahead(self) -> None:
        """The Python path: the next layer's graphs queued behind a gate while this thread
        computes this layer's CPU part (OffloadedMoE.after_graphed_compute), then opens it."""
        moe, gate = self.moe, self.gate
        resident = []   # counted once the step is queued
        i, layer, released = self._queue_through_post(0)
        while layer is not None:
            # A layer whose every expert is on the GPU has no CPU part: nothing waits for the
            # host there.
            gated = not moe.layer_resident(layer)
            seq = gate.close() if gated else None
            try:
                i, after, after_released = self._queue_through_post(i)
                if gated:
                    self._part_written = False
                    moe.after_graphed_compute(layer, self, released=released)
                    if not self._part_written:
                        self._host_np[layer] = 0.0   # every miss was on the GPU: nothing to add
                else:
                    resident.append(layer)
            finally:
                if gated:
                    gate.open(seq)   # on an error too: a closed gate would hold the stream forever
            layer, released = after, after_released
        end = moe.streams.host_event()   # after every experts graph of the step
        for layer in resident:
            moe.count_resident(layer, self, end, self._count)
