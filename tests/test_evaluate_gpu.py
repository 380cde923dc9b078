"""`infer eval` on GPUs: the same table as on the CPU, and a whole model spread over
several GPUs (device_map) scores what one device scores."""

from __future__ import annotations

import json

import pytest
import torch

from specmoe.paths import REPO_ROOT

pytestmark = pytest.mark.gpu

EST = str(REPO_ROOT / "checkpoints" / "demo-estimator-h1")
ARGS = ["eval", "--estimators", EST, "--modes", "quasi,hybrid", "--seq-len", "64", "--max-tokens", "256",
        "--dtype", "fp32", "--quiet"]


def table(tmp_path, name, *argv):
    from runtime.cli import main

    out = tmp_path / name
    assert main(ARGS + ["--out", str(out), *argv]) == 0
    return json.loads((out / "eval.json").read_text())


def assert_same_table(a, b):
    assert a["modes"].keys() == b["modes"].keys()
    for mode, want in a["modes"].items():
        got = b["modes"][mode]
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-3), mode
        assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=0.01), mode
        if want.get("hit_rate") is not None:
            assert got["hit_rate"] == pytest.approx(want["hit_rate"], abs=0.01), mode


def test_infer_eval_on_cuda_gives_the_cpu_table(tmp_path):
    cpu = table(tmp_path, "cpu", "--device", "cpu")
    gpu = table(tmp_path, "gpu", "--device", "cuda")
    assert_same_table(cpu, gpu)
    assert gpu["modes"]["hybrid"]["perplexity_change"] != 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_whole_model_spread_over_gpus_gives_the_offloaded_table(tmp_path):
    offloaded = table(tmp_path, "offloaded", "--device", "cpu")
    spread = table(tmp_path, "spread", "--device", "auto", "--whole-model")
    assert len([d for d in spread["devices"] if d.startswith("cuda")]) >= 2, spread["devices"]
    assert_same_table(offloaded, spread)
