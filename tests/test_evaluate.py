"""Teacher-forced speculative evaluation equals speculative decoding, token by token.

The reference is the runtime's own decode path in `speculate` (one token per step, each
MoE layer running the experts predicted h layers earlier); the evaluation runs the
whole sequence in one step per layer. Equal logits at every position mean the
evaluation measures what a user decoding speculatively would get."""

from __future__ import annotations

import json

import pytest
import torch

import runtime
from runtime.config import RuntimeConfig
from runtime.evaluate import _logits
from specmoe.paths import REPO_ROOT
from tests.tiny_models import tiny_model

EST = str(REPO_ROOT / "checkpoints" / "demo-estimator-h1")
SEQ = torch.tensor([5, 17, 3, 99, 42, 7, 64, 23, 11, 80, 31, 9, 4, 8, 15, 16, 23, 42])


def decoded(engine, seq, prefix):
    engine.reset()
    rows = [engine.step(seq[:prefix], all_logits=True)] if prefix else []
    for t in seq[prefix:]:
        rows.append(engine.step(t.reshape(1)))
    return torch.cat(rows)


@pytest.mark.parametrize("family,prefix", [("qwen3_moe", 0), ("deepseek_v3", 4), ("gpt_oss", 6), ("mixtral", 1),
                                           ("qwen2_moe", 3)])
def test_teacher_forced_speculation_equals_decoding(family, prefix):
    parts = runtime.parts_from_model(tiny_model(family), RuntimeConfig(device="cpu"))
    engine = runtime.configure(parts, RuntimeConfig(device="cpu", prefetch="current", on_miss="speculate",
                                                    max_context=64))
    want = decoded(engine, SEQ, prefix)
    got = _logits(engine, SEQ, prefix, speculate=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    exact = _logits(runtime.configure(parts, RuntimeConfig(device="cpu", prefetch="none", max_context=64)),
                    SEQ, prefix, speculate=False)
    assert not torch.allclose(got, exact, atol=1e-3)  # speculation did change something


def test_demo_hybrid_teacher_forced_equals_decoding():
    from transformers import AutoModelForCausalLM

    from specmoe.paths import DEMO_MODEL_DIR

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    parts = runtime.parts_from_model(model, RuntimeConfig(device="cpu"))
    engine = runtime.configure(parts, RuntimeConfig(device="cpu", prefetch="hybrid", on_miss="speculate",
                                                    estimators=EST, max_context=64))
    torch.testing.assert_close(_logits(engine, SEQ, 5, speculate=True), decoded(engine, SEQ, 5), rtol=1e-4, atol=1e-4)


def test_infer_eval_writes_the_table(tmp_path, capsys):
    from runtime.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--device", "cpu", "--estimators", EST, "--seq-len", "64", "--max-tokens", "256",
                 "--exact-prefix", "8", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "eval.json").read_text())
    assert set(data["modes"]) == {"exact", "quasi", "learned", "hybrid"}
    exact = data["modes"]["exact"]
    assert exact["top1_agreement"] == 1.0 and exact["kl_from_exact"] == pytest.approx(0, abs=1e-6)
    for m in ("quasi", "learned", "hybrid"):
        r = data["modes"][m]
        assert 0.5 < r["hit_rate"] <= 1 and 0 <= r["exact_set_rate"] <= 1 and r["kl_from_exact"] > 0
        assert len(r["hit_rate_per_layer"]) == 11
    assert (out / "eval.png").stat().st_size > 1000 and "Router-PF" in (out / "eval.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--modes", "learned"], "--estimators"),
    (["--modes", "quasi"], "default vectors"),
    (["--modes", "bogus", "--estimators", EST], "unknown mode"),
    (["--split", "nope", "--estimators", EST], "split"),
])
def test_eval_bad_input(argv, message, capsys):
    from runtime.cli import main

    assert main(["eval", "--device", "cpu", "--quiet", "--max-tokens", "256", "--seq-len", "64"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("family,prefix", [("qwen3_moe", 0), ("deepseek_v3", 4), ("gpt_oss", 6), ("qwen2_moe", 3)])
def test_resident_evaluation_equals_the_offloaded_one(family, prefix):
    """The whole-model evaluation (the path for models spread over several GPUs) computes
    what the offloaded runtime computes, exact and speculative."""
    from runtime.evaluate import evaluate, evaluate_resident

    rows = torch.stack([SEQ, SEQ.flip(0)])
    offloaded = evaluate(runtime.parts_from_model(tiny_model(family), RuntimeConfig(device="cpu")),
                         RuntimeConfig(device="cpu"), ["current"], rows, prefix, progress=False)
    resident = evaluate_resident(tiny_model(family), RuntimeConfig(device="cpu"), ["current"], rows, prefix,
                                 progress=False)
    for mode in ("exact", "current"):
        a, b = offloaded["modes"][mode], resident["modes"][mode]
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-4)
        assert b["kl_from_exact"] == pytest.approx(a["kl_from_exact"], abs=1e-5)
        assert b["top1_agreement"] == a["top1_agreement"]
    assert resident["modes"]["current"]["hit_rate"] == pytest.approx(offloaded["modes"]["current"]["hit_rate"])
    assert resident["modes"]["current"]["perplexity_change"] != 0


def test_infer_eval_whole_model_gives_the_offloaded_table(tmp_path):
    from runtime.cli import main

    tables = {}
    for flag in ([], ["--whole-model"]):
        out = tmp_path / ("whole" if flag else "offloaded")
        assert main(["eval", "--device", "cpu", "--estimators", EST, "--modes", "hybrid", "--seq-len", "64",
                     "--max-tokens", "128", "--dtype", "fp32", "--out", str(out), "--quiet", *flag]) == 0
        tables[bool(flag)] = json.loads((out / "eval.json").read_text())["modes"]
    for mode in ("exact", "hybrid"):
        assert tables[True][mode]["perplexity"] == pytest.approx(tables[False][mode]["perplexity"], rel=1e-4)
