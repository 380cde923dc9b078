"""CheckpointReader: experts and everything else straight from safetensors files, checked
against what transformers loads, for every family in every layout it can be stored in."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specmoe.checkpoint_reader import CheckpointReader, dequantize_mxfp4
from specmoe.errors import CorruptFileError, SpecmoeError, UnsupportedModelError
from specmoe.families import detect_family, router_fingerprint
from tiny_checkpoints import VARIANTS, shared_checkpoints, write_safetensors
from tiny_models import TINY_FAMILIES, tiny_config

CASES = [(mt, layout, shards) for mt in TINY_FAMILIES for layout, shards in VARIANTS]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return shared_checkpoints(tmp_path_factory)


def _reference_experts(ckpts, model_type, layout, shards, layer):
    """{name: [E, ...]} as the reader must give them: the stock model's, or for MXFP4 the
    stock transformers dequantiser's reading of the very blocks on disk."""
    family = detect_family(ckpts.stock(model_type))
    experts = family.experts(ckpts.stock(model_type), layer)
    ref = {n: getattr(experts, n).detach() for n in family.expert_params}
    if model_type == "gpt_oss" and layout == "published":
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        directory = ckpts.dir(model_type, layout, shards)
        index = directory / "model.safetensors.index.json"
        where = json.loads(index.read_text())["weight_map"] if index.exists() else None
        for name in ("gate_up_proj", "down_proj"):
            parts = []
            for part in ("_blocks", "_scales"):
                key = f"model.layers.{layer}.mlp.experts.{name}{part}"
                with safe_open(str(directory / (where[key] if where else "model.safetensors")), "pt") as f:
                    parts.append(f.get_tensor(key))
            # Already [E, in, out]: the reference dequantiser transposes into the in-memory layout.
            ref[name] = convert_moe_packed_tensors(*parts, dtype=torch.float32)
    return ref


@pytest.mark.parametrize("model_type,layout,shards", CASES)
def test_experts_match_transformers(ckpts, model_type, layout, shards):
    reader = CheckpointReader(ckpts.dir(model_type, layout, shards))
    family, spec = reader.family, reader.spec
    assert family.name == model_type
    expected_layout = {"published": "mxfp4" if model_type == "gpt_oss" else "per_expert", "fused": "fused"}
    assert reader.layout == expected_layout.get(layout, reader.layout)
    assert reader.dtype == torch.float32
    shapes = reader.expert_shapes()
    assert shapes == {n: tuple(t.shape) for n, t in family.expert_tensors(family.experts(ckpts.stock(model_type),
                                                                                          spec.moe_layers[0]), 0).items()}
    assert reader.expert_nbytes(torch.bfloat16) == sum(torch.Size(s).numel() for s in shapes.values()) * 2
    for layer in spec.moe_layers:
        ref = _reference_experts(ckpts, model_type, layout, shards, layer)
        for e in range(spec.num_experts):
            got = reader.expert(layer, e)
            assert set(got) == set(family.expert_params)
            for name in family.expert_params:
                assert torch.equal(got[name], ref[name][e]), (layer, e, name)

    # Into preallocated views of one flat buffer, converting on the way: no new tensors.
    layer, e = spec.moe_layers[-1], spec.num_experts - 1
    flat = torch.zeros(sum(torch.Size(s).numel() for s in shapes.values()), dtype=torch.bfloat16)
    views, at = {}, 0
    for name, shape in shapes.items():
        views[name] = flat[at:at + torch.Size(shape).numel()].view(shape)
        at += torch.Size(shape).numel()
    out = reader.expert(layer, e, out=views)
    assert out is views
    ref = _reference_experts(ckpts, model_type, layout, shards, layer)
    for name in shapes:
        assert views[name].data_ptr() == out[name].data_ptr()
        assert torch.equal(out[name], ref[name][e].to(torch.bfloat16))
    assert all(torch.equal(t, ref[n][e].to(torch.bfloat16))
               for n, t in reader.expert(layer, e, dtype=torch.bfloat16).items())


@pytest.mark.parametrize("model_type,layout,shards", CASES)
def test_non_experts_and_fingerprint_match_transformers(ckpts, model_type, layout, shards):
    reader = CheckpointReader(ckpts.dir(model_type, layout, shards))
    stock = ckpts.stock(model_type)
    family = reader.family
    expert_names = {f"{family.module_paths(l)['experts']}.{n}" for l in reader.spec.moe_layers
                    for n in family.expert_params}
    want = {k: v for k, v in stock.state_dict().items() if k not in expert_names}
    got = reader.non_expert_state_dict()
    assert set(got) == set(want)
    for name, t in got.items():
        assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name
    assert reader.router_fingerprint() == router_fingerprint(stock)
    half = dict(reader.iter_non_expert(dtype=torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in half.values() if t.is_floating_point())


@pytest.mark.parametrize("model_type", [mt for mt in TINY_FAMILIES if mt != "gpt_oss"])
def test_published_layout_is_what_transformers_reads(ckpts, model_type):
    """The test's own per-expert writer agrees with transformers' loader (its conversion
    mapping turns the published keys into the fused in-memory parameters)."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(ckpts.dir(model_type, "published", 1), dtype=torch.float32)
    want = ckpts.model(model_type).state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mxfp4_dequantisation_matches_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=gen, dtype=torch.uint8)
    low = 112 if dtype == torch.float16 else 90   # keeps fp16 away from its overflow, as a real model is
    scales = torch.randint(low, 140, (3, 10, 4), generator=gen, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)          # [3, 128, 10]
    ours = dequantize_mxfp4(blocks, scales, dtype)                          # [3, 10, 128]
    assert ours.dtype == dtype
    assert torch.equal(ours.transpose(1, 2), ref)


def test_mxfp4_checkpoint_is_bf16_with_bf16_tensors(tmp_path, ckpts):
    import copy

    from tiny_checkpoints import save_layout

    model = copy.deepcopy(ckpts.model("gpt_oss")).to(torch.bfloat16)
    directory = save_layout(model, tmp_path / "bf16", "published")
    reader = CheckpointReader(directory)
    assert (reader.layout, reader.dtype) == ("mxfp4", torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in reader.expert(0, 0).values())


# --------------------------------------------------------------------------- errors


def _copy(ckpts, tmp_path, model_type="qwen3_moe", layout="published", shards=1):
    target = tmp_path / "model"
    shutil.copytree(ckpts.dir(model_type, layout, shards), target)
    return target


def _rewrite(path, change):
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_expert_tensor_names_key_and_file(ckpts, tmp_path):
    directory = _copy(ckpts, tmp_path)
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    _rewrite(directory / "model.safetensors", lambda t: t.pop(key))
    with pytest.raises(SpecmoeError) as err:
        CheckpointReader(directory)
    assert key in _one_line(err) and "model.safetensors" in _one_line(err)


def test_misshaped_expert_tensor_names_key_and_file(ckpts, tmp_path):
    directory = _copy(ckpts, tmp_path)
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    _rewrite(directory / "model.safetensors", lambda t: t.update({key: t[key][:, :-1].contiguous()}))
    with pytest.raises(SpecmoeError) as err:
        CheckpointReader(directory)
    assert key in _one_line(err) and "model.safetensors" in _one_line(err) and "[64, 31]" in _one_line(err)


def test_index_pointing_at_a_shard_without_the_tensor(ckpts, tmp_path):
    directory = _copy(ckpts, tmp_path, shards=3)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.gate.weight"
    shard = index["weight_map"][key]
    _rewrite(directory / shard, lambda t: t.pop(key))
    with pytest.raises(SpecmoeError) as err:
        CheckpointReader(directory)
    assert key in _one_line(err) and shard in _one_line(err)


def test_missing_router_is_one_line_at_fingerprint(ckpts, tmp_path):
    directory = _copy(ckpts, tmp_path)
    _rewrite(directory / "model.safetensors", lambda t: t.pop("model.layers.2.mlp.gate.weight"))
    reader = CheckpointReader(directory)
    with pytest.raises(SpecmoeError) as err:
        reader.router_fingerprint()
    assert "model.layers.2.mlp.gate.weight" in _one_line(err) and "model.safetensors" in _one_line(err)


@pytest.mark.parametrize("damage", ["truncated", "bad header"])
def test_corrupt_file_is_one_line(ckpts, tmp_path, damage):
    directory = _copy(ckpts, tmp_path, shards=3)
    shard = directory / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100] if damage == "truncated" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(CorruptFileError) as err:
        CheckpointReader(directory)
    assert shard.name in _one_line(err)


def test_directory_without_safetensors(ckpts, tmp_path):
    directory = tmp_path / "no-weights"
    ckpts.model("qwen3_moe").config.save_pretrained(directory)
    with pytest.raises(SpecmoeError) as err:
        CheckpointReader(directory)
    assert "no safetensors" in _one_line(err)


def test_dense_model_is_refused(tmp_path):
    directory = tmp_path / "dense"
    tiny_config("qwen3_moe", mlp_only_layers=[0, 1, 2]).save_pretrained(directory)
    write_safetensors(directory, {"lm_head.weight": torch.zeros(2, 2)})
    with pytest.raises(UnsupportedModelError):
        CheckpointReader(directory)


def test_bad_path_and_uncached_hub_id_fail_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(SpecmoeError) as err:
        CheckpointReader(tmp_path / "nope")
    assert "does not exist" in _one_line(err)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.monotonic()
    with pytest.raises(SpecmoeError) as err:
        CheckpointReader("specmoe-tests/not-cached-moe")
    assert time.monotonic() - start < 5
    assert "HF_HUB_OFFLINE=1" in _one_line(err) and "specmoe-tests/not-cached-moe" in _one_line(err)


def test_hub_id_found_in_the_cache(ckpts, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "cache" / "models--specmoe-tests--tiny-mixtral"
    shutil.copytree(ckpts.dir("mixtral", "published", 3), repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    reader = CheckpointReader("specmoe-tests/tiny-mixtral")
    assert reader.family.name == "mixtral" and reader.layout == "per_expert"
    assert reader.router_fingerprint() == router_fingerprint(ckpts.model("mixtral"))


def test_bad_expert_requests(ckpts):
    reader = CheckpointReader(ckpts.dir("qwen3_moe", "fused", 1))
    with pytest.raises(SpecmoeError, match="no routed experts"):
        reader.expert(0, 0)            # qwen3 tiny: layer 0 is dense
    with pytest.raises(SpecmoeError, match="out of range"):
        reader.expert(1, 8)
    with pytest.raises(SpecmoeError, match="must have shape"):
        reader.expert(1, 0, out={"gate_up_proj": torch.empty(3), "down_proj": torch.empty(3)})
