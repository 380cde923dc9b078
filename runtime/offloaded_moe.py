"""One MoE layer with offloaded experts: the runtime's hot path.

For each MoE layer of a step, given the router input s_l and the residual r_l:

1. the routing of layer l: the true router (exact modes, the first MoE layer, and
   every prefill), or the routing predicted h layers earlier (`speculate`);
2. the prediction for layer t = l + h (if a predictor is set) and copies of the
   predicted experts that are not on the GPU yet, on the copy stream, into slots
   that no queued computation still reads;
3. the experts of layer l: those on the GPU (cached, or copied ahead) run there in
   one batched computation over the slots; the rest are copied now and waited for
   (`fetch`), computed by the CPU at the same time (`cpu`), or, in `speculate`,
   were the prediction itself.

The host learns routing only through one small device-to-host read per layer (the
ids of layer l in exact modes, the predicted ids of layer t). In `speculate` that
read waits on work the GPU finished while it computes layer l's experts, so the
host never idles the GPU. Exact decode places experts in one of two ways:

- device table (`device_table`, the default): the experts run at once from a device-side
  slot table, the host reads the ids meanwhile and adds what was missing afterwards
  (`_prepare_layer`, `table_output`; graphed: `_graphed_misses`, eager: `_misses`), with
  predicted copies optionally held back in a window (`_prefetch`, `_pump`), and a share of
  the misses optionally computed by the experts graph itself from their weights in host
  memory (`set_host_reads`);
- planned: the host reads layer l's true ids, places the missing experts, then launches
  the experts over the slots it chose (`_plan`, `_run`; prefills always run this way).

Decode steps come here through cuda_graphs.DecodeGraphs (`graphed_layer`,
`after_graphed_compute`) on CUDA, and on the CPU when a test asks for that path;
prefills and other CPU runs through `__call__`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from specmoe.moe_block import routed_output

from .cpu_experts import CpuExperts
from .host_store import HostExpertStore
from .slots import ExpertSlots
from .streams import Streams
from .telemetry import Telemetry

def _with_prediction(ids: torch.Tensor, pred) -> torch.Tensor:
    """This layer's ids and the prediction's side by side [T, k + k'], for one read."""
    return ids if pred is None else torch.cat([ids, pred[0].to(ids.dtype)], dim=1)


@dataclass
class _Prediction:
    ids: torch.Tensor           # [T, k] on the device
    weights: torch.Tensor       # [T, k] on the device
    host_ids: list[list[int]]   # the same ids on the host


@dataclass
class _Plan:
    slot_idx: list[list[int]] = field(default_factory=list)     # [T][k] slot per routed expert (0 if masked)
    keep: list[list[float]] = field(default_factory=list)       # [T][k] 1.0 where the GPU computes it
    cpu_work: list[tuple[int, int, int]] = field(default_factory=list)  # (token, expert, j) for the CPU


class OffloadedMoE:
    def __init__(self, family, model, spec, store: HostExpertStore, slots: ExpertSlots, streams: Streams,
                 on_miss: str, predictor, telemetry: Telemetry, cpu: CpuExperts | None):
        self.family, self.model, self.spec = family, model, spec
        self.store, self.slots, self.streams = store, slots, streams
        self.on_miss, self.predictor, self.telemetry, self.cpu = on_miss, predictor, telemetry, cpu
        self.device = slots.device
        self.first_moe = spec.moe_layers[0]
        self._blocks = {l: family.moe_block(model, l) for l in spec.moe_layers}
        self._routers = {l: getattr(b, family.router_attr) for l, b in self._blocks.items()}
        self._experts = {l: getattr(b, family.experts_attr) for l, b in self._blocks.items()}
        self._shared = {l: family.shared_expert(model, l) for l in spec.moe_layers}
        self._predicted: dict[int, _Prediction] = {}
        self._prompt_uses: dict[int, list[int]] = {}   # this step's uses per expert, per layer (prompts)
        self.cache_fill = "prompt"
        self._inflight: dict[int, set] = {}     # layer -> keys copied ahead for it, not yet used
        self._block_bytes = store.layout.block_bytes
        self.record_routing: dict | None = None  # (position, layer) -> (ids, weights) when recording
        # Speculate on steps of many tokens too (teacher-forced evaluation: every token of a
        # sequence predicted from its own states, as decoding it one token at a time would).
        self.speculate_many = False
        self.device_table = False   # RuntimeConfig.device_table
        # `cpu`: the share of predicted experts not on the GPU that are copied ahead; the CPU
        # computes the others when they are used (both channels busy at once).
        self.cpu_copy_share = 1.0
        # ... and, when the share is not set by hand, it follows what this host does: the copies
        # for the next layer, issued just before the CPU computes this layer's misses, should
        # just have finished when it is done (the next layer needs them a moment later). Still
        # running: copies are the bottleneck, copy less; done: the link idles, copy more.
        self.adapt_copy_share = False
        # `cpu`, exact decode: the share of a layer's misses copied now and computed by the GPU
        # while the CPU computes the others (the link would idle otherwise). Adapted like the
        # share above: the demand copies should just be done when the CPU is.
        self.cpu_demand_share = 0.0
        self.adapt_demand_share = False
        self.share_step = 0.02
        # Exact decode on the device table (graphed): the share of a layer's table misses that the
        # GPU computes by reading their weights in place in host memory, over PCIe, while the CPU
        # (`cpu`) computes or the copy engine brings (`fetch`) the others. Set with set_host_reads.
        self.host_read_share = 0.0
        self._reads_whole = False
        self._host_reads = None   # (host stack, {layer: expert -> store row}, {layer: take table}) on the device
        self.read_table: torch.Tensor | None = None   # the take tables on the host [layers, top_k + 1]
        self._share_carry = {"ahead": 0.0, "demand": 0.0}
        # Exact graphed decode: at most this many predicted copies in flight (0: all at once).
        # The others wait in `_queued` and are issued as copies finish, while the host waits
        # for the GPU anyway; once a layer's true ids are read, its queued predictions are
        # dropped: a wrong prediction not yet issued costs no bandwidth.
        self.copy_window = 0
        self._queued: deque = deque()
        self._copy_events: list = []
        self._protect_now: set = set()
        # Exact decode looks its experts up on the device: table[row(l), e] is expert e's slot,
        # or the zero slot while it is not on the GPU. The host keeps the same table in
        # `_installed` and changes the device copy only through `_table_ops`, flushed in
        # stream order before a layer's experts run.
        zero = slots.zero_slot
        self._rows = {l: i for i, l in enumerate(spec.moe_layers)}
        self.table = torch.full((len(spec.moe_layers), spec.num_experts), zero, dtype=torch.long, device=self.device)
        self._installed: dict[int, set[int]] = {l: set() for l in spec.moe_layers}
        # The same as a 0/1 row per layer in host memory, for the native CPU part of a run-ahead step.
        self.present = torch.zeros((len(spec.moe_layers), spec.num_experts), dtype=torch.uint8)
        self._present_np = self.present.numpy()
        self._to_install: dict[int, dict[int, int]] = {}   # layer -> {expert: slot} copied, not yet in the table
        self._table_ops: list[tuple[int, int, int]] = []
        self._ops_staging = self._ops_device = self._ops_done = None
        self._layer_released: dict[int, object] = {}       # layer -> event after its last expert computation
        self._evicted_from: dict[int, int] = {}            # slot -> layer of the key it held
        slots.on_evict = self._evicted
        self._staging: dict[int, torch.Tensor] = {}   # pinned host buffers for one layer's small reads
        self._slot_staging: dict[int, torch.Tensor] = {}
        self._pending: dict = {}
        self._numpy_views: dict = {}

    def set_host_reads(self, share: float, whole: bool = False) -> None:
        """Let the experts graph of exact decode read `share` of each layer's misses (the first
        ones in routing order) from the host store in place. `whole`: of n misses, floor(share
        * n) at every layer (share measured as the GPU's part of both channels' rate: the GPU
        never finishes after the CPU); else the share alternates over layers."""
        self.host_read_share = float(share)
        self._reads_whole = whole
        if not share:
            self._host_reads = self.read_table = None
            return
        from .host_store import device_view

        blocks = device_view(self.store.blocks, self.device) if self.streams.cuda else self.store.blocks
        rows = {l: torch.tensor([self.store.row(l, e) for e in range(self.spec.num_experts)], dtype=torch.long,
                                device=self.device) for l in self.spec.moe_layers}
        self._read_counts = {l: self.host_read_counts(l) for l in self.spec.moe_layers}
        if not any(any(c) for c in self._read_counts.values()):   # too small a share to take one
            self.host_read_share, self._host_reads, self.read_table = 0.0, None, None
            return
        self.read_table = torch.tensor([self._read_counts[l] for l in self.spec.moe_layers], dtype=torch.long)
        takes = {l: torch.tensor(c, dtype=torch.long, device=self.device) for l, c in self._read_counts.items()}
        self._host_reads = (self.store.layout.views(blocks), rows, takes)

    def host_read_counts(self, layer: int) -> list[int]:
        """How many of n table misses the GPU reads from host memory at `layer`, for n = 0..top_k.
        A fractional share alternates over layers (0.3125 of 8: 2, 3, 2, 3, ...): the counts of
        the first i layers add up to share * n * i, rounded half up."""
        if self._reads_whole:
            return [int(self.host_read_share * n) for n in range(self.spec.top_k + 1)]
        i = self._rows[layer]

        def upto(m: int, n: int) -> int:
            return int(self.host_read_share * n * m + 0.5)

        return [upto(i + 1, n) - upto(i, n) for n in range(self.spec.top_k + 1)]

    def host_reads(self, layer: int):
        """(host stack, expert -> store row, take table) of `layer` for the experts graph, or None."""
        if self._host_reads is None:
            return None
        stack, rows, takes = self._host_reads
        return stack, rows[layer], takes[layer]

    def layer_resident(self, layer: int) -> bool:
        """Every expert of `layer` is in the device table, none still arriving: its decode
        misses nothing."""
        return len(self._installed[layer]) == self.spec.num_experts and not self._to_install.get(layer)

    def all_resident(self) -> bool:
        """Every expert of every MoE layer is in the device table, none arriving."""
        return all(self.layer_resident(l) for l in self.spec.moe_layers)

    def runs_ahead(self) -> bool:
        """Whether a graphed decode step may queue the next layer's graphs before this layer's
        misses are done (cuda_graphs.DecodeGraphs): only when the host never places experts
        during decode, so nothing it does after reading a layer's routing changes the GPU's
        plan: `cpu` misses, no predictor, no demand copies, the device table."""
        return (self.on_miss == "cpu" and self.cpu is not None and self.predictor is None and self.device_table
                and self.cpu_demand_share == 0.0 and not self.adapt_demand_share)

    def preload_all(self) -> None:
        """Copy every expert into its own slot now (a budget that holds them all)."""
        for layer in self.spec.moe_layers:
            for e in range(self.spec.num_experts):
                key = (layer, e)
                if key not in self.slots:
                    self._copy(key, self.slots.reserve(key, set()))
        self.streams.synchronize()
        self.telemetry.bytes_copied = 0

    # ---------------------------------------------------------------- per step

    def begin_step(self) -> None:
        self._predicted.clear()
        self._queued.clear()
        self._prompt_uses.clear()

    def end_prompt(self) -> None:
        """After a step of several tokens (a prompt), with `cache_fill` = prompt and slots that
        cannot hold every expert: keep in them each layer's experts that the prompt used most,
        the slots shared evenly among the layers, copying in those missing. A prompt's last
        copies would otherwise leave its last layers there whole, and decode would miss every
        expert of the others. Whatever the prompt copied goes in the device table at once, the
        compute stream waiting for it: the prompt's logits come after them, and decode sees no
        expert arrive (a budget that holds every expert then decodes with no host decision)."""
        uses, self._prompt_uses = self._prompt_uses, {}
        layers = self.spec.moe_layers
        quota, extra = divmod(self.slots.num_slots, len(layers))
        if self.cache_fill == "prompt" and uses and 1 <= quota < self.spec.num_experts:
            self._keep_most_used(uses, quota, extra)
        if self.device_table:
            for layer in layers:
                self._install_arrived(layer)
            if self._table_ops:
                self._flush_table_ops()

    def _keep_most_used(self, uses: dict, quota: int, extra: int) -> None:
        """Copy in each layer's `quota` most used experts (one more for the first `extra` layers)."""
        keep = []   # most used first within each layer
        for i, layer in enumerate(self.spec.moe_layers):
            counts = uses.get(layer)
            if counts is None:
                continue
            # Ties: what is on the GPU already stays (no copy), then the lower id.
            order = sorted((e for e, n in enumerate(counts) if n),
                           key=lambda e: (-counts[e], (layer, e) not in self.slots, e))
            keep += [(layer, e) for e in order[:quota + (i < extra)]]
        wanted = set(keep)
        batch = []
        for key in keep:
            if key in self.slots:
                self.slots.touch(key)
                continue
            slot = self.slots.reserve(key, wanted)   # the victim: a slot no kept expert holds
            if slot is None:
                break
            batch.append((key, slot))
        self.telemetry.demand_copies += len(batch)
        self._copy_many(batch)

    def __call__(self, layer: int, residual: torch.Tensor, s: torch.Tensor, position: int) -> torch.Tensor:
        T = s.shape[0]
        predicted = self._predicted.pop(layer, None)
        speculative = self.on_miss == "speculate" and predicted is not None and (T == 1 or self.speculate_many)
        if speculative:
            ids, weights, host_ids = predicted.ids, predicted.weights, predicted.host_ids
            if self.telemetry.track_hits:
                true_ids, _ = self._route(layer, s)
                self.telemetry.prefetch_hits_device(layer, ids, true_ids)
        else:
            ids, weights = self._route(layer, s)
            host_ids = None
            if predicted is not None:
                self.telemetry.prefetch_hits_device(layer, predicted.ids, ids)
        if self.record_routing is not None:
            for t in range(T):
                self.record_routing[(position + t, layer)] = (ids[t].detach().cpu(), weights[t].detach().float().cpu())

        target = self.predictor.target_of(layer) if self.predictor is not None else None
        pred = None
        if target is not None:
            pred = self.predictor.predict(target, residual, s, ids, weights, position)

        if speculative:
            # The prediction's read is queued before the compute stream waits for this layer's
            # copies: the next layer's copies then queue behind this layer's while they still
            # run, instead of after them with the link idle in between.
            read = self._read(layer, pred[0]) if pred is not None else None
            out = self._compute(layer, s, ids, weights, host_ids)
            if read is not None:
                host, ev = read
                ev.synchronize()
                self._prefetch(target, pred, self._as_numpy(host).tolist())
            return out

        if T == 1 and self.device_table:
            return self._exact_decode(layer, s, ids, weights, target, pred)

        # One read for both: this layer's ids and the prediction's.
        k, kp = ids.shape[1], (pred[0].shape[1] if pred is not None else 0)
        both = _with_prediction(ids, pred)
        if T == 1:
            rows = self._to_host(both)
            host_ids, pred_host = [row[:k] for row in rows], [row[k:k + kp] for row in rows]
        else:   # a prefill's many rows stay one tensor (_compute_many plans per expert)
            rows = both.cpu()
            host_ids, pred_host = rows[:, :k], rows[:, k:k + kp].tolist()
        then = None
        if pred is not None:
            current = {(layer, int(e)) for e in torch.as_tensor(host_ids).unique().tolist()}
            # After this layer's own copies are queued (they are needed first), before its compute.
            then = lambda copy: self._prefetch(target, pred, pred_host, current, copy)  # noqa: E731
        return self._compute(layer, s, ids, weights, host_ids, then)

    # ---------------------------------------------------------------- exact decode on the device table
    # The experts of layer l run from the device table without the host seeing the true ids
    # first; the host reads them while the GPU computes and adds what was missing afterwards
    # (copied now, or computed by the CPU). When everything is cached, the host never stands
    # between the router and the experts.

    def _prepare_layer(self, layer: int) -> set[int]:
        """Put this layer's newly copied experts in the device table (after their copies) and
        flush pending evictions; returns the experts the table holds for the computation."""
        self._install_arrived(layer)
        if self._table_ops:
            self._flush_table_ops()
        return set(self._installed[layer])

    def _install_arrived(self, layer: int) -> None:
        """Queue the table entries of this layer's newly copied experts, behind their copies."""
        arrived = self._to_install.pop(layer, {})
        waits = []
        row = self._rows[layer]
        for e, slot in arrived.items():
            ready = self.slots.pending_ready(slot)
            if ready is not None:
                waits.append(ready)
            self._table_ops.append((row, e, slot))
            self._installed[layer].add(e)
            self._present_np[row, e] = 1
        self._compute_waits_for(waits)

    def _flush_table_ops(self) -> None:
        """Apply the queued table changes on the compute stream: one copy from a pinned
        staging buffer and one index_copy_, whatever their number."""
        # The last change to an entry wins (an index_copy_ with repeated indices picks any).
        last = {r * self.spec.num_experts + e: v for r, e, v in self._table_ops}
        self._table_ops = []
        n = len(last)
        if self._ops_staging is None:
            # Two staging buffers in turn: a flush waits for the copy of the one before last,
            # long done, not for the last one, which may still queue behind this layer's work.
            entries = self.table.numel()
            self._ops_staging = [torch.empty(2 * entries, dtype=torch.long, pin_memory=self.streams.cuda)
                                 for _ in range(2)]
            self._ops_device = torch.empty(2 * entries, dtype=torch.long, device=self.device)
            self._ops_done = [None, None]
            self._ops_turn = 0
        turn = self._ops_turn
        self._ops_turn ^= 1
        if self._ops_done[turn] is not None:
            self._ops_done[turn].synchronize()   # its last copy has read this staging buffer
        host = self._ops_staging[turn]
        staging = host.numpy()
        staging[:n] = list(last)
        staging[n:2 * n] = list(last.values())
        # Entries then values, one contiguous run: a strided slice of the pinned buffer would be
        # copied through a pageable temporary, and a pageable copy waits for the stream to drain.
        dev = self._ops_device[:2 * n]
        self.streams.copy_on_compute(dev, host[:2 * n])
        self._ops_done[turn] = self.streams.record_on_compute()
        self.table.view(-1).index_copy_(0, dev[:n], dev[n:])

    def table_row(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s row of the device table [num_experts]: expert -> slot."""
        return self.table[self._rows[layer]]

    def table_output(self, layer: int, s: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Routed output of the experts the device table holds for `ids` (the others weigh 0).
        Capturable: this is the experts graph of exact decode."""
        slots = self.table[self._rows[layer]][ids]
        w = weights * (slots != self.slots.zero_slot).to(weights.dtype)
        return routed_output(self.family, self._experts[layer], s, self.slots.stack, slots, w)

    def _table_misses(self, layer: int, row, present: set[int]) -> list[tuple[int, int]]:
        """(choice j, expert) of one token's routing `row` that the table did not hold; every
        use is counted, and the cached ones touched."""
        missing = []
        touch = self.slots.touch
        for j, e in enumerate(row):
            e = int(e)
            if e in present:
                touch((layer, e))
            else:
                missing.append((j, e))
        self.telemetry.count_uses(layer, len(row), len(row) - len(missing))
        return missing

    def _reserve_needed(self, key, protected: set) -> int:
        """A slot for an expert that must be on the GPU now, which no protected key holds."""
        slot = self.slots.reserve(key, protected)
        if slot is None:  # the minimum budget holds two layers, and prefills fit their groups: a bug
            raise RuntimeError("no GPU expert slot is free for a needed expert")
        return slot

    def _demand_copy(self, key, protected: set) -> int:
        """Copy a needed expert now, into a slot no protected key holds."""
        slot = self._reserve_needed(key, protected)
        self._copy(key, slot)
        self.telemetry.demand_copies += 1
        return slot

    def _copy_share_now(self, layer: int, absent: list[tuple[int, int]], current: set, gpu_fix: list,
                        cpu: bool):
        """Copy layer `layer`'s missed experts `absent` [(choice j, expert)] now: all of them
        (`fetch`), or with the CPU computing misses, the demand share of them (and those no slot
        takes). Appends (j, slot) to `gpu_fix`; returns (the (j, expert) left to the CPU, the
        event after the copies or None)."""
        take = self._share_of(len(absent), self.cpu_demand_share, "demand") if cpu else len(absent)
        if take == 0:
            return list(absent), None
        protected = current | {k for l, keys in self._inflight.items() if l != layer for k in keys}
        batch, on_cpu = [], list(absent[take:])
        for j, e in absent[:take]:
            slot = self.slots.reserve((layer, e), protected) if cpu else self._reserve_needed((layer, e), protected)
            if slot is None:   # the CPU takes what no slot does
                on_cpu.append((j, e))
                continue
            batch.append(((layer, e), slot))
            gpu_fix.append((j, slot))
        self.telemetry.demand_copies += len(batch)
        on_cpu.sort()   # the CPU sums its experts in routing order, whatever was copied
        return on_cpu, self._copy_many(batch)

    def _misses(self, layer: int, s: torch.Tensor, weights: torch.Tensor, ids: list[int], present: set[int]):
        """What the table computation left out of one token's experts `ids`: (their output on
        the GPU, or None; the CPU's future for the others, or None)."""
        absent = self._table_misses(layer, ids, present)
        if not absent:
            return None, None
        fix: list[tuple[int, int]] = []
        cpu = self.on_miss == "cpu" and self.cpu is not None
        on_cpu, _ = self._copy_share_now(layer, absent, {(layer, e) for e in ids}, fix, cpu)
        future = None
        if on_cpu:
            w_host = weights.float().cpu()[0].tolist()
            x_host = s.to("cpu", self.store.layout.dtype)
            work = [(0, e, w_host[j]) for j, e in on_cpu]
            self.telemetry.cpu_experts += len(work)
            future = self.cpu.submit(self._experts[layer], layer, x_host, work)
        out = None
        if fix:
            self._prepare_layer(layer)   # waits for the copies
            slots_row, keep = [self.slots.zero_slot] * len(ids), [0.0] * len(ids)
            for j, slot in fix:
                slots_row[j], keep[j] = slot, 1.0
            w = weights * self._to_device([keep], weights.dtype)
            out = routed_output(self.family, self._experts[layer], s, self.slots.stack, self._to_device([slots_row]), w)
            self._layer_released[layer] = self.streams.record_on_compute()
        return out, future

    def _exact_decode(self, layer: int, s: torch.Tensor, ids, weights, target, pred) -> torch.Tensor:
        present = self._prepare_layer(layer)
        out = self.table_output(layer, s, ids, weights)
        self._layer_released[layer] = self.streams.record_on_compute()
        k = ids.shape[1]
        row = self._to_host(_with_prediction(ids, pred))[0]
        host_ids = [int(e) for e in row[:k]]
        gpu_fix, future = self._misses(layer, s, weights, host_ids, present)
        if pred is not None:
            self._prefetch(target, pred, [row[k:]], {(layer, e) for e in host_ids})
        self._inflight.pop(layer, None)
        shared = self._shared[layer]
        if shared is not None:
            out = out + shared(s).to(out.dtype)
        if gpu_fix is not None:
            out = out + gpu_fix.to(out.dtype).reshape(out.shape)
        if future is not None:
            start = time.perf_counter()
            part = future.result()
            self.telemetry.cpu_wait_seconds += time.perf_counter() - start
            out = (out.float() + self._to_device_tensor(part).reshape(out.shape)).to(out.dtype)
        return out

    def _to_device_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the device without the host waiting: a copy from pageable memory would wait
        for the whole stream to drain first."""
        if self.streams.cuda and t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    # ---------------------------------------------------------------- graphed decode
    # The same decisions as __call__, for a decode step replayed from CUDA graphs
    # (cuda_graphs.DecodeGraphs): the graphs leave this layer's routing and prediction in
    # static buffers; these methods read them, place experts and feed the next graph.

    def _as_numpy(self, t: torch.Tensor):
        """A numpy view of a pinned host buffer the runtime keeps (cached by address): reading
        a few values through it costs far less host time than through torch."""
        view = self._numpy_views.get(t.data_ptr())
        if view is None or view.shape != tuple(t.shape):
            view = self._numpy_views[t.data_ptr()] = t.numpy()
        return view

    def _pinned(self, table: dict, layer: int, like: torch.Tensor) -> torch.Tensor:
        buf = table.get(layer)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=self.streams.cuda)
            table[layer] = buf
        return buf

    def _read_all(self, layer: int, tensors):
        """Queue copies of `tensors` to pinned host memory; returns (host tensors, one event)."""
        hosts = []
        for i, t in enumerate(tensors):
            host = self._pinned(self._staging, (layer, i), t)
            self.streams.copy_on_compute(host, t)
            hosts.append(host)
        return hosts, self.streams.host_event()

    def _graphed_misses(self, layer: int, g, ids: list[int], present: set[int], cpu_inputs, target, pred,
                        pred_row: list[int]) -> None:
        """After the table graph of a decode step: add the experts it could not compute.
        The missed experts not on the GPU are copied now (`fetch`: all of them; `cpu`: the demand
        share), then the prediction for the target layer is queued, then the fix-up graph
        computes what is on the GPU, and (`cpu`) the CPU computes the rest on this thread while
        the copies run."""
        current = {(layer, e) for e in ids}
        if self._queued:
            self._drop_queued(layer)
        self._protect_now = current
        gpu_fix: list[tuple[int, int]] = []     # (choice j, slot)
        absent: list[tuple[int, int]] = []      # (choice j, expert) on no slot
        missed = self._table_misses(layer, ids, present)
        if self._host_reads is not None and not g.host_fed(layer):
            # The experts graph read the first of them from host memory already.
            read = self._read_counts[layer][len(missed)]
            self.telemetry.host_read_experts += read
            missed = missed[read:]
        lookup = self.slots.lookup
        for j, e in missed:
            slot = lookup((layer, e))   # not None: copied after the table was set
            if slot is None:
                absent.append((j, e))
            else:
                gpu_fix.append((j, slot))
        cpu_work: list[tuple[int, int, float]] = []
        demand = None
        if absent:
            on_cpu, demand = self._copy_share_now(layer, absent, current, gpu_fix, cpu_inputs is not None)
            if on_cpu:
                weights = self._as_numpy(cpu_inputs[1])[0].tolist()   # one conversion, not one per miss
                cpu_work = [(0, e, weights[j]) for j, e in on_cpu]
        ahead = None   # after the copies for the target layer
        if pred is not None:
            # Copies first: they run while the GPU and the CPU compute this layer.
            share = self.cpu_copy_share if cpu_inputs is not None else None
            ahead = self._prefetch(target, pred, [pred_row], current, share=share, windowed=True)
        if gpu_fix:
            if g.run_ahead:   # the next layer is queued already: a fix-up would come after it
                raise RuntimeError("an expert was copied during a run-ahead decode step")
            waits = [self.slots.pending_ready(slot) for _, slot in gpu_fix]
            waits = list({id(w): w for w in waits if w is not None}.values())
            if waits:
                before = self.streams.timed_event_on_compute()
                for w in waits:
                    self.streams.compute_waits(w)
                self.telemetry.copy_wait(before, self.streams.timed_event_on_compute())
            g.fix(layer, gpu_fix)
            released = self.streams.record_on_compute()
            self._layer_released[layer] = released
            for _, slot in gpu_fix:
                self.slots.set_released(slot, released)
        if cpu_inputs is None:
            return
        if cpu_work:
            self.telemetry.cpu_experts += len(cpu_work)
            start = time.perf_counter()
            part = self.cpu.compute(self._experts[layer], layer, cpu_inputs[0], cpu_work, out=g.host_part(layer))
            self.telemetry.cpu_wait_seconds += time.perf_counter() - start
            g.add_host(layer, part)
        if absent and self.adapt_demand_share:
            self._adapt("cpu_demand_share", demand)
        if ahead is not None and self.adapt_copy_share:
            self._adapt("cpu_copy_share", ahead)

    def _read(self, layer: int, t: torch.Tensor):
        """Queue a copy of `t` to pinned host memory; returns (host tensor, event)."""
        (host,), ev = self._read_all(layer, (t,))
        return host, ev

    def graphed_layer(self, layer: int, g) -> None:
        predicted = self._predicted.pop(layer, None)
        target = self.predictor.target_of(layer) if self.predictor is not None else None
        k = g.ids[layer].shape[1]
        count_on_host = None   # the exact table path reads the true ids anyway: count hits there
        if predicted is not None:
            if layer in g.pred_ids:
                self.telemetry.count_predicted(layer, k, 1)
            elif not g.host_fed(layer) and self.on_miss != "speculate":
                count_on_host = predicted.host_ids[0]
            else:
                self.telemetry.prefetch_hits_device(layer, predicted.ids, g.ids[layer])
        pred = None
        if target is not None:
            if target in g.pred_ids:
                pred = (g.pred_ids[target], g.pred_w[target])
            else:  # a predictor that needs the host (oracle): eager, outside the graphs
                src_ids, src_w = g._source_routing(layer) if layer in g.pred_ids else (g.ids[layer], g.w[layer])
                if self.on_miss == "speculate" and predicted is not None:
                    src_ids, src_w = predicted.ids, predicted.weights
                pred = self.predictor.predict(target, g.r.reshape(1, -1), g.s.reshape(1, -1), src_ids, src_w,
                                              self.engine_position)
        speculative = self.on_miss == "speculate" and predicted is not None
        if speculative:
            if pred is not None:
                # Read before the compute stream waits for this layer's copies (as in __call__):
                # the next layer's copies are issued while this layer's still run.
                host, ev = self._read(layer, pred[0])
                self._pending[layer] = (target, pred, host, ev)
            if layer not in g.pred_ids:
                g.wsel[layer].copy_(predicted.weights)
            plan = self._plan(layer, predicted.host_ids, {int(e) for e in predicted.host_ids[0]}, False)
            self._feed_slots(layer, g, plan)
            return
        if not g.host_fed(layer):
            # Exact: the experts graph looks its slots up on the device; the host reads the
            # ids while it runs and adds what was missing afterwards.
            ids = _with_prediction(g.ids[layer], pred)
            if g.run_ahead:
                # The graph itself copied the routing and input to pinned memory. The host waits
                # for them here only on the Python path (g.waits_for(layer)); otherwise the
                # native call waits, or the layer is counted once the step is done.
                host, s_host, w_host, _ = g.staged[layer]
                ev = self.streams.host_event() if g.waits_for(layer) else None
                cpu_inputs = (s_host, w_host)
            elif self.on_miss == "cpu" and self.cpu is not None:
                # The CPU computes misses from this layer's input and routing weights.
                (host, s_host, w_host), ev = self._read_all(layer, (ids, g.s.reshape(1, -1), g.w[layer].float()))
                cpu_inputs = (s_host, w_host)
            else:
                (host,), ev = self._read_all(layer, (ids,))
                cpu_inputs = None
            present = self._prepare_layer(layer)
            self._pending[layer] = ("table", present, host, ev, target, pred, k, cpu_inputs, count_on_host)
            return
        host, ev = self._read(layer, _with_prediction(g.ids[layer], pred))
        ev.synchronize()
        row = host[0].tolist()
        host_ids = [row[:k]]
        current = {(layer, int(e)) for e in host_ids[0]}
        cpu_ok = self.on_miss == "cpu" and self.cpu is not None
        plan = self._plan(layer, host_ids, set(int(e) for e in host_ids[0]), cpu_ok)
        if pred is not None:
            self._prefetch(target, pred, [row[k:]], current)
        if plan.cpu_work:
            w_host = g.w[layer].float().cpu()
            x_host = g.s.reshape(1, -1).to("cpu", self.store.layout.dtype)
            work = [(t, e, float(w_host[t, j])) for t, e, j in plan.cpu_work]
            self.telemetry.cpu_experts += len(work)
            self._pending[layer] = ("cpu", self.cpu.submit(self._experts[layer], layer, x_host, work))
            keep = self._to_device_tensor(torch.tensor(plan.keep, dtype=g.wsel[layer].dtype))
            g.wsel[layer].mul_(keep)
        self._feed_slots(layer, g, plan)

    def _feed_slots(self, layer: int, g, plan) -> None:
        host = self._pinned(self._slot_staging, layer, g.slot[layer])
        host.copy_(torch.tensor(plan.slot_idx, dtype=torch.long))
        g.slot[layer].copy_(host, non_blocking=True)
        self._inflight.pop(layer, None)
        self._last_plan = plan

    def after_graphed_compute(self, layer: int, g, released=None) -> None:
        """`released`: the event after this layer's experts graph (default: recorded now; a
        run-ahead step has queued the next layer's graphs since)."""
        if released is None:
            released = self.streams.record_on_compute()
        pending = self._pending.pop(layer, None)
        if pending is not None and pending[0] == "table":
            self._layer_released[layer] = released
            _, present, host, ev, target, pred, k, cpu_inputs, count_on_host = pending
            self._wait_pumping(ev)
            row = self._as_numpy(host)[0].tolist()
            if count_on_host is not None:
                self.telemetry.count_hits_host(layer, [int(e) for e in count_on_host], [int(e) for e in row[:k]])
            self._graphed_misses(layer, g, row[:k], present, cpu_inputs, target, pred, row[k:])
            self._inflight.pop(layer, None)
            return
        zero = self.slots.zero_slot
        for row in self._last_plan.slot_idx:
            for slot in row:
                if slot != zero:
                    self.slots.set_released(slot, released)
        if pending is None:
            return
        if pending[0] == "cpu":
            start = time.perf_counter()
            part = pending[1].result()
            self.telemetry.cpu_wait_seconds += time.perf_counter() - start
            g.x.add_(self._to_device_tensor(part).reshape(g.x.shape).to(g.x.dtype))
            return
        # speculate: the prediction was read while the GPU computed this layer
        target, pred, host, ev = pending
        ev.synchronize()
        self._prefetch(target, pred, [host[0].tolist()])

    def bind_run_ahead(self, layer: int, g):
        """Layer `layer`'s CPU part of a run-ahead step as one native call on the step's pinned
        buffers (cpu_kernels.bind_table_layer), or None where it does not apply (no native
        kernels for this family's experts: the Python path computes it)."""
        if self.cpu is None:
            return None
        ids, s_host, w_host, ready = g.staged[layer]
        row = self._rows[layer]
        reads = None if self._host_reads is None else self.read_table[row]
        return self.cpu.bind_table_layer(self._experts[layer], layer, ready=ready, ids=ids.reshape(-1),
                                         weights=w_host.reshape(-1), x=s_host.reshape(-1), present=self.present[row],
                                         reads=reads, out=g.host_part(layer).reshape(-1), gate=g.gate.flag,
                                         stats=g.part_stats[layer])

    def count_run_ahead(self, layers: list[int], g, released, stats) -> None:
        """What these layers' native CPU parts did (stats: their TableLayer stats rows, an int64
        array [len(layers), 7]), counted once they have run (off the path between the layers):
        uses, hits, experts computed, time; the hits touched in the cache."""
        tel, k = self.telemetry, self.spec.top_k
        hits = stats[:, 0].tolist()
        for layer, h in zip(layers, hits):
            self._pending.pop(layer, None)
            self._inflight.pop(layer, None)
            self._layer_released[layer] = released
            tel.count_uses(layer, k, h)
            if h:
                present = self._present_np[self._rows[layer]]
                touch = self.slots.touch
                for e in self._as_numpy(g.staged[layer][0])[0].tolist():
                    if present[e]:
                        touch((layer, e))
        tel.host_read_experts += int(stats[:, 1].sum())
        tel.cpu_experts += int(stats[:, 2].sum())
        tel.routing_wait_seconds += float(stats[:, 3].sum()) * 1e-9
        seconds = float(stats[:, 4].sum()) * 1e-9
        tel.cpu_wait_seconds += seconds
        self.cpu.spent(seconds)

    def count_resident_step(self, g, released) -> None:
        """A graphed decode step queued with every expert on the GPU (DecodeGraphs.all_resident):
        each layer's uses are hits, its prediction's hits were counted on the device. Nothing
        is touched: with every expert in a slot, nothing is ever evicted."""
        tel = self.telemetry
        for layer in self.spec.moe_layers:
            k = g.ids[layer].shape[1]
            self._layer_released[layer] = released
            tel.count_uses(layer, k, k)
            if layer in g.pred_ids:
                tel.count_predicted(layer, k, 1)

    def routing_landed(self, layer: int, g, expect: int) -> bool:
        """Whether a run-ahead step's layer `layer` has staged its routing in pinned memory
        (the step's count `expect` lands after it)."""
        return int(self._as_numpy(g.staged[layer][3])[0]) == expect

    def count_resident(self, layer: int, g, released, expect: int, timeout_s: float = 30.0) -> None:
        """A run-ahead layer whose experts were all on the GPU: once its routing has landed in
        pinned memory (the step's count `expect` with it), count its uses as hits and touch
        them. The host waits for this layer only, while the GPU runs the ones after it."""
        self._pending.pop(layer, None)
        self._layer_released[layer] = released
        deadline = None
        while not self.routing_landed(layer, g, expect):
            now = time.perf_counter()
            deadline = deadline or now + timeout_s
            if now > deadline:
                raise RuntimeError(f"layer {layer}'s routing did not reach host memory within {timeout_s} s")
        missed = self._table_misses(layer, self._as_numpy(g.staged[layer][0])[0].tolist(), self._installed[layer])
        if missed:
            raise RuntimeError(f"layer {layer} had every expert on the GPU but missed {len(missed)}")
        self._inflight.pop(layer, None)

    # ---------------------------------------------------------------- pieces

    def _route(self, layer: int, s: torch.Tensor):
        router = self._routers[layer]
        logits = self.family.router_logits(router, s)
        return self.family.route(router, logits)

    def _to_host(self, t: torch.Tensor) -> list[list[int]]:
        # One small read; it waits for the work queued before it on the compute stream.
        return t.reshape(t.shape[0], -1).tolist()

    def _prefetch(self, target: int, pred, pred_host: list[list[int]], keep: set = frozenset(),
                  copy: bool = True, share: float | None = None, windowed: bool = False):
        """Remember the prediction for `target` and copy its experts that are not on the GPU;
        with `share`, only that share of them (the CPU computes the others if they are used);
        `windowed`, through the queue of `copy_window`. Returns the event after the copies
        issued now (None: none issued, or they wait in the window)."""
        ids_dev, w_dev = pred
        self._predicted[target] = _Prediction(ids_dev, w_dev, pred_host)
        if not copy:
            return None
        if self.layer_resident(target):   # nothing to copy: only the cache's order to keep
            touch = self.slots.touch
            for row in pred_host:
                for e in row:
                    touch((target, int(e)))
            return None
        wanted = []
        for row in pred_host:
            for e in row:
                key = (target, int(e))
                if key not in wanted:
                    wanted.append(key)
        protected = set(wanted) | set(keep) | {k for keys in self._inflight.values() for k in keys}
        issued = self._inflight.setdefault(target, set())
        budget = None
        if share is not None:
            budget = self._share_of(sum(1 for key in wanted if key not in self.slots), share, "ahead")
        batch = []
        for key in wanted:
            if key in self.slots:
                self.slots.touch(key)
                continue
            if budget is not None:
                if budget <= 0:
                    continue
                budget -= 1
            if windowed and self.copy_window:
                self._queued.append(key)
                continue
            slot = self.slots.reserve(key, protected)
            if slot is None:
                self.telemetry.prefetch_dropped += 1
                continue
            batch.append((key, slot))
            issued.add(key)
        self.telemetry.prefetched += len(batch)
        ready = self._copy_many(batch)
        if windowed and self.copy_window:
            self._pump()
        return ready

    def _share_of(self, n: int, share: float, which: str) -> int:
        """How many of `n` experts `share` takes now. The fraction of an expert carries over
        to the next layer: over many layers exactly `share` of them are taken."""
        want = share * n + self._share_carry[which]
        take = min(n, int(want))
        self._share_carry[which] = want - take
        return take

    def _adapt(self, attr: str, copies) -> None:
        """After the CPU's part of a layer: copies issued beside it (`copies`, their event; None:
        none were) still running mean the link is the bottleneck, so copy a smaller share."""
        done = copies is None or copies.query()
        share = getattr(self, attr) + (self.share_step if done else -self.share_step)
        setattr(self, attr, min(1.0, max(0.0, share)))

    def _evicted(self, key, slot: int) -> None:
        if not self.device_table:
            return
        layer, e = key
        self._installed[layer].discard(e)
        self._present_np[self._rows[layer], e] = 0
        self._to_install.get(layer, {}).pop(e, None)
        self._table_ops.append((self._rows[layer], e, self.slots.zero_slot))
        self._evicted_from[slot] = layer

    def _copy(self, key, slot: int):
        return self._copy_many([(key, slot)])

    def _copy_many(self, pairs: list[tuple[tuple[int, int], int]]):
        """Copy experts into their reserved slots on the copy stream: the waits they need once
        each, one event after them all (a layer's copies are needed together). Returns it."""
        if not pairs:
            return None
        streams = self.streams
        waits: dict[int, object] = {}
        for key, slot in pairs:
            before = [self.slots.released(slot)]
            # Exact decode may have read the slot through the device table: wait for the last
            # expert computation of the layer that owned it.
            if self.device_table:
                before.append(self._layer_released.get(self._evicted_from.pop(slot, None)))
                self._to_install.setdefault(key[0], {})[key[1]] = slot
            for ev in before:
                if ev is not None:
                    waits[id(ev)] = ev
        for ev in waits.values():
            streams.copy_waits(ev)
        streams.copy_blocks(self.slots.buffer, self.store.blocks, [(slot, self.store.row(*key)) for key, slot in pairs])
        ready = streams.record_on_copy()
        for _, slot in pairs:
            self.slots.set_ready(slot, ready)
        self.telemetry.bytes_copied += self._block_bytes * len(pairs)
        return ready

    def _pump(self) -> None:
        """Issue queued predicted copies while fewer than `copy_window` are in flight."""
        self._copy_events = [ev for ev in self._copy_events if ev is not None and not ev.query()]
        while self._queued and len(self._copy_events) < self.copy_window:
            key = self._queued.popleft()
            if key in self.slots:
                continue
            protected = {key} | self._protect_now | {k for keys in self._inflight.values() for k in keys}
            slot = self.slots.reserve(key, protected)
            if slot is None:
                self.telemetry.prefetch_dropped += 1
                continue
            ready = self._copy(key, slot)
            if ready is not None:
                self._copy_events.append(ready)
            self._inflight.setdefault(key[0], set()).add(key)
            self.telemetry.prefetched += 1

    def _drop_queued(self, layer: int) -> None:
        """Layer `layer`'s true ids are known: its predictions not copied yet are superseded."""
        if self._queued:
            self._queued = deque(key for key in self._queued if key[0] != layer)

    def _wait_pumping(self, ev) -> None:
        """Wait for `ev`, issuing queued copies as earlier ones finish."""
        while self._queued and not ev.query():
            self._pump()
        ev.synchronize()

    def _chunks(self, layer: int, host_ids: list[list[int]]) -> list[set[int]]:
        """The experts of this layer in groups that fit the slots at once: one group unless a
        long prefill needs more distinct experts than the budget holds (then resident ones first)."""
        unique = list(dict.fromkeys(int(e) for row in host_ids for e in row))
        others = {k for l, keys in self._inflight.items() if l != layer for k in keys}
        capacity = max(1, self.slots.num_slots - len(others))
        if len(unique) <= capacity:
            return [set(unique)]
        # Groups of half the slots: while one group computes, the next is copied into the
        # other half (LRU gives up the older group's slots) instead of waiting for it.
        unique.sort(key=lambda e: (layer, e) not in self.slots)
        size = max(1, capacity // 2)
        return [set(unique[i:i + size]) for i in range(0, len(unique), size)]

    def _plan(self, layer: int, host_ids: list[list[int]], chunk: set[int], cpu_ok: bool) -> _Plan:
        plan = _Plan()
        # This layer's other prefetched experts may give way to the group being computed.
        protected = {(layer, e) for e in chunk} | {k for l, keys in self._inflight.items() if l != layer for k in keys}
        zero = self.slots.zero_slot
        waits = []
        for t, row in enumerate(host_ids):
            slots_row, keep_row = [], []
            for j, e in enumerate(row):
                e = int(e)
                slot = None
                if e in chunk:
                    key = (layer, e)
                    slot = self.slots.lookup(key)
                    if slot is not None:
                        self.telemetry.count_use(layer, hit=True)
                        self.slots.touch(key)
                    elif cpu_ok:
                        self.telemetry.count_use(layer, hit=False)
                        plan.cpu_work.append((t, e, j))
                    else:
                        self.telemetry.count_use(layer, hit=False)
                        slot = self._demand_copy(key, protected)
                    if slot is not None:
                        ready = self.slots.pending_ready(slot)
                        if ready is not None:
                            waits.append(ready)
                slots_row.append(zero if slot is None else slot)
                keep_row.append(0.0 if slot is None else 1.0)
            plan.slot_idx.append(slots_row)
            plan.keep.append(keep_row)
        self._compute_waits_for(waits)
        return plan

    def _compute_waits_for(self, copies: list) -> None:
        """The compute stream waits for these copies' events."""
        if copies:
            # Two timed events around the waits: the gap between them is the time the
            # compute stream stood still for copies.
            before = self.streams.timed_event_on_compute()
            for ev in copies:
                self.streams.compute_waits(ev)
            self.telemetry.copy_wait(before, self.streams.timed_event_on_compute())

    def _compute(self, layer: int, s: torch.Tensor, ids, weights, host_ids, then=None) -> torch.Tensor:
        if s.shape[0] > 1:   # a prompt's many tokens per expert are cheaper copied
            return self._compute_many(layer, s, weights, host_ids, then)
        # One token: the CPU takes its misses (`cpu`).
        cpu_ok = self.on_miss == "cpu" and self.cpu is not None
        out, future = None, None
        chunks = self._chunks(layer, host_ids)
        for chunk in chunks:
            plan = self._plan(layer, host_ids, chunk, cpu_ok)
            if then is not None:
                then(len(chunks) == 1)   # as in _compute_many
                then = None
            if plan.cpu_work:
                w_host = weights.float().cpu()
                x_host = s.to("cpu", self.store.layout.dtype)
                work = [(t, e, float(w_host[t, j])) for t, e, j in plan.cpu_work]
                self.telemetry.cpu_experts += len(work)
                future = self.cpu.submit(self._experts[layer], layer, x_host, work)
            part = self._run(layer, s, weights, plan)
            out = part if out is None else out + part
        self._inflight.pop(layer, None)
        shared = self._shared[layer]
        if shared is not None:
            out = out + shared(s).to(out.dtype)
        if future is not None:
            start = time.perf_counter()
            cpu_part = future.result()
            self.telemetry.cpu_wait_seconds += time.perf_counter() - start
            out = (out.float() + self._to_device_tensor(cpu_part)).to(out.dtype)
        return out

    def _compute_many(self, layer: int, s: torch.Tensor, weights: torch.Tensor, host_ids, then=None) -> torch.Tensor:
        """Several tokens (a prefill): every expert they use on the GPU, copied where missing, in
        groups that fit the slots. Planned per expert, not per (token, choice): a long prompt
        routes hundreds of thousands of those."""
        ids = torch.as_tensor(host_ids, dtype=torch.long)   # [T, k] on the host (a tensor or rows)
        uses = torch.bincount(ids.reshape(-1), minlength=self.spec.num_experts).tolist()
        self._prompt_uses[layer] = uses
        first = torch.full((self.spec.num_experts,), ids.numel(), dtype=torch.long)
        first.scatter_reduce_(0, ids.reshape(-1), torch.arange(ids.numel()), reduce="amin")
        order = sorted((e for e, n in enumerate(uses) if n), key=lambda e: int(first[e]))   # first use first
        chunks = self._chunks(layer, [order])
        zero = self.slots.zero_slot
        others = {k for l, keys in self._inflight.items() if l != layer for k in keys}
        out = None
        for chunk in chunks:
            protected = {(layer, e) for e in chunk} | others
            slot_of = torch.full((self.spec.num_experts,), zero, dtype=torch.long)
            waits, hits, used = [], 0, 0
            for e in (e for e in order if e in chunk):
                key = (layer, e)
                slot = self.slots.lookup(key)
                if slot is not None:
                    hits += uses[e]
                    self.slots.touch(key)
                else:
                    slot = self._demand_copy(key, protected)
                used += uses[e]
                slot_of[e] = slot
                ready = self.slots.pending_ready(slot)
                if ready is not None:
                    waits.append(ready)
            self.telemetry.count_uses(layer, used, hits)
            if then is not None:
                # Copies ahead only when this layer fits the slots at once (a prefill that
                # cycles its experts through every slot leaves nothing to copy into); the
                # prediction itself is kept either way.
                then(len(chunks) == 1)
                then = None
            self._compute_waits_for(waits)
            part = self._run_many(layer, s, weights, slot_of[ids])
            out = part if out is None else out + part
        self._inflight.pop(layer, None)
        shared = self._shared[layer]
        if shared is not None:
            out = out + shared(s).to(out.dtype)
        return out

    def _run_many(self, layer: int, s: torch.Tensor, weights: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
        """Several tokens' experts at the slots slot_idx [T, k] (a host tensor; the zero slot
        where a choice is left to another group: its zero weights add nothing)."""
        zero = self.slots.zero_slot
        # A compact stack of the slots used keeps grouped kernels within their group limits
        # and reads no idle slot.
        used = torch.unique(slot_idx)
        where = torch.zeros(zero + 1, dtype=torch.long)
        where[used] = torch.arange(used.numel())
        index = self._to_device_tensor(used)
        stack = {name: t.index_select(0, index) for name, t in self.slots.stack.items()}
        out = routed_output(self.family, self._experts[layer], s, stack, self._to_device_tensor(where[slot_idx]),
                             weights)
        released = self.streams.record_on_compute()
        for slot in used.tolist():
            if slot != zero:
                self.slots.set_released(slot, released)
        return out

    def _run(self, layer: int, s: torch.Tensor, weights: torch.Tensor, plan: _Plan) -> torch.Tensor:
        slot_idx = self._to_device(plan.slot_idx)
        w = weights
        if any(k == 0.0 for row in plan.keep for k in row):
            w = weights * self._to_device(plan.keep, weights.dtype)
        out = routed_output(self.family, self._experts[layer], s, self.slots.stack, slot_idx, w)
        released = self.streams.record_on_compute()
        zero = self.slots.zero_slot
        for row in plan.slot_idx:
            for slot in row:
                if slot != zero:
                    self.slots.set_released(slot, released)
        return out

    def _to_device(self, values, dtype=torch.long) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        if self.streams.cuda:
            # From pinned memory: a pageable copy would wait for the whole stream to drain.
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)
