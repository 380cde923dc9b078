"""The bundled demo model and corpus, loaded the way users load them, offline."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeForCausalLM

from specmoe.corpus import load_text_dataset
from specmoe.families import detect_family
from specmoe.paths import DEMO_CORPUS_DIR, DEMO_MODEL_DIR


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


def test_demo_model_is_the_promised_moe(model, tokenizer):
    assert isinstance(model, Qwen3MoeForCausalLM)
    spec = detect_family(model).spec(model.config)
    assert len(spec.moe_layers) >= 12 and spec.num_experts >= 32 and spec.top_k >= 4
    assert tokenizer.is_fast and tokenizer.eos_token is not None
    files = [p for p in DEMO_MODEL_DIR.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 24 * 2**20
    assert any(p.suffix == ".safetensors" for p in files)


def test_demo_model_generates_text(model, tokenizer):
    prompt = tokenizer("To be, or not to be", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 12
    text = tokenizer.decode(out[0][prompt["input_ids"].shape[1]:])
    assert text.strip(), "generation produced no text"
    # byte-level BPE round-trips arbitrary text exactly
    sample = "Thou art more lovely and more temperate: 1611 A.D. \u00e6\u00f8"
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample


def test_demo_model_has_learned_the_corpus(model, tokenizer):
    """Held-out perplexity far below a uniform guess: the weights are trained, not random."""
    texts = load_text_dataset(None, "test")["text"][:4]
    ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][:, :512]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.exp(loss) < 100 < len(tokenizer)


def test_corpus_loads_through_datasets_with_disjoint_splits():
    corpus = datasets.load_dataset(str(DEMO_CORPUS_DIR))
    assert set(corpus) == {"train", "validation", "test"}
    texts = {split: set(corpus[split]["text"]) for split in corpus}
    assert all(len(t) > 100 for t in texts.values())
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    keys = {split: set(zip(corpus[split]["work"], corpus[split]["passage"])) for split in corpus}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    # the three sources are all present in the training split
    works = {w.split("/")[0] for w in corpus["train"]["work"]}
    assert works == {"shakespeare", "milton", "kjv"}
