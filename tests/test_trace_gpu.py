"""The tracer on a GPU: same checks as on the CPU, through CUDA streams, pinned host
copies and device_map sharding. Run with `make test-gpu` on a machine with CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.test_trace import SEQ_LEN, _independent_reading, run_cli
from specmoe.families import detect_family
from specmoe.paths import DEMO_CORPUS_DIR, DEMO_MODEL_DIR
from tracing import TraceReader

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
        hidden, ids, weights = seen[layer]
        assert torch.equal(rec["topk_ids"].long(), ids.long().cpu())
        torch.testing.assert_close(rec["topk_weights"], weights.float().cpu(), rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # the stored residual, through the stock norm, is the router's input
            s = family.moe_norm(model, layer)(rec["residual"].cuda())
        torch.testing.assert_close(s, hidden.reshape(s.shape), rtol=1e-4, atol=1e-4)
    # default vectors agree with a CPU trace of the same tokens
    cpu_out = tmp_path / "cpu"
    assert run_cli("--model", DEMO_MODEL_DIR, "--dataset", DEMO_CORPUS_DIR, "--split", "validation",
                   "--seq-len", SEQ_LEN, "--batch-size", 4, "--max-tokens", 64 * SEQ_LEN, "--dtype", "fp32",
                   "--store-dtype", "fp32", "--out", cpu_out) == 0
    cpu = TraceReader(cpu_out)
    for layer in reader.layers:
        torch.testing.assert_close(reader.default_vectors()[layer], cpu.default_vectors()[layer], rtol=1e-3, atol=1e-4)


def test_gpu_bf16_trace_taps_the_forward_and_writes_concurrently(tmp_path):
    """The default GPU path: bf16, default vectors read off the grouped experts' own pass,
    batches copied straight into pinned shard buffers, shards written by several threads.
    Its default vectors match the second pass's; its shards match a serial writer's."""
    from specmoe.models import load_moe_model
    from tracing.recorder import TraceRecorder

    loaded = load_moe_model(DEMO_MODEL_DIR, device="cuda")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(3, 6000, (8, 4, SEQ_LEN), generator=torch.Generator().manual_seed(3)).cuda()
    vectors = {}
    for tap in (True, False):
        recorder = TraceRecorder(loaded, list(loaded.spec.moe_layers), torch.bfloat16, tap=tap)
        for batch in ids:
            recorder.run_batch(batch)
        vectors[tap] = (recorder.mode, recorder.default_vectors())
        recorder.close()
    assert vectors[True][0] == "sorted" and vectors[False][0] == "second pass"
    for key, value in vectors[False][1].items():
        if key.endswith("default_vectors"):  # bf16 outputs rounded per row vs a float32 projection of the sums
            err = (vectors[True][1][key] - value).norm() / value.norm()
            assert err < 1e-2, (key, err.item())
        else:
            assert torch.equal(vectors[True][1][key], value), key

    common = ["--model", DEMO_MODEL_DIR, "--dataset", DEMO_CORPUS_DIR, "--split", "validation", "--seq-len", SEQ_LEN,
              "--batch-size", 4, "--max-tokens", 96 * SEQ_LEN, "--shard-tokens", 8 * SEQ_LEN, "--device", "cuda"]
    for threads in (0, 3):
        assert run_cli(*common, "--writer-threads", threads, "--out", tmp_path / f"t{threads}") == 0
    serial, concurrent = TraceReader(tmp_path / "t0", verify=True), TraceReader(tmp_path / "t3", verify=True)
    assert [e["sha256"] for e in serial.manifest["shards"]] == [e["sha256"] for e in concurrent.manifest["shards"]]
