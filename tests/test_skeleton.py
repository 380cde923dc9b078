"""load_skeleton: the model without its routed experts, checked against transformers'
from_pretrained for every family; experts="modules" must give the same logits."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from specmoe.errors import SpecmoeError
from specmoe.paths import DEMO_MODEL_DIR
from specmoe.skeleton import load_skeleton
from tiny_checkpoints import save_layout, shared_checkpoints
from tiny_models import TINY_FAMILIES, tiny_model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return shared_checkpoints(tmp_path_factory)


def _tokens(n=1, t=10, vocab=128):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def _expert_names(family, spec):
    return {f"{family.module_paths(l)['experts']}.{n}" for l in spec.moe_layers for n in family.expert_params}


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_whole_model_gives_the_stock_logits(ckpts, model_type):
    """Published layout (GPT-OSS: as saved; its MXFP4 is test_mxfp4_whole_model); the
    reader tests show every layout gives the same experts."""
    stock = ckpts.stock(model_type)
    layout = "saved" if model_type == "gpt_oss" else "published"
    skel = load_skeleton(ckpts.dir(model_type, layout, 1), experts="modules")
    assert skel.tokenizer is None and skel.dtype == torch.float32 and skel.family.name == model_type
    assert not skel.model.training
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(skel.model(ids).logits, stock(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_without_experts_everything_else_is_stock(ckpts, model_type):
    stock = ckpts.stock(model_type)
    skel = load_skeleton(ckpts.dir(model_type, "published", 3))
    experts = _expert_names(skel.family, skel.spec)
    mine = {**dict(skel.model.named_parameters()), **dict(skel.model.named_buffers())}
    theirs = {**dict(stock.named_parameters()), **dict(stock.named_buffers())}
    assert set(mine) == set(theirs)
    for name, t in mine.items():
        if name in experts:
            assert t.is_meta and t.shape == theirs[name].shape and t.dtype == theirs[name].dtype, name
        else:
            assert not t.is_meta and t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), name
    assert not any(p.requires_grad for p in skel.model.parameters())
    # The runtime's expert source: the reader stays open on the same files.
    if skel.reader.layout == "mxfp4":
        return
    layer = skel.spec.moe_layers[0]
    got = skel.reader.expert(layer, 1)
    want = skel.family.expert_tensors(skel.family.experts(stock, layer), 1)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("model_type,layout", [("deepseek_v3", "saved"), ("gpt_oss", "saved"),
                                               ("qwen2_moe", "published")])
def test_auto_keeps_a_bf16_checkpoint_bf16_on_cpu(ckpts, model_type, layout, tmp_path):
    """Same dtypes as from_pretrained(dtype="auto"), including the tensors transformers
    keeps in float32 (DeepSeek-V3's router), and the same values."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type).to(torch.bfloat16)
    directory = save_layout(model, tmp_path / "bf16", layout, shards=3)
    stock = AutoModelForCausalLM.from_pretrained(directory, dtype="auto").eval()
    skel = load_skeleton(directory, experts="modules")
    assert skel.dtype == torch.bfloat16 and skel.reader.dtype == torch.bfloat16
    mine = {**dict(skel.model.named_parameters()), **dict(skel.model.named_buffers())}
    theirs = {**dict(stock.named_parameters()), **dict(stock.named_buffers())}
    assert {k: v.dtype for k, v in mine.items()} == {k: v.dtype for k, v in theirs.items()}
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(skel.model(ids).logits, stock(ids).logits, rtol=0, atol=0)


def test_explicit_dtype_and_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("olmoe", tie_word_embeddings=True)
    directory = save_layout(model, tmp_path / "tied", "saved")
    stock = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    skel = load_skeleton(directory, experts="modules", dtype="fp32")
    head = skel.model.get_output_embeddings().weight
    assert head is skel.model.get_input_embeddings().weight and not head.is_meta
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(skel.model(ids).logits, stock(ids).logits, rtol=1e-6, atol=1e-6)
    half = load_skeleton(directory, dtype="bf16")
    assert half.dtype == torch.bfloat16
    assert half.model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_mxfp4_whole_model(ckpts):
    """GPT-OSS published in MXFP4: experts dequantised on load, as the stock model with the
    reference dequantiser's experts computes."""
    import copy

    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from tiny_checkpoints import published_state_dict

    directory = ckpts.dir("gpt_oss", "published", 1)
    skel = load_skeleton(directory, experts="modules")
    assert skel.reader.layout == "mxfp4" and skel.dtype == torch.float32
    stock = copy.deepcopy(ckpts.stock("gpt_oss"))
    packed = published_state_dict(ckpts.model("gpt_oss"))
    with torch.no_grad():
        for layer in skel.spec.moe_layers:
            experts = skel.family.experts(stock, layer)
            for name in ("gate_up_proj", "down_proj"):
                key = f"model.layers.{layer}.mlp.experts.{name}"
                getattr(experts, name).copy_(convert_moe_packed_tensors(packed[key + "_blocks"], packed[key + "_scales"],
                                                                        dtype=torch.float32))
        ids = _tokens()
        torch.testing.assert_close(skel.model(ids).logits, stock(ids).logits, rtol=1e-6, atol=1e-6)


def test_demo_model_with_tokenizer():
    from specmoe.models import load_moe_model

    skel = load_skeleton(DEMO_MODEL_DIR, experts="modules")
    assert skel.tokenizer is not None and skel.dtype == torch.bfloat16
    stock = load_moe_model(DEMO_MODEL_DIR, dtype="bf16").model
    ids = torch.tensor([skel.tokenizer("To be, or not to be")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(skel.model(ids).logits, stock(ids).logits, rtol=0, atol=0)


def test_bad_arguments(ckpts):
    directory = ckpts.dir("qwen3_moe", "fused", 1)
    with pytest.raises(SpecmoeError, match="experts="):
        load_skeleton(directory, experts="all")
    with pytest.raises(SpecmoeError, match="unknown dtype"):
        load_skeleton(directory, dtype="fp8")
    with pytest.raises(SpecmoeError, match="unknown device"):
        load_skeleton(directory, device="gpu0")


def test_misshaped_non_expert_tensor(ckpts, tmp_path):
    from tiny_checkpoints import write_safetensors

    model = ckpts.model("mixtral")
    directory = tmp_path / "bad"
    model.config.save_pretrained(directory)
    state = dict(model.state_dict())
    state["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(64, 60)
    write_safetensors(directory, state)
    with pytest.raises(SpecmoeError) as err:
        load_skeleton(directory)
    assert "model.layers.1.self_attn.o_proj.weight" in str(err.value) and "model.safetensors" in str(err.value)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _peak_growth(load) -> int:
    """How far resident memory (file pages included) rose above its level before `load()`."""
    gc.collect()
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    kept = load()
    growth = _status_bytes("VmHWM") - base
    del kept
    return growth


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_peak_host_memory_leaves_out_the_experts(tmp_path):
    """Experts are nearly all of this model's bytes; loading without them must not come
    near them."""
    from transformers import AutoModelForCausalLM

    from tiny_checkpoints import write_safetensors
    from tiny_models import tiny_config

    config = tiny_config("qwen3_moe", moe_intermediate_size=1024, num_experts=64, num_hidden_layers=2,
                         mlp_only_layers=[])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    expert_bytes = sum(s.numel() * 4 for k, s in shapes.items() if ".experts." in k)
    non_expert = sum(s.numel() * 4 for k, s in shapes.items()) - expert_bytes
    assert expert_bytes > 100e6 and non_expert < 1e6
    config.save_pretrained(tmp_path)
    write_safetensors(tmp_path, {k: torch.full(s, 0.01) for k, s in shapes.items()})
    load_skeleton(tmp_path)  # imports and lazy initialisation are not what is measured
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine OpenMP copies crawl; memory is what is measured
    try:
        without = _peak_growth(lambda: load_skeleton(tmp_path))
        whole = _peak_growth(lambda: load_skeleton(tmp_path, experts="modules"))
    finally:
        torch.set_num_threads(threads)
    assert without < non_expert + 0.1 * expert_bytes, (without, expert_bytes)
    assert whole > 0.9 * expert_bytes, (whole, expert_bytes)  # the measurement does see experts when they load
