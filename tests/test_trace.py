"""The trace stage against independent references: the stock model's own modules,
brute-force recomputation, an uninterrupted run, and every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import TINY_FAMILIES, tiny_model
from tracing.cli import main as trace_main
from specmoe.families import detect_family
from specmoe.paths import DEMO_CORPUS_DIR, DEMO_MODEL_DIR, REPO_ROOT
from tracing import TraceReader

SEQ_LEN = 32


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """A few hundred lines of the demo corpus's train split as a plain .txt file."""
    import gzip

    path = tmp_path_factory.mktemp("data") / "sample.txt"
    with gzip.open(DEMO_CORPUS_DIR / "train.jsonl.gz", "rt") as f:
        texts = [json.loads(next(f))["text"] for _ in range(12)]
    path.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
    return path


def save_tiny(model_type: str, root: Path) -> Path:
    """A tiny random model of a family, saved like a hub checkout, with the demo tokenizer."""
    from transformers import AutoTokenizer

    out = root / model_type
    if not (out / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
        model = tiny_model(model_type, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                           experts_implementation="eager")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def run_cli(*args: str) -> int:
    return trace_main([str(a) for a in args])


# -- what is recorded equals what the model did -------------------------------------------------------

def _independent_reading(model, family, input_ids):
    """What the stock model really did, read by wrapping the experts' forward (not by hooks)."""
    seen = {}
    originals = {}
    for layer in family.spec(model.config).moe_layers:
        experts = family.experts(model, layer)
        originals[layer] = experts.forward

        def wrapped(*args, _layer=layer, _orig=experts.forward, **kwargs):
            import inspect
            bound = inspect.signature(_orig).bind(*args, **kwargs)
            hidden, ids, weights = list(bound.arguments.values())[:3]
            seen[_layer] = (hidden.clone(), ids.clone(), weights.clone())
            return _orig(*args, **kwargs)

        experts.forward = wrapped
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for layer, fwd in originals.items():
            family.experts(model, layer).forward = fwd
    return seen


@pytest.mark.parametrize("model_type", TINY_FAMILIES + ["demo"])
def test_trace_records_the_models_own_routing(model_type, models_dir, text_file, tmp_path):
    model_dir = DEMO_MODEL_DIR if model_type == "demo" else save_tiny(model_type, models_dir)
    out = tmp_path / "trace"
    assert run_cli("--model", model_dir, "--dataset", text_file, "--seq-len", SEQ_LEN, "--batch-size", 2,
                   "--max-tokens", 4 * SEQ_LEN, "--store-dtype", "fp32", "--out", out) == 0
    reader = TraceReader(out, verify=True)

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    family = detect_family(model)
    input_ids = reader.token_ids().view(-1, SEQ_LEN).long()
    seen = _independent_reading(model, family, input_ids)

    for layer in family.spec(model.config).moe_layers:
        rec = reader.layer(layer)
        hidden, ids, weights = seen[layer]
        assert torch.equal(rec["topk_ids"].long(), ids.long()), f"layer {layer}: recorded ids differ"
        torch.testing.assert_close(rec["topk_weights"], weights.float(), rtol=1e-6, atol=1e-6)
        # LN_moe(r_l) is the router input: apply the stock norm module to the stored residual
        norm = family.moe_norm(model, layer)
        with torch.no_grad():
            s = norm(rec["residual"])
        torch.testing.assert_close(s, hidden.reshape(s.shape), rtol=1e-5, atol=1e-5)
        # router logits: a plain matmul with the router's weight (and bias, where it has one)
        router = family.router(model, layer)
        bias = getattr(router, "bias", None)
        z = F.linear(s.float(), router.weight.float(), bias.float() if isinstance(bias, torch.Tensor) else None)
        torch.testing.assert_close(rec["router_logits"], z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_default_vectors_equal_brute_force(model_type, models_dir, text_file, tmp_path):
    model_dir = save_tiny(model_type, models_dir)
    out = tmp_path / "trace"
    assert run_cli("--model", model_dir, "--dataset", text_file, "--seq-len", SEQ_LEN, "--batch-size", 2,
                   "--max-tokens", 4 * SEQ_LEN, "--store-dtype", "fp32", "--out", out) == 0
    reader = TraceReader(out)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    family = detect_family(model)
    dv, counts = reader.default_vectors(), reader.expert_counts()
    for layer in reader.layers:
        rec = reader.layer(layer)
        with torch.no_grad():
            s = family.moe_norm(model, layer)(rec["residual"])
        experts = family.experts(model, layer)
        E = dv[layer].shape[0]
        for e in range(E):
            routed = (rec["topk_ids"] == e).any(dim=1).nonzero().flatten()
            assert counts[layer][e] == (rec["topk_ids"] == e).sum()
            if len(routed) == 0:
                assert torch.all(dv[layer][e] == 0)
                continue
            # brute force: the stock experts module, one token at a time, with weight 1 on expert e
            outs = []
            for t in routed.tolist():
                with torch.no_grad():
                    outs.append(experts(s[t:t + 1], torch.tensor([[e]]), torch.ones(1, 1)))
            torch.testing.assert_close(dv[layer][e], torch.cat(outs).mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_recorder_leaves_the_forward_bit_identical(model_type):
    """Tracing must not change what the model computes, and the default vectors must not
    depend on how the expert outputs were obtained: read off the forward pass (grouped
    rows sorted by expert, batched rows in token order) or from a second pass over the
    experts (the eager loop, or the tap turned off)."""
    import warnings

    from specmoe.models import LoadedModel
    from tracing.recorder import TraceRecorder

    input_ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    default_vectors = {}
    variants = (("grouped_mm", True, {"sorted"}), ("batched_mm", True, {"original"}),
                # the eager loop calls the gate per expert only in GPT-OSS
                ("eager", True, {"sorted", "second pass"}), ("grouped_mm", False, {"second pass"}))
    for implementation, tap, modes in variants:
        model = tiny_model(model_type, experts_implementation=implementation)
        family = detect_family(model)
        spec = family.spec(model.config)
        with torch.no_grad():
            stock = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        loaded = LoadedModel(model=model, tokenizer=None, family=family, spec=spec, model_id=model_type, revision=None)
        recorder = TraceRecorder(loaded, list(spec.moe_layers), torch.float32, stop_after_last_layer=False, tap=tap)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                traced = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        assert recorder.mode in modes, (implementation, recorder.mode)
        assert bool(caught) is (tap and recorder.mode == "second pass")  # a failed check says so
        for a, b in zip(stock.hidden_states, traced.hidden_states):
            assert torch.equal(a, b), f"{implementation}: tracing changed a layer's output"
        assert torch.equal(stock.logits, traced.logits)
        default_vectors[(implementation, tap)] = recorder.default_vectors()
        recorder.close()
        assert "_apply_gate" not in vars(family.experts(model, spec.moe_layers[0]))  # stock method restored
    reference = default_vectors[("grouped_mm", False)]
    for variant, dv in default_vectors.items():
        for key, value in reference.items():
            torch.testing.assert_close(dv[key], value, rtol=1e-4, atol=1e-5, msg=f"{variant} {key}")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_subsampled_default_vectors_agree_across_paths(model_type):
    """--default-vector-every N: the tapped sums pick the same (token, slot) rows as the second pass."""
    from specmoe.models import LoadedModel
    from tracing.recorder import TraceRecorder

    results = {}
    for tap in (True, False):
        model = tiny_model(model_type)
        family = detect_family(model)
        spec = family.spec(model.config)
        loaded = LoadedModel(model=model, tokenizer=None, family=family, spec=spec, model_id=model_type, revision=None)
        recorder = TraceRecorder(loaded, list(spec.moe_layers), torch.float32, default_vector_every=3, tap=tap)
        gen = torch.Generator().manual_seed(7)
        for _ in range(3):  # batches of 2 x 25 tokens: the every-3rd pattern crosses batch borders
            recorder.run_batch(torch.randint(3, 128, (2, 25), generator=gen))
        results[tap] = (recorder.mode, recorder.default_vectors())
        recorder.close()
    assert results[False][0] == "second pass" and results[True][0] == "sorted"
    for key, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], value, rtol=1e-4, atol=1e-5, msg=key)
    n = results[False][1][f"layers.{spec.moe_layers[0]}.default_vector_tokens"].sum()
    assert n == 3 * 50 // 3 * spec.top_k  # every third token of 150, k rows each


# -- reliability ---------------------------------------------------------------------------------------

def _shard_hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.glob("*.safetensors")) if p.name != "state.safetensors"}


def test_kill_and_resume_gives_identical_trace(models_dir, text_file, tmp_path):
    model_dir = save_tiny("qwen3_moe", models_dir)
    total_rows = 400  # long enough that the kill surely lands mid-run
    common = ["--model", model_dir, "--dataset", DEMO_CORPUS_DIR, "--seq-len", SEQ_LEN, "--batch-size", 2,
              "--shard-tokens", 4 * SEQ_LEN, "--max-tokens", total_rows * SEQ_LEN]
    whole = tmp_path / "whole"
    assert run_cli(*common, "--out", whole) == 0

    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tracing", *map(str, common), "--out", str(cut)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        manifest = cut / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text()).get("shards", [])) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(json.loads((cut / "manifest.json").read_text())["shards"])
    assert 2 <= done < total_rows // 4, "the kill must land mid-run"

    assert run_cli(*common, "--out", cut, "--resume") == 0
    assert _shard_hashes(cut) == _shard_hashes(whole)
    a, b = TraceReader(whole, verify=True), TraceReader(cut, verify=True)
    for layer in a.layers:
        assert torch.equal(a.default_vectors()[layer], b.default_vectors()[layer])
        assert torch.equal(a.expert_counts()[layer], b.expert_counts()[layer])


def test_resume_keeps_the_traces_own_shard_size(models_dir, text_file, tmp_path):
    """--resume without --shard-tokens goes on with the shard size the trace was begun with
    (the default may differ, e.g. after an upgrade), and leaves a complete trace as it is."""
    model_dir = save_tiny("qwen3_moe", models_dir)
    out = tmp_path / "trace"
    common = ["--model", model_dir, "--dataset", text_file, "--seq-len", SEQ_LEN, "--batch-size", 2,
              "--max-tokens", 8 * SEQ_LEN, "--out", out]
    assert run_cli(*common, "--shard-tokens", 2 * SEQ_LEN) == 0
    before = _shard_hashes(out)
    assert len([name for name in before if name.startswith("shard-")]) == 4
    assert run_cli(*common, "--resume") == 0
    assert _shard_hashes(out) == before


def test_second_pass_fallback_is_one_warning_line(models_dir, text_file, tmp_path, capsys, monkeypatch):
    """Where the tap cannot be used the trace still completes, says so in one line, and its
    default vectors equal those of a tapped trace."""
    from tracing.recorder import TraceRecorder

    model_dir = save_tiny("qwen3_moe", models_dir)
    common = ["--model", model_dir, "--dataset", text_file, "--seq-len", SEQ_LEN, "--batch-size", 2,
              "--max-tokens", 4 * SEQ_LEN, "--store-dtype", "fp32"]
    assert run_cli(*common, "--out", tmp_path / "tapped") == 0
    assert "default vectors from the experts' own pass (grouped)" in capsys.readouterr().out
    monkeypatch.setattr(TraceRecorder, "_tapped_sums", lambda *args, **kwargs: None)
    assert run_cli(*common, "--out", tmp_path / "fallback") == 0
    captured = capsys.readouterr()
    warnings_seen = [line for line in captured.err.splitlines() if line.startswith("trace: warning:")]
    assert len(warnings_seen) == 1 and "second pass" in warnings_seen[0]
    assert "default vectors from a second pass over the experts" in captured.out
    tapped, fallback = TraceReader(tmp_path / "tapped"), TraceReader(tmp_path / "fallback")
    for layer in tapped.layers:
        torch.testing.assert_close(tapped.default_vectors()[layer], fallback.default_vectors()[layer],
                                   rtol=1e-4, atol=1e-5)


def test_corrupted_shard_is_caught(models_dir, text_file, tmp_path, capsys):
    model_dir = save_tiny("qwen3_moe", models_dir)
    out = tmp_path / "trace"
    common = ["--model", model_dir, "--dataset", text_file, "--seq-len", SEQ_LEN, "--batch-size", 2,
              "--shard-tokens", 2 * SEQ_LEN, "--max-tokens", 8 * SEQ_LEN, "--out", out]
    assert run_cli(*common) == 0
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_cli(*common, "--resume") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trace:")]
    assert len(err) == 1 and "shard-00001.safetensors" in err[0]
    with pytest.raises(Exception, match="shard-00001"):
        TraceReader(out, verify=True)
    shard.write_bytes(bytes(data[:-100]))  # truncated: caught even without a checksum pass
    with pytest.raises(Exception, match="shard-00001"):
        TraceReader(out)


# -- bad input: one line on stderr, exit 2, nothing already written is lost ---------------------------

def _dense_model(root: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    out = root / "dense-llama"
    if not out.exists():
        tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2)).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def _refuse_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


@pytest.mark.parametrize("case", ["missing-model", "dense-model", "not-a-model-dir", "wrong-text-field",
                                  "empty-dataset", "missing-dataset", "seq-len-too-long", "bad-layers",
                                  "existing-trace", "no-disk-space", "negative-writer-threads",
                                  "max-tokens-zero", "max-tokens-negative", "max-tokens-below-a-row",
                                  "out-is-a-file", "out-is-a-model-dir", "missing-dataset-file-by-name"])
def test_bad_input_gives_one_line_and_exit_2(case, models_dir, text_file, tmp_path, capsys, monkeypatch):
    """Every check runs before the model is loaded; nothing already in --out is touched."""
    model = save_tiny("qwen3_moe", models_dir)
    args = {"--model": model, "--dataset": text_file, "--seq-len": SEQ_LEN, "--max-tokens": 2 * SEQ_LEN,
            "--out": tmp_path / "out"}
    expect = None
    if case == "missing-model":
        args["--model"], expect = tmp_path / "nope", "does not exist"
    elif case == "dense-model":
        args["--model"], expect = _dense_model(models_dir), "dense"
    elif case == "not-a-model-dir":
        args["--model"], expect = tmp_path, "config.json"
    elif case == "wrong-text-field":
        args["--text-field"], expect = "body", "no text field 'body'"
    elif case == "empty-dataset":
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        args["--dataset"], expect = empty, "empty"
    elif case == "missing-dataset":
        args["--dataset"], expect = tmp_path / "missing.txt", "does not exist"
    elif case == "seq-len-too-long":
        args["--seq-len"], args["--max-tokens"], expect = 100_000, 200_000, "context"
    elif case == "bad-layers":
        args["--layers"], expect = "0-1", "not MoE layers"
    elif case == "existing-trace":
        assert run_cli(*[x for kv in args.items() for x in kv]) == 0
        expect = "already holds a trace"
    elif case == "negative-writer-threads":
        args["--writer-threads"], expect = -1, "--writer-threads"
    elif case in ("max-tokens-zero", "max-tokens-negative"):
        args["--max-tokens"], expect = (0 if case == "max-tokens-zero" else -5), "--max-tokens must be positive"
    elif case == "max-tokens-below-a-row":
        args["--max-tokens"], expect = SEQ_LEN - 1, f"less than one row of --seq-len {SEQ_LEN}"
    elif case == "out-is-a-file":
        (tmp_path / "out").write_text("notes")
        expect = "is a file"
    elif case == "out-is-a-model-dir":
        shutil.copytree(model, tmp_path / "out")
        expect = "not a trace"
    elif case == "missing-dataset-file-by-name":
        monkeypatch.chdir(tmp_path)
        args["--dataset"], expect = "nope.jsonl", "dataset file nope.jsonl does not exist"
    elif case == "no-disk-space":
        import collections
        usage = collections.namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
        expect = "disk"
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*")} if (tmp_path / "out").exists() else {}
    capsys.readouterr()
    monkeypatch.setattr("tracing.cli.load_moe_model", _refuse_loading)
    assert run_cli(*[x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if line.startswith("trace:")]
    assert len(err) == 1 and expect.lower() in err[0].lower(), err
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*")} if (tmp_path / "out").exists() else {}
    assert after == before, "files in --out were touched"


def test_cli_error_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tracing", "--model", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("trace: error:")


def test_hub_lookups_fail_in_seconds_without_a_network(models_dir, text_file, tmp_path, capsys, monkeypatch):
    """No network: a hub model or dataset is one line naming HF_HUB_OFFLINE=1 within seconds,
    instead of half a minute of retries; with HF_HUB_OFFLINE=1 the same for what is not cached."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr("tracing.cli.load_moe_model", _refuse_loading)
    model = save_tiny("qwen3_moe", models_dir)
    cases = [("--model", "nobody/no-such-moe", "--dataset", text_file),
             ("--model", model, "--dataset", "nobody/no-such-corpus")]
    for args in cases:
        start = time.monotonic()
        assert run_cli(*args, "--out", tmp_path / "out") == 2
        assert time.monotonic() - start < 15
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trace:")]
        assert len(err) == 1 and "cannot be reached" in err[0] and "HF_HUB_OFFLINE=1" in err[0], err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_cli("--model", "nobody/no-such-moe", "--out", tmp_path / "out") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trace:")]
    assert len(err) == 1 and "nor in the local Hugging Face cache" in err[0] and "HF_HUB_OFFLINE=1" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_complete_trace_says_so_and_grows_with_its_shards_unchanged(models_dir, text_file, tmp_path, capsys):
    """--resume on a complete trace: nothing traced, and it says so; with a larger --max-tokens
    the trace grows, its shards stay byte for byte as they were, and it holds what a fresh trace
    of that length holds."""
    from tracing import TraceConfig, run_trace
    from tracing.cli import print_summary

    model = save_tiny("qwen3_moe", models_dir)
    out = tmp_path / "trace"
    common = ["--model", model, "--dataset", text_file, "--seq-len", SEQ_LEN, "--batch-size", 2,
              "--shard-tokens", 2 * SEQ_LEN, "--store-dtype", "fp32"]
    # the Python entry point takes the same settings as a dataclass
    config = TraceConfig(model=str(model), dataset=str(text_file), seq_len=SEQ_LEN, batch_size=2,
                         shard_tokens=2 * SEQ_LEN, store_dtype="fp32", max_tokens=5 * SEQ_LEN, out=out)
    print_summary(run_trace(config))
    assert [e["sequences"] for e in json.loads((out / "manifest.json").read_text())["shards"]] == [2, 2, 1]
    before = _shard_hashes(out)
    capsys.readouterr()

    assert run_cli(*common, "--max-tokens", 5 * SEQ_LEN, "--out", out, "--resume") == 0
    said = capsys.readouterr().out
    assert "already holds the complete trace" in said and "nothing traced" in said and "traced 160" not in said
    assert _shard_hashes(out) == before

    assert run_cli(*common, "--max-tokens", 3 * SEQ_LEN, "--out", out, "--resume") == 2  # never shrinks
    assert "does not shrink" in capsys.readouterr().err

    assert run_cli(*common, "--max-tokens", 8 * SEQ_LEN, "--out", out, "--resume") == 0
    assert f"traced {3 * SEQ_LEN:,} more tokens" in capsys.readouterr().out
    after = _shard_hashes(out)
    for name, digest in before.items():
        if name.startswith("shard-"):
            assert after[name] == digest, f"{name} changed"
    grown = TraceReader(out, verify=True)
    assert grown.complete and grown.num_sequences == 8
    assert [e["sequences"] for e in grown.manifest["shards"]] == [2, 2, 1, 2, 1]
    assert grown.manifest["dataset"]["max_tokens"] == 8 * SEQ_LEN

    assert run_cli(*common, "--max-tokens", 8 * SEQ_LEN, "--out", tmp_path / "fresh") == 0
    fresh = TraceReader(tmp_path / "fresh")
    assert torch.equal(grown.token_ids(), fresh.token_ids())
    for layer in fresh.layers:  # batches differ where the trace grew: equal up to float rounding
        for field, value in fresh.layer(layer).items():
            torch.testing.assert_close(grown.layer(layer)[field], value, rtol=1e-5, atol=1e-5,
                                       msg=f"{layer} {field}")
        assert torch.equal(grown.expert_counts()[layer], fresh.expert_counts()[layer])
        torch.testing.assert_close(grown.default_vectors()[layer], fresh.default_vectors()[layer],
                                   rtol=1e-5, atol=1e-6)


def test_inspect_shows_a_trace_and_refuses_a_damaged_one(models_dir, text_file, tmp_path, capsys):
    model = save_tiny("qwen3_moe", models_dir)
    out = tmp_path / "trace"
    assert run_cli("--model", model, "--dataset", text_file, "--seq-len", SEQ_LEN, "--batch-size", 2,
                   "--shard-tokens", 2 * SEQ_LEN, "--max-tokens", 4 * SEQ_LEN, "--out", out) == 0
    capsys.readouterr()
    assert run_cli("inspect", out, "--verify") == 0
    shown = capsys.readouterr().out
    reader = TraceReader(out)
    for text in (": complete", "qwen3_moe", "checksums    verified",
                 f"tokens       {4 * SEQ_LEN:,} in 4 sequences of {SEQ_LEN}", "shards       2,",
                 f"layers       {reader.layers[0]}-{reader.layers[-1]}", "expert load per layer"):
        assert text in shown, text
    assert len([line for line in shown.splitlines() if line.split()[:1] in ([str(l)] for l in reader.layers)]) \
        == len(reader.layers)
    assert run_cli("inspect", out, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 4 * SEQ_LEN and summary["complete"] and summary["shards"] == 2

    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    for args, expect in (((out, "--verify"), "shard-00001.safetensors"), ((model,), "manifest.json is missing"),
                         ((tmp_path / "nowhere",), "does not exist")):
        assert run_cli("inspect", *args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("trace inspect: error:") and expect in err[0], err


def test_help_shows_every_default_once(capsys):
    with pytest.raises(SystemExit) as exit_:
        trace_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out.split("options:", 1)[1].split("\n\n", 1)[0]
    blocks: dict[str, str] = {}
    for line in text.strip("\n").splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        else:
            blocks[name] += " " + line.strip()
    blocks.pop("-h")
    assert blocks.pop("--out").count("(required)") == 1
    assert len(blocks) >= 18
    for name, block in blocks.items():
        assert block.count("(default:") == 1, (name, block)
    assert "(default: train)" in blocks["--split"] and "(default: text)" in blocks["--text-field"]
    assert "(default: 256)" in blocks["--seq-len"] and "(default: the bundled demo corpus)" in blocks["--dataset"]


def test_settings_come_from_yaml_and_flags_override_them(tmp_path, capsys):
    from tracing import TraceConfig, load_trace_config
    from tracing.config import DEFAULT_CONFIG_PATH

    assert load_trace_config(DEFAULT_CONFIG_PATH) == TraceConfig()  # the shipped file states the defaults
    cfg = tmp_path / "trace.yaml"
    cfg.write_text("seq_len: 64\nmax_tokens: 1024\nfsync: false\n")
    loaded = load_trace_config(cfg, max_tokens=2048)
    assert (loaded.seq_len, loaded.max_tokens, loaded.fsync) == (64, 2048, False)
    for text, expect in (("seq_len: 64\nbogus: 1\n", "unknown setting(s) bogus"),
                         ("seq_len: long\n", "seq_len must be int"),
                         ("fsync: 3\n", "fsync must be bool"),
                         ("max_tokens: 10\n", "--max-tokens 10 is less than one row"),
                         ("- a list\n", "must be a mapping")):
        cfg.write_text(text)
        assert run_cli("--config", cfg, "--out", tmp_path / "out") == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trace:")]
        assert len(err) == 1 and expect in err[0], (text, err)
    cfg.write_text("max_tokens: 10\n")  # the flag wins over the file: the error is now the flag's
    assert run_cli("--config", cfg, "--max-tokens", 0, "--out", tmp_path / "out") == 2
    assert "--max-tokens must be positive" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_model_report_headers_line_up_with_their_columns():
    from tracing.model_report import format_report

    layer = {"load_entropy": 0.95, "top16_share": 0.3, "uniform_top_share": 0.125, "max_share": 0.11,
             "min_share": 0.0, "unused_experts": 2, "random_router_perplexity": 15.2, "random_router_rise": 0.2}
    report = {"model": "m", "family": "qwen3_moe", "eval_tokens": 16384, "perplexity": 12.3,
              "layers": {0: layer, 11: {**layer, "random_router_rise": 1000.0, "random_router_perplexity": 12345.6}}}
    table = format_report(report).splitlines()[2:-1]
    assert len({len(line) for line in table}) == 1
    header = table[0]
    # each header ends where its column ends: right-aligned cells end under the header's last letter
    ends = [i + 1 for i, ch in enumerate(header) if ch != " " and (i + 1 == len(header) or header[i + 1] == " ")]
    for row in table[1:]:
        cells_end = [i + 1 for i, ch in enumerate(row) if ch != " " and (i + 1 == len(row) or row[i + 1] == " ")]
        assert set(cells_end) <= set(ends), (header, row)
        assert len(cells_end) == 7
