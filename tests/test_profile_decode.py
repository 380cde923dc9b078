"""benchmarks/profile_decode.py's reading of a profiled trace, on traces written here with the
shape torch's profiler gives: `serial_chain` on a queued `cpu` step (per layer, the experts
graph, a wait at the gate, the next layer's kernels, then its staging copies, the step's
8-byte count last); `copy_timeline` on expert copies over two streams."""

from __future__ import annotations

import gzip
import json

import torch

from benchmarks.profile_decode import copy_timeline, read_trace, serial_chain


def _kernel(ts, dur, name="k"):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {}}


def _copy(ts, dur, nbytes, kind="DtoH (Device -> Pinned)"):
    return {"ph": "X", "cat": "gpu_memcpy", "name": f"Memcpy {kind}", "ts": ts, "dur": dur, "args": {"bytes": nbytes}}


def _layer(t, gate, kernels):
    """One period from t (the last count landed): the experts graph (20 us), the gate wait,
    `kernels` us of the next layer's graph in 1-us kernels with 0.5 us between, 6 us, then
    four staging copies of 2 us, 1 us apart. Returns (events, when the count landed)."""
    events = [_kernel(t + 1, 20, "indexed_matvec_kernel"), _copy(t + 21.5, 1, 8192, "HtoD (Pinned -> Device)")]
    t = t + 22.5 + gate
    for _ in range(kernels):
        events.append(_kernel(t, 1))
        t += 1.5
    t += 6 - 0.5
    first_copy = t
    for nbytes in (64, 4096, 32, 8):
        events.append(_copy(t, 2, nbytes))
        t += 3
    return events, first_copy, t - 1


def test_the_serial_chain_is_read_layer_by_layer_from_a_trace(tmp_path):
    events, t, expected = [_copy(0, 2, 8)], 2.0, []
    for gate, kernels in ((40, 30), (10, 50), (25, 40)):
        layer, first_copy, landed = _layer(t, gate, kernels)
        events += layer
        start = t + 22.5 + gate
        expected.append((landed - t, gate, first_copy - start, landed - first_copy))
        t = landed
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 1000})   # not a GPU operation
    trace = tmp_path / "t.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events[::-1]}, f)   # any order: sorted by start
    got = serial_chain(read_trace(trace))
    medians = [sorted(row[i] for row in expected)[1] for i in range(4)]
    assert got == {"period": round(medians[0], 1), "gate_gap": medians[1], "attention_and_routing": medians[2],
                   "staging": medians[3], "layers": 3}
    assert got["gate_gap"] == 25 and got["staging"] == 11


def test_a_trace_with_no_staged_routing_gives_none(tmp_path):
    trace = tmp_path / "t.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": [_kernel(0, 5), _copy(10, 2, 64)]}, f)
    assert serial_chain(read_trace(trace)) is None


def test_the_gpu_time_of_a_resident_step_counts_only_gpu_work():
    """benchmarks/runtime_decode.py's GPU time per token with every expert resident, on the
    CPU: the same steps run, and no GPU work is counted."""
    from benchmarks.runtime_decode import EMBEDDING_STD, gpu_time_alone, qwen3_30b_shape
    from runtime.build import parts_random
    from runtime.config import RuntimeConfig

    base = RuntimeConfig(device="cpu", dtype="fp32", max_context=64)
    parts = parts_random(qwen3_30b_shape(2, hidden=128), base, progress=False, embedding_std=EMBEDDING_STD)
    assert gpu_time_alone(parts, base, torch.tensor([1, 2, 3, 4]), [5, 6], steps=2, profiled=2) == 0.0


def test_the_copy_timeline_counts_overlapping_copies_once_and_splits_the_gaps(tmp_path):
    """Two steps of expert copies (100 bytes each) on two streams. Step 1: copies at 0-10 and
    12-22 overlapping one at 8-20 (busy 0-22), a 3-us gap, 25-35, a 50-us gap, 85-95. Then the
    token's end, 400 us, and step 2: 495-505, a 5-us gap, 510-520. Smaller copies (the routing)
    and kernels are not expert copies."""
    def copy(ts, dur, nbytes=100):
        return _copy(ts, dur, nbytes, "HtoD (Pinned -> Device)")

    events = [copy(0, 10), copy(8, 12), copy(12, 10), copy(25, 10), copy(85, 10), copy(495, 10), copy(510, 10),
              copy(40, 1, 64), _kernel(30, 200)]
    trace = tmp_path / "t.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    got = copy_timeline(read_trace(trace), expert_bytes=100, steps=2)
    busy = 22 + 10 + 10 + 10 + 10
    assert got["copies_per_step"] == 3.5
    assert got["busy_ms_per_step"] == 1e-3 * busy / 2
    assert got["rate_while_busy_gb_s"] == 7 * 100 / busy / 1e3
    assert got["token_end_us"] == [400]
    assert got["short_gaps_per_step"] == 1 and got["idle_short_ms_per_step"] == 1e-3 * (3 + 5) / 2
    assert got["long_gaps_per_step"] == 0.5 and got["idle_long_ms_per_step"] == 1e-3 * 50 / 2
    assert got["long_gap_us_median"] == 50
    assert copy_timeline(read_trace(trace), expert_bytes=99, steps=2) is None


def test_copy_streams_refuses_bad_counts_and_a_machine_without_cuda(monkeypatch, capsys):
    """benchmarks/copy_streams.py: one error line and a non-zero exit, before anything is pinned."""
    import sys

    from benchmarks import copy_streams

    monkeypatch.setattr(sys, "argv", ["copy_streams.py", "--streams", "0,2"])
    assert copy_streams.main() == 2
    assert capsys.readouterr().err.strip() == "error: --streams, --copies, --experts and --rounds must be positive"
    if not torch.cuda.is_available():
        monkeypatch.setattr(sys, "argv", ["copy_streams.py"])
        assert copy_streams.main() == 1
        assert "needs a CUDA device" in capsys.readouterr().err
