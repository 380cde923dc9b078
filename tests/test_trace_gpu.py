"""The tracer on a GPU: same checks as on the CPU, through CUDA streams, pinned host
copies and device_map sharding. Run with `make test-gpu` on a machine with CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.test_trace import SEQ_LEN, _independent_reading, run_cli
from tracing.families import detect_family
from tracing.paths import DEMO_CORPUS_DIR, DEMO_MODEL_DIR
from tracing.store import TraceReader

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_gpu_trace_records_the_models_own_routing(device, tmp_path):
    out = tmp_path / "trace"
    assert run_cli("--model", DEMO_MODEL_DIR, "--dataset", DEMO_CORPUS_DIR, "--split", "validation",
                   "--seq-len", SEQ_LEN, "--batch-size", 4, "--max-tokens", 64 * SEQ_LEN, "--shard-tokens",
                   8 * SEQ_LEN, "--dtype", "fp32", "--store-dtype", "fp32", "--device", device, "--out", out) == 0
    reader = TraceReader(out, verify=True)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).cuda().eval()
    family = detect_family(model)
    input_ids = reader.token_ids().view(-1, SEQ_LEN).long().cuda()
    seen = _independent_reading(model, family, input_ids)
    for layer in reader.layers:
        rec = reader.layer(layer)
        _, ids, weights = seen[layer]
        assert torch.equal(rec["topk_ids"].long(), ids.long().cpu())
        torch.testing.assert_close(rec["topk_weights"], weights.float().cpu(), rtol=1e-5, atol=1e-5)
    # default vectors agree with a CPU trace of the same tokens
    cpu_out = tmp_path / "cpu"
    assert run_cli("--model", DEMO_MODEL_DIR, "--dataset", DEMO_CORPUS_DIR, "--split", "validation",
                   "--seq-len", SEQ_LEN, "--batch-size", 4, "--max-tokens", 64 * SEQ_LEN, "--dtype", "fp32",
                   "--store-dtype", "fp32", "--out", cpu_out) == 0
    cpu = TraceReader(cpu_out)
    for layer in reader.layers:
        torch.testing.assert_close(reader.default_vectors()[layer], cpu.default_vectors()[layer], rtol=1e-3, atol=1e-4)
