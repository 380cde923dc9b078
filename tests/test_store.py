"""Trace format: round trip, determinism, crash/resume and damage detection."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import specmoe.safetensors_stream as st
import tracing.trace_reader as trace_reader
from specmoe.errors import CorruptFileError, MismatchError, SpecmoeError
from tracing import FORMAT_VERSION, TraceReader, TraceWriter, estimate_trace_bytes
from tracing.trace_format import DEFAULT_VECTORS_FILE

REPO = Path(__file__).resolve().parents[1]

# Shared by this module and the subprocess of the real-kill test, so both make the same data.
GEN_SRC = textwrap.dedent(
    """
    import torch

    H, E, K, SEQ_LEN = 16, 8, 2, 8
    LAYERS = [1, 3]

    def make_sequences(start, count):
        '''Deterministic trace data for sequences start..start+count-1 (sequence i depends only on i).'''
        parts = []
        for i in range(start, start + count):
            g = torch.Generator().manual_seed(1000 + i)
            seq = {"token_ids": torch.randint(0, 5000, (SEQ_LEN,), generator=g, dtype=torch.int64)}
            for l in LAYERS:
                logits = torch.randn(SEQ_LEN, E, generator=g)
                top = logits.topk(K, dim=-1)
                seq[f"layers.{l}.residual"] = torch.randn(SEQ_LEN, H, generator=g) * 3
                seq[f"layers.{l}.router_logits"] = logits
                seq[f"layers.{l}.topk_ids"] = top.indices  # int64, the writer stores int32
                seq[f"layers.{l}.topk_weights"] = top.values.softmax(-1)
            parts.append(seq)
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    class Acc:
        '''A stand-in for the tracer's accumulators: updated before add(), saved as state.'''
        def __init__(self, state=None):
            self.seen = torch.zeros((), dtype=torch.int64) if state is None else state["seen"].clone()
            self.tok = torch.zeros((), dtype=torch.int64) if state is None else state["tok"].clone()
            self.counts = (torch.zeros(len(LAYERS), E, dtype=torch.int64) if state is None
                           else state["counts"].clone())
            self.sums = (torch.zeros(len(LAYERS), E, H, dtype=torch.float64) if state is None
                         else state["sums"].clone())

        def update(self, batch):
            self.seen += batch["token_ids"].numel() // SEQ_LEN
            self.tok += batch["token_ids"].sum()
            for j, l in enumerate(LAYERS):
                top1 = batch[f"layers.{l}.topk_ids"][:, 0]
                self.counts[j] += torch.bincount(batch[f"layers.{l}.topk_ids"].flatten(), minlength=E)
                self.sums[j].index_add_(0, top1, batch[f"layers.{l}.residual"].double())

        def state(self):
            return {"seen": self.seen, "tok": self.tok, "counts": self.counts, "sums": self.sums}

        def default_vectors(self):
            out = {}
            for j, l in enumerate(LAYERS):
                out[f"layers.{l}.expert_counts"] = self.counts[j]
                out[f"layers.{l}.default_vector_tokens"] = self.counts[j] // 2
                out[f"layers.{l}.default_vectors"] = (self.sums[j] / self.counts[j].clamp(min=1)[:, None]).float()
            return out

    def feed(writer, start, stop, batch, acc, limit=None, pause=0.0):
        '''Feed sequences start..stop-1 in batches of `batch`; return after `limit` batches if given.'''
        import time
        done = 0
        for s in range(start, stop, batch):
            b = make_sequences(s, min(batch, stop - s))
            acc.update(b)
            writer.add(b, state=acc.state)
            done += 1
            if pause:
                time.sleep(pause)
            if limit is not None and done >= limit:
                return False
        return True
    """
)
_gen: dict = {}
exec(GEN_SRC, _gen)
H, E, K, SEQ_LEN, LAYERS = _gen["H"], _gen["E"], _gen["K"], _gen["SEQ_LEN"], _gen["LAYERS"]
make_sequences, Acc, feed = _gen["make_sequences"], _gen["Acc"], _gen["feed"]

TOTAL = 17  # sequences: with 3 per shard -> 5 full shards and a short one of 2
SPS = 3
BATCH = 2  # does not divide SPS, so batches straddle shard boundaries
META = {
    "model": {"id": "tiny/moe", "revision": "abc123", "family": "mixtral", "hidden_size": H,
              "num_experts": E, "top_k": K, "moe_layers": [0, 1, 2, 3]},
    "dataset": {"id": "demo-corpus", "split": "train", "seed": 0},
    "tracer": {"batch_size": BATCH},
}


def new_writer(out, resume=False, meta=META, store_dtype="bf16", **kw):
    return TraceWriter(out, meta, layers=LAYERS, seq_len=SEQ_LEN, sequences_per_shard=SPS,
                       store_dtype=store_dtype, resume=resume, **kw)


def full_run(out, store_dtype="bf16", total=TOTAL):
    w = new_writer(out, store_dtype=store_dtype)
    acc = Acc()
    feed(w, 0, total, BATCH, acc)
    w.close(acc.default_vectors())
    return w, acc


def resume_run(out):
    w = new_writer(out, resume=True)
    acc = Acc(w.state)
    assert int(acc.seen) == w.sequences_done
    feed(w, w.sequences_done, TOTAL, BATCH, acc)
    w.close(acc.default_vectors())
    return w, acc


def file_hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def shard_hashes(d: Path) -> dict[str, str]:
    return {k: v for k, v in file_hashes(d).items() if k.startswith("shard-")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted bf16 run, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("ref") / "trace"
    w, acc = full_run(out)
    return out, w, acc


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("store_dtype", ["bf16", "fp16", "fp32"])
def test_round_trip(tmp_path, store_dtype):
    out = tmp_path / "t"
    w, _ = full_run(out, store_dtype=store_dtype)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[store_dtype]
    ref = make_sequences(0, TOTAL)
    n = TOTAL * SEQ_LEN

    r = TraceReader(out, verify=True)
    assert r.complete and r.num_shards == 6 and r.num_sequences == TOTAL and r.num_tokens == n
    assert (r.seq_len, r.hidden_size, r.num_experts, r.top_k) == (SEQ_LEN, H, E, K)
    assert r.layers == LAYERS and r.store_dtype == store_dtype
    assert [e["sequences"] for e in r.manifest["shards"]] == [3, 3, 3, 3, 3, 2]
    assert r.manifest["tracer"] == {"batch_size": BATCH} and r.manifest["model"]["id"] == "tiny/moe"
    assert w.bytes_written == sum(e["bytes"] for e in r.manifest["shards"]) + r.manifest["default_vectors"]["bytes"]

    tok = r.token_ids()
    assert tok.dtype == torch.int32 and torch.equal(tok, ref["token_ids"].to(torch.int32))
    for l in LAYERS:
        got = r.layer(l)
        assert got["residual"].dtype == dt
        assert torch.equal(got["residual"], ref[f"layers.{l}.residual"].to(dt))
        assert torch.equal(got["router_logits"], ref[f"layers.{l}.router_logits"].to(dt))
        assert got["topk_ids"].dtype == torch.int32
        assert torch.equal(got["topk_ids"], ref[f"layers.{l}.topk_ids"].to(torch.int32))
        assert got["topk_weights"].dtype == torch.float32
        assert torch.equal(got["topk_weights"], ref[f"layers.{l}.topk_weights"])

    seq = r.sequence_ids()
    assert torch.equal(seq, torch.arange(n) // SEQ_LEN)
    assert list(r.shard_sequences(1)) == [3, 4, 5] and list(r.shard_sequences(5)) == [15, 16]
    assert torch.equal(r.sequence_ids([1, 5]), torch.tensor([3] * 8 + [4] * 8 + [5] * 8 + [15] * 8 + [16] * 8))

    # shard subsets: tokens of shards 1 and 4 only, in the order asked
    sub = r.layer(3, fields=("residual",), shards=[4, 1])
    rows = torch.cat([torch.arange(12 * SEQ_LEN, 15 * SEQ_LEN), torch.arange(3 * SEQ_LEN, 6 * SEQ_LEN)])
    assert list(sub) == ["residual"]
    assert torch.equal(sub["residual"], ref["layers.3.residual"].to(dt)[rows])
    assert torch.equal(r.token_ids([4, 1]), ref["token_ids"].to(torch.int32)[rows])

    src, dst = r.pair(1, 3, fields_src=("residual",), fields_dst=("topk_ids", "router_logits"), shards=[2])
    rows = torch.arange(6 * SEQ_LEN, 9 * SEQ_LEN)
    assert torch.equal(src["residual"], ref["layers.1.residual"].to(dt)[rows])
    assert torch.equal(dst["topk_ids"], ref["layers.3.topk_ids"].to(torch.int32)[rows])
    assert torch.equal(dst["router_logits"], ref["layers.3.router_logits"].to(dt)[rows])

    seen = []
    for i, data in r.iter_shards(layers=[3], fields=("topk_ids",)):
        seen.append(i)
        assert set(data) == {"token_ids", "layers.3.topk_ids"}
        span = r.shard_sequences(i)
        rows = torch.arange(span.start * SEQ_LEN, span.stop * SEQ_LEN)
        assert torch.equal(data["layers.3.topk_ids"], ref["layers.3.topk_ids"].to(torch.int32)[rows])
    assert seen == list(range(6))

    dv, counts = r.default_vectors(), r.expert_counts()
    assert set(dv) == set(LAYERS) and dv[1].shape == (E, H) and dv[1].dtype == torch.float32
    assert counts[3].dtype == torch.int64 and int(counts[3].sum()) == n * K
    assert r.default_vector_tokens()[1].dtype == torch.int64

    with pytest.raises(SpecmoeError, match=r"layer 2 was not traced.*\[1, 3\]"):
        r.layer(2)
    with pytest.raises(SpecmoeError, match="shard 6 does not exist"):
        r.layer(1, shards=[6])
    with pytest.raises(SpecmoeError, match="unknown trace field"):
        r.layer(1, fields=("residuals",))


def test_layer_reads_only_asked_shards(reference, monkeypatch):
    out, _, _ = reference
    r = TraceReader(out)
    opened = []
    real = trace_reader.safe_open

    def spy(path, *a, **kw):
        opened.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(trace_reader, "safe_open", spy)
    r.layer(1, fields=("residual",), shards=[2])
    r.pair(1, 3, shards=[4])
    r.token_ids(shards=[0])
    assert opened == ["shard-00002.safetensors", "shard-00004.safetensors", "shard-00000.safetensors"]


def test_deterministic_bytes(tmp_path, reference):
    full_run(tmp_path / "again")
    assert shard_hashes(tmp_path / "again") == shard_hashes(reference[0])
    assert file_hashes(tmp_path / "again")[DEFAULT_VECTORS_FILE] == \
        file_hashes(reference[0])[DEFAULT_VECTORS_FILE]


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = lambda *shape: torch.randn(*shape, generator=g) * 50  # noqa: E731
    return {
        "layers.10.residual": x(6, 5).to(torch.bfloat16),
        "layers.2.residual": x(6, 5).to(torch.bfloat16),  # "10" < "2": byte order, not numeric
        "layers.2.router_logits": x(6, 3).to(torch.float16),
        "layers.2.topk_ids": torch.randint(-9, 99, (6, 2), generator=g, dtype=torch.int32),
        "layers.2.topk_weights": x(6, 2),
        "token_ids": torch.randint(0, 5000, (6,), generator=g, dtype=torch.int32),
        "sums": x(3, 4).double(),
        "counts": torch.randint(0, 1 << 40, (4,), generator=g, dtype=torch.int64),
        "offset": torch.tensor(5, dtype=torch.int64),  # 0-d
        "small": torch.randint(-100, 100, (7,), generator=g, dtype=torch.int16),
        "bytes": torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
        "signed": torch.randint(-100, 100, (5,), generator=g, dtype=torch.int8),
        "mask": torch.rand(9, generator=g) > 0.5,
        "nothing": torch.empty(0, 4, dtype=torch.bfloat16),
        "ünïcode \"quoted\"\n": torch.arange(3, dtype=torch.float32),
    }


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"ké\"y\n": "välue\t"}])
def test_streamed_file_equals_safetensors_save(tmp_path, metadata):
    """Our own header + streamed tensor bytes: the same file safetensors.torch.save makes."""
    from safetensors import safe_open
    from safetensors.torch import save

    tensors = _mixed_tensors()
    path = tmp_path / "x.safetensors"
    sha, nbytes = st.save_tensors(path, tensors, metadata, fsync=False)
    data = path.read_bytes()
    assert data == save(tensors, metadata=metadata)
    assert nbytes == len(data) and sha == hashlib.sha256(data).hexdigest()
    assert not list(tmp_path.glob("*.tmp"))
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert (f.metadata() or None) == (metadata or None)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got, t)
    for dtype in (torch.bfloat16, torch.int32, torch.float32):  # one dtype alone, one tensor alone
        only = {k: t for k, t in tensors.items() if t.dtype == dtype}
        st.save_tensors(path, only, metadata, fsync=True)
        assert path.read_bytes() == save(only, metadata=metadata)
    if metadata != {}:  # (safetensors writes no tensors with empty metadata as broken JSON)
        st.save_tensors(path, {}, metadata, fsync=False)
        assert path.read_bytes() == save({}, metadata=metadata)


def test_streamed_views_share_memory_and_survive_short_writes(tmp_path, monkeypatch):
    """Tensors adjacent in one buffer go out as one view; partial writev() calls are resumed."""
    block = torch.arange(64, dtype=torch.uint8)
    a, b = block[:16].view(torch.float32), block[16:48].view(torch.int32)
    views = st.byte_ranges([a, b, block[56:]])  # a and b are neighbours, the last is not
    assert [v.nbytes for v in views] == [48, 8]
    block[0] = 255
    assert views[0][0] == 255  # a view, not a copy

    real = os.writev
    calls = []

    def stingy(fd, buffers):  # writes at most 5 bytes per call, like a slow pipe
        buffers = list(buffers)
        calls.append(len(buffers))
        return real(fd, [memoryview(buffers[0])[:5]])

    monkeypatch.setattr(st.os, "writev", stingy)
    monkeypatch.setattr(st, "_IOV_MAX", 2)
    tensors = _mixed_tensors()
    path = tmp_path / "y.safetensors"
    st.save_tensors(path, tensors, {"format": "pt"}, fsync=False)
    from safetensors.torch import save

    assert path.read_bytes() == save(tensors, metadata={"format": "pt"})
    assert len(calls) > 10 and max(calls) <= 2


def test_unusual_tensors_fall_back_to_safetensors(tmp_path):
    from safetensors.torch import save

    tensors = {"c": torch.randn(3, 2, dtype=torch.complex64), "x": torch.arange(4, dtype=torch.int32)}
    path = tmp_path / "z.safetensors"
    sha, nbytes = st.save_tensors(path, tensors, {"format": "pt"}, fsync=False)
    assert path.read_bytes() == save(tensors, metadata={"format": "pt"})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() and nbytes == path.stat().st_size


def test_shards_equal_safetensors_save(reference):
    """Every shard, the short last one too, is what safetensors would write for its tensors."""
    from safetensors import safe_open
    from safetensors.torch import save

    out = reference[0]
    names = sorted(p.name for p in out.glob("shard-*.safetensors")) + [DEFAULT_VECTORS_FILE]
    for name in names:
        with safe_open(str(out / name), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        assert (out / name).read_bytes() == save(tensors, metadata={"format": "pt"}), name


def test_full_shard_is_one_buffer(tmp_path, monkeypatch):
    """A full shard's tensors sit back to back in the writer's buffer, in file order."""
    seen = []
    real = st.byte_ranges
    monkeypatch.setattr(st, "byte_ranges", lambda ts: seen.append(real(ts)) or seen[-1])
    w = new_writer(tmp_path / "t")
    feed(w, 0, 4, BATCH, Acc())  # one full shard of 3 sequences, then state files
    assert len(seen[0]) == 1
    assert seen[0][0].nbytes == SPS * SEQ_LEN * (4 + len(LAYERS) * ((H + E) * 2 + K * 8))


def test_estimate_trace_bytes(reference):
    out, w, _ = reference
    est = estimate_trace_bytes(TOTAL * SEQ_LEN, layers=LAYERS, hidden_size=H, num_experts=E, top_k=K,
                               store_dtype="bf16")
    assert w.bytes_written <= est
    # data dominates real traces; for this toy one the per-shard headers are a large share
    big = estimate_trace_bytes(1_000_000, layers=32, hidden_size=4096, num_experts=64, top_k=8)
    assert big == pytest.approx(1_000_000 * (4 + 32 * ((4096 + 64) * 2 + 8 * 8)), rel=1e-3)


@pytest.mark.parametrize("batch", [BATCH, SPS])  # straddling shard boundaries, and aligned with them
def test_concurrent_writing_equals_serial(tmp_path, reference, batch):
    """Shards written by worker threads and committed in order give the serial run's files."""
    ref_out, _, _ = reference
    if batch != BATCH:
        ref_out = tmp_path / "serial"
        w = new_writer(ref_out)
        acc = Acc()
        feed(w, 0, TOTAL, batch, acc)
        w.close(acc.default_vectors())
    out = tmp_path / "concurrent"
    w = new_writer(out, workers=3)
    acc = Acc()
    feed(w, 0, TOTAL, batch, acc)
    w.close(acc.default_vectors())
    assert file_hashes(out) == file_hashes(ref_out)


def test_failure_in_a_worker_reaches_the_caller(tmp_path, reference, monkeypatch):
    """A shard that cannot be written stops the trace with that error; the shards before it
    stay listed, and --resume completes the trace."""
    ref_out, _, _ = reference
    real = st.save_tensors
    calls = collections.Counter()

    def flaky(path, *args, **kwargs):
        if path.name == "shard-00002.safetensors":
            calls["failed"] += 1
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(st, "save_tensors", flaky)
    out = tmp_path / "t"
    w = new_writer(out, workers=2)
    acc = Acc()
    with pytest.raises(OSError, match="No space left"):
        feed(w, 0, TOTAL, SPS, acc)
        w.close(acc.default_vectors())
    w.stop()
    assert calls["failed"] == 1
    assert [e["file"] for e in TraceReader(out).manifest["shards"]] == ["shard-00000.safetensors",
                                                                        "shard-00001.safetensors"]
    monkeypatch.setattr(st, "save_tensors", real)
    w2 = new_writer(out, resume=True, workers=2)
    acc2 = Acc(w2.state)
    feed(w2, w2.sequences_done, TOTAL, BATCH, acc2)
    w2.close(acc2.default_vectors())
    assert shard_hashes(out) == shard_hashes(ref_out)


# --------------------------------------------------------------------------- interruption and resume


@pytest.mark.parametrize("limit", [4, 5])  # 4: stop on a shard boundary; 5: mid-shard after a straddle
def test_abandon_and_resume(tmp_path, reference, limit):
    ref_out, _, ref_acc = reference
    out = tmp_path / "t"
    w = new_writer(out)
    acc = Acc()
    assert not feed(w, 0, TOTAL, BATCH, acc, limit=limit)  # then the writer is simply abandoned
    del w
    shards = {4: 2, 5: 3}[limit]
    assert len(TraceReader(out).manifest["shards"]) == shards
    (out / f"shard-{shards:05d}.safetensors.tmp").write_bytes(b"half a shard")
    (out / "state.safetensors.tmp").write_bytes(b"junk")
    w2 = new_writer(out, resume=True)
    # limit=4: 8 sequences fed, shard 1 ended at 6 -> resume at 6; limit=5: shard 2 ended at 9
    # inside the batch [8, 9], sequence 9 is kept with the state -> resume at 10
    assert w2.sequences_done == {4: 6, 5: 10}[limit]
    assert not list(out.glob("*.tmp"))
    assert int(w2.state["seen"]) == w2.sequences_done
    acc2 = Acc(w2.state)
    feed(w2, w2.sequences_done, TOTAL, BATCH, acc2)
    w2.close(acc2.default_vectors())

    assert shard_hashes(out) == shard_hashes(ref_out)
    for k, v in acc2.state().items():
        assert torch.equal(v, ref_acc.state()[k])
    assert file_hashes(out)[DEFAULT_VECTORS_FILE] == file_hashes(ref_out)[DEFAULT_VECTORS_FILE]
    TraceReader(out, verify=True)


@pytest.mark.parametrize("crash_in", ["_write_state", "_write_manifest", "close_manifest"])
def test_crash_between_files(tmp_path, reference, monkeypatch, crash_in):
    """A kill after the shard file but before state, or after state but before the manifest."""
    ref_out, _, ref_acc = reference
    out = tmp_path / "t"
    acc = Acc()
    name = "_write_manifest" if crash_in == "close_manifest" else crash_in
    real = getattr(TraceWriter, name)
    calls = collections.Counter()

    def boom(self, *a, **kw):
        calls[name] += 1
        # the constructor writes the manifest once; crash on the write belonging to shard 2
        # (or, for close_manifest, on the final manifest write of close())
        target = {"_write_state": 3, "_write_manifest": 4, "close_manifest": 7}[crash_in]
        if calls[name] == target:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(TraceWriter, name, boom)
    w = new_writer(out)
    with pytest.raises(KeyboardInterrupt):
        if feed(w, 0, TOTAL, BATCH, acc):
            w.close(acc.default_vectors())
    monkeypatch.setattr(TraceWriter, name, real)

    w2, acc2 = resume_run(out)
    assert shard_hashes(out) == shard_hashes(ref_out)
    for k, v in acc2.state().items():
        assert torch.equal(v, ref_acc.state()[k])
    assert TraceReader(out, verify=True).complete


def test_resume_complete_trace_is_noop(tmp_path):
    out = tmp_path / "t"
    full_run(out)
    before = file_hashes(out)
    w = new_writer(out, resume=True)
    assert w.complete and w.sequences_done == TOTAL and int(w.state["seen"]) == TOTAL
    w.close(Acc(w.state).default_vectors())
    with pytest.raises(SpecmoeError, match="already complete"):
        w.add(make_sequences(TOTAL, 1))
    assert file_hashes(out) == before


KILL_META = {"model": {"id": "tiny/moe", "family": "mixtral"}, "dataset": {"id": "demo"}}
KILL_SCRIPT = GEN_SRC + textwrap.dedent(
    """
    import sys
    from tracing import TraceWriter
    out, total, sps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    meta = %r
    w = TraceWriter(out, meta, layers=LAYERS, seq_len=SEQ_LEN, sequences_per_shard=sps, store_dtype="bf16")
    acc = Acc()
    feed(w, 0, total, batch, acc, pause=0.01)
    w.close(acc.default_vectors())
    """
) % (KILL_META,)


def test_real_sigkill_and_resume(tmp_path):
    total, sps, batch = 40, 3, 2
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(total), str(sps), str(batch)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "shard-00000.safetensors").exists():
            assert proc.poll() is None, "writer exited before its first shard"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(0.03)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    listed = len(json.loads((out / "manifest.json").read_text())["shards"])
    assert listed < -(-total // sps), "the writer finished before it was killed"

    def run(path, resume):
        w = TraceWriter(path, KILL_META, layers=LAYERS, seq_len=SEQ_LEN, sequences_per_shard=sps,
                        store_dtype="bf16", resume=resume)
        acc = Acc(w.state)
        assert int(acc.seen) == w.sequences_done
        feed(w, w.sequences_done, total, batch, acc)
        w.close(acc.default_vectors())
        return w

    assert run(out, resume=True).sequences_done == total
    ref = tmp_path / "ref"
    run(ref, resume=False)
    assert shard_hashes(out) == shard_hashes(ref)
    assert file_hashes(out)[DEFAULT_VECTORS_FILE] == file_hashes(ref)[DEFAULT_VECTORS_FILE]
    assert TraceReader(out, verify=True).num_sequences == total


# --------------------------------------------------------------------------- damage and refusals


def test_truncated_shard(tmp_path):
    out = tmp_path / "t"
    full_run(out)
    p = out / "shard-00003.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="shard-00003.safetensors"):
        TraceReader(out)
    with pytest.raises(CorruptFileError, match="shard-00003.safetensors"):
        new_writer(out, resume=True)
    p.unlink()
    with pytest.raises(CorruptFileError, match="shard-00003.safetensors is missing"):
        TraceReader(out)


def test_altered_byte(tmp_path):
    out = tmp_path / "t"
    w = new_writer(out)
    acc = Acc()
    feed(w, 0, 12, BATCH, acc, limit=4)  # 8 sequences: shards 0-1, trace left resumable
    p = out / "shard-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data: same size, header still valid
    p.write_bytes(bytes(data))

    r = TraceReader(out)  # cheap checks pass
    with pytest.raises(CorruptFileError, match="shard-00001.safetensors"):
        r.verify()
    with pytest.raises(CorruptFileError, match="shard-00001.safetensors"):
        TraceReader(out, verify=True)
    with pytest.raises(CorruptFileError, match="shard-00001.safetensors"):
        new_writer(out, resume=True)


def test_damaged_state_refuses_resume(tmp_path):
    out = tmp_path / "t"
    w = new_writer(out)
    feed(w, 0, 12, BATCH, Acc(), limit=4)
    p = out / "state.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="state.safetensors"):
        new_writer(out, resume=True)


def test_resume_with_other_model_or_settings(tmp_path):
    out = tmp_path / "t"
    w = new_writer(out)
    feed(w, 0, 12, BATCH, Acc(), limit=4)
    before = file_hashes(out)
    other = json.loads(json.dumps(META))
    other["model"]["id"] = "other/moe"
    with pytest.raises(MismatchError, match="other/moe"):
        new_writer(out, resume=True, meta=other)
    other = json.loads(json.dumps(META))
    other["dataset"]["split"] = "validation"
    with pytest.raises(MismatchError, match="dataset"):
        new_writer(out, resume=True, meta=other)
    with pytest.raises(MismatchError, match="store_dtype"):
        new_writer(out, resume=True, store_dtype="fp16")
    with pytest.raises(MismatchError, match="layers"):
        TraceWriter(out, META, layers=[1], seq_len=SEQ_LEN, sequences_per_shard=SPS, store_dtype="bf16",
                    resume=True)
    assert file_hashes(out) == before


def test_existing_trace_without_resume(tmp_path):
    out = tmp_path / "t"
    full_run(out)
    (out / "notes.txt").write_text("mine")
    before = file_hashes(out)
    with pytest.raises(SpecmoeError, match="already holds a trace; use --resume or another --out"):
        new_writer(out)
    assert file_hashes(out) == before


def test_disk_space_refusal(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 300 << 20))
    out = tmp_path / "t"
    with pytest.raises(SpecmoeError, match=r"needs about 2\.0 GiB more but only 300\.0 MiB is free"):
        new_writer(out, expected_bytes=2 << 30)
    assert not out.exists()
    new_writer(out, expected_bytes=100 << 20)  # fits


def test_manifest_problems(tmp_path):
    out = tmp_path / "t"
    full_run(out)
    m = json.loads((out / "manifest.json").read_text())

    m["format_version"] = FORMAT_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SpecmoeError, match="format version 2"):
        TraceReader(out)
    with pytest.raises(SpecmoeError, match="format version 2"):
        new_writer(out, resume=True)

    (out / "manifest.json").write_text('{"format": "specmoe-trace", "format_ver')
    with pytest.raises(SpecmoeError, match="not valid JSON"):
        TraceReader(out)
    (out / "manifest.json").unlink()
    with pytest.raises(SpecmoeError, match="manifest.json is missing"):
        TraceReader(out)
    # shards but no manifest: neither a fresh start nor a resume may overwrite them
    with pytest.raises(SpecmoeError, match="no manifest.json"):
        new_writer(out)


def test_bad_batches(tmp_path):
    w = new_writer(tmp_path / "t")
    b = make_sequences(0, 1)
    with pytest.raises(SpecmoeError, match="multiple of seq_len"):
        w.add({**b, "token_ids": b["token_ids"][:-1]})
    with pytest.raises(SpecmoeError, match="missing"):
        w.add({k: v for k, v in b.items() if k != "layers.3.residual"})
    with pytest.raises(SpecmoeError, match="hidden_size=15"):
        w.add({**b, "layers.1.residual": b["layers.1.residual"][:, :15]})
    with pytest.raises(SpecmoeError, match="owns that field"):
        new_writer(tmp_path / "u", meta={**META, "shards": []})


def test_grow_a_complete_trace_through_an_interruption(tmp_path):
    """grow() reopens a complete trace: its shards stay as they are (the short last one too),
    new ones follow, and a growth killed before its first new shard resumes like any trace."""
    out = tmp_path / "t"
    full_run(out)  # 17 sequences: shards of 3, 3, 3, 3, 3, 2
    before = shard_hashes(out)
    w = new_writer(out, resume=True)
    w.grow()
    assert not w.complete and not TraceReader(out).complete
    acc = Acc(w.state)
    feed(w, TOTAL, TOTAL + 4, BATCH, acc, limit=1)  # 2 sequences: no new shard yet, then killed
    del w
    w = new_writer(out, resume=True)
    assert w.sequences_done == TOTAL and not w.complete
    acc = Acc(w.state)
    feed(w, TOTAL, TOTAL + 7, BATCH, acc)
    w.close(acc.default_vectors())
    after = shard_hashes(out)
    assert all(after[name] == digest for name, digest in before.items())
    r = TraceReader(out, verify=True)
    assert r.complete and [e["sequences"] for e in r.manifest["shards"]] == [3, 3, 3, 3, 3, 2, 3, 3, 1]
    ref = make_sequences(0, TOTAL + 7)
    assert torch.equal(r.token_ids(), ref["token_ids"].to(torch.int32))
    assert torch.equal(r.layer(3, fields=("topk_ids",))["topk_ids"], ref["layers.3.topk_ids"].to(torch.int32))
    assert int(r.expert_counts()[1].sum()) == (TOTAL + 7) * SEQ_LEN * K
