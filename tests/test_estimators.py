"""The estimators stage: predictors against an independent recomputation from the stock
model modules, distillation, the checkpoint format, and the `train` command end to end.

Traces are made with the real tracer on tiny models (and on the demo model when it is
checked out) saved into tmp dirs."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pytest
import torch

from estimators.checkpoint import load_estimator, read_config, router_fingerprint
from estimators.cli import TrainRun, main as train_main, run_train
from estimators.config import load_config
from estimators.data import PairBatches, Source, batch_source_state, make_loader, split_sequences
from estimators.predictors import Estimator, SourceState, collect_parts, layer_pairs
from tests.tiny_models import tiny_model
from tracing.cli import main as trace_main
from specmoe.errors import MismatchError, SpecmoeError
from specmoe.families import detect_family
from specmoe.paths import DEMO_CORPUS_DIR, DEMO_MODEL_DIR
from tracing import TraceReader

SEQ_LEN = 32
# SPECMOE_TEST_NO_DEMO=1 exercises the fallback (tiny model, tokenizer trained here) on a full checkout.
HAVE_DEMO = ((DEMO_MODEL_DIR / "config.json").is_file() and (DEMO_MODEL_DIR / "tokenizer.json").is_file()
             and not os.environ.get("SPECMOE_TEST_NO_DEMO"))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matrices only: one intra-op thread is as fast, and far faster when other jobs
    share the two CPU cores (OpenMP's spinning threads then stall each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("est")


@pytest.fixture(scope="module")
def text_file(root) -> Path:
    """English text (the demo corpus's validation split) or, without it, seeded pseudo-text."""
    path = root / "sample.txt"
    corpus = DEMO_CORPUS_DIR / "validation.jsonl.gz"
    if corpus.is_file():
        with gzip.open(corpus, "rt") as f:
            lines = [json.loads(line)["text"].replace("\n", " ") for _, line in zip(range(300), f)]
    else:
        rng = random.Random(0)
        words = ["".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 8))) for _ in range(300)]
        lines = [" ".join(rng.choices(words, weights=[1 / (i + 1) for i in range(300)], k=12)) + "."
                 for _ in range(3000)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(root, text_file) -> Path:
    """The demo tokenizer, or a tiny byte-level BPE trained here."""
    if HAVE_DEMO:
        return DEMO_MODEL_DIR
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text_file.read_text().splitlines(), trainer)
    out = root / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def save_tiny(root: Path, tokenizer_dir: Path, name: str, model_type: str, seed: int = 0, **overrides) -> Path:
    from transformers import AutoTokenizer

    out = root / name
    if not (out / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = tiny_model(model_type, seed=seed, vocab_size=len(tok), eos_token_id=tok.eos_token_id, **overrides)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def make_trace(model_dir: Path, out: Path, text: Path, tokens: int, store_dtype: str = "bf16",
               seq_len: int = SEQ_LEN) -> Path:
    if not (out / "manifest.json").exists():
        rc = trace_main(["--model", str(model_dir), "--dataset", str(text), "--max-tokens", str(tokens),
                         "--seq-len", str(seq_len), "--batch-size", "16", "--shard-tokens", str(16 * seq_len),
                         "--store-dtype", store_dtype, "--out", str(out)])
        assert rc == 0
    return out


QWEN3_4 = dict(num_hidden_layers=4, mlp_only_layers=[])   # 4 MoE layers: pairs (0,1) (1,2) (2,3)


@pytest.fixture(scope="module")
def tiny_q3(root, tokenizer_dir) -> Path:
    return save_tiny(root, tokenizer_dir, "q3", "qwen3_moe", 0, **QWEN3_4)


@pytest.fixture(scope="module")
def tiny_q3_other(root, tokenizer_dir) -> Path:
    """Same shapes as tiny_q3, other weights."""
    return save_tiny(root, tokenizer_dir, "q3-other", "qwen3_moe", 1, **QWEN3_4)


@pytest.fixture(scope="module")
def tiny_trace(root, tiny_q3, text_file) -> Path:
    return make_trace(tiny_q3, root / "trace-q3", text_file, 2048)


@pytest.fixture(scope="module")
def tiny_eval_trace(root, tiny_q3, text_file) -> Path:
    return make_trace(tiny_q3, root / "trace-q3-eval", text_file, 512, seq_len=64)


def write_config(path: Path, **values) -> Path:
    import yaml

    base = dict(batch_size=256, eval_batch_size=1024, lr=3e-3, warmup_steps=2, patience=5, max_epochs=20,
                device="cpu", buffer_mb=64)
    base.update(values)
    path.write_text(yaml.safe_dump(base))
    return path


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# --------------------------------------------- predictions vs an independent recomputation


def _hf_reference(model, token_ids: torch.Tensor, pairs, default_vectors, shared: bool = False):
    """Straight from the stock modules: hook r_l and the true routing, build d_l with a python
    loop over the routed experts, apply the target layer's post_attention_layernorm and the
    router weight by hand; the family's route picks the ids."""
    layers = model.model.layers
    captured: dict = {}
    handles = []
    for l in {l for p in pairs for l in p}:
        handles.append(layers[l].post_attention_layernorm.register_forward_pre_hook(
            lambda mod, args, l=l: captured.__setitem__(("r", l), args[0].reshape(-1, args[0].shape[-1]).clone())))
        handles.append(layers[l].mlp.gate.register_forward_hook(
            lambda mod, args, out, l=l: captured.__setitem__(("route", l), (out[2].clone(), out[1].clone()))))
    with torch.no_grad():
        model(input_ids=token_ids[None], use_cache=False)
    for h in handles:
        h.remove()
    family = detect_family(model)
    ref = {}
    with torch.no_grad():
        for s, t in pairs:
            r = captured[("r", s)]
            ids, weights = captured[("route", s)]
            d = torch.zeros_like(r)
            for n in range(r.shape[0]):
                for j in range(ids.shape[1]):
                    d[n] += weights[n, j] * default_vectors[s][int(ids[n, j])]
            x = r + d
            s_l = layers[s].post_attention_layernorm(r)
            if shared:
                mlp = layers[s].mlp
                x = x + torch.sigmoid(mlp.shared_expert_gate(s_l)) * mlp.shared_expert(s_l)
            q = layers[t].post_attention_layernorm(x)
            W = layers[t].mlp.gate.weight
            gate = layers[t].mlp.gate
            quasi_logits, current_logits = q @ W.T, s_l @ W.T
            ref[t] = {"quasi": (quasi_logits, family.route(gate, quasi_logits)[0]),
                      "current": (current_logits, family.route(gate, current_logits)[0]),
                      "r": r, "ids": ids}
    return ref


@pytest.mark.parametrize("model_type, overrides, shared", [
    ("qwen3_moe", QWEN3_4, False),
    ("qwen2_moe", {}, True),      # MoE layers 1 and 3 only: lookahead 1 pairs decoder layers (1, 3)
])
def test_quasi_and_current_match_stock_modules(root, tokenizer_dir, text_file, model_type, overrides, shared):
    model_dir = save_tiny(root, tokenizer_dir, f"ref-{model_type}", model_type, 3, **overrides)
    trace = make_trace(model_dir, root / f"trace-ref-{model_type}", text_file, 2 * SEQ_LEN, store_dtype="fp32")
    model = load_model(model_dir)
    family = detect_family(model)
    spec = family.spec(model)
    reader = TraceReader(trace)
    pairs = layer_pairs(spec.moe_layers, reader.layers, 1)
    assert pairs == list(zip(spec.moe_layers[:-1], spec.moe_layers[1:]))
    dv = reader.default_vectors()
    est = Estimator(family, pairs=pairs, default_vectors=dv, parts=collect_parts(model, family, pairs, shared),
                    num_experts=spec.num_experts, top_k=spec.top_k, hidden_size=spec.hidden_size, lookahead=1,
                    width=4, add_shared=shared)
    ref = _hf_reference(model, reader.token_ids()[:SEQ_LEN].long(), pairs, dv, shared)
    batch = next(iter(make_loader(PairBatches([Source(str(trace))], pairs, SEQ_LEN))))
    for p, (_, t) in enumerate(pairs):
        state = batch_source_state(batch, p)
        torch.testing.assert_close(state.residual, ref[t]["r"], rtol=1e-5, atol=1e-5)   # the trace is the model
        assert torch.equal(state.ids.sort(-1).values, ref[t]["ids"].sort(-1).values)
        for kind in ("quasi", "current"):
            logits, ids = ref[t][kind]
            torch.testing.assert_close(est.logits(t, state, kind), logits, rtol=1e-4, atol=1e-4)
            mine = est.predictor(kind).predict_ids(t, state)
            assert torch.equal(mine.sort(-1).values, ids.sort(-1).values), (kind, t)
        # step 0: the learned predictor IS quasi (zero-initialised last layer)
        assert torch.equal(est.logits(t, state, "learned"), est.logits(t, state, "quasi"))
    if shared:
        # the shared-expert variant survives a checkpoint, also bound to a bf16 copy of the model
        from estimators.checkpoint import save_estimator

        est.meta.update(fingerprint=router_fingerprint(model), id=str(model_dir))
        save_estimator(est, root / "ckpt-shared")
        again = load_estimator(root / "ckpt-shared", model)
        low = load_estimator(root / "ckpt-shared", load_model(model_dir).to(torch.bfloat16))
        assert again.add_shared and low.add_shared
        for p, (_, t) in enumerate(pairs):
            state = batch_source_state(batch, p)
            assert torch.equal(again.logits(t, state, "quasi"), est.logits(t, state, "quasi"))
            torch.testing.assert_close(low.logits(t, state, "quasi"), est.logits(t, state, "quasi"),
                                       rtol=0.05, atol=0.05)


def test_one_token_at_a_time_matches_batch(tiny_trace, tiny_q3):
    model = load_model(tiny_q3)
    family = detect_family(model)
    spec = family.spec(model)
    reader = TraceReader(tiny_trace)
    pairs = layer_pairs(spec.moe_layers, reader.layers, 2)
    assert pairs == [(0, 2), (1, 3)]
    est = Estimator(family, pairs=pairs, default_vectors=reader.default_vectors(),
                    parts=collect_parts(model, family, pairs), num_experts=spec.num_experts, top_k=spec.top_k,
                    hidden_size=spec.hidden_size, lookahead=2, width=4)
    batch = next(iter(make_loader(PairBatches([Source(str(tiny_trace))], pairs, 16))))
    state = batch_source_state(batch, 1)
    whole = est.predict_ids(3, state, "quasi")
    for n in range(4):
        one = SourceState(residual=state.residual[n:n + 1], ids=state.ids[n:n + 1], weights=state.weights[n:n + 1])
        assert torch.equal(est.predict_ids(3, one, "quasi"), whole[n:n + 1])
    assert est.target_of(1) == 3 and est.target_of(3) is None and est.source_of(2) == 0


def test_previous_predictor_uses_the_previous_token(tiny_trace):
    reader = TraceReader(tiny_trace)
    pairs = [(0, 1)]
    batch = next(iter(make_loader(PairBatches([Source(str(tiny_trace))], pairs, 3 * SEQ_LEN, with_previous=True))))
    ids = reader.layer(1, ("topk_ids",), shards=[0])["topk_ids"][:3 * SEQ_LEN].long()
    has = batch["has_prev"]
    assert (~has).nonzero().flatten().tolist() == [0, SEQ_LEN, 2 * SEQ_LEN]
    assert torch.equal(batch["prev_ids"][has, 0], ids[:-1][has[1:]])


def _randomise_corrections(est: Estimator, seed: int = 0) -> None:
    """Give every correction net (its zero-initialised last layer too) random weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in est.corrections.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def test_routing_features(root, tiny_trace, tiny_q3):
    """routing_features: the correction reads [q_l, m_l] (m_l = layer l's routing as a weighted
    multi-hot over E, summing to 1); step 0 is still quasi exactly; one token at a time gives
    the batch's predictions; the option survives a checkpoint, and an older checkpoint
    (config.json without the option, q_l-only nets) still loads."""
    import shutil

    from estimators.checkpoint import save_estimator
    from estimators.predictors import routing_vector

    model = load_model(tiny_q3)
    family = detect_family(model)
    spec = family.spec(model)
    reader = TraceReader(tiny_trace)
    pairs = layer_pairs(spec.moe_layers, reader.layers, 1)
    H, E = spec.hidden_size, spec.num_experts

    def build(**options):
        est = Estimator(family, pairs=pairs, default_vectors=reader.default_vectors(),
                        parts=collect_parts(model, family, pairs), num_experts=E, top_k=spec.top_k,
                        hidden_size=H, lookahead=1, width=8, **options)
        est.meta.update(fingerprint=router_fingerprint(model), id=str(tiny_q3))
        return est

    batch = next(iter(make_loader(PairBatches([Source(str(tiny_trace))], pairs, 16))))
    states = [batch_source_state(batch, p) for p in range(len(pairs))]
    est = build(routing_features=True)
    both = build(routing_features=True, normed_features=True)
    assert est.correction_inputs == H + E and both.correction_inputs == 2 * H + E
    assert build().correction_inputs == H
    for (_, t), state in zip(pairs, states):
        m = routing_vector(state.ids, state.weights, E)
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[0]))
        assert torch.equal((m > 0).sum(-1), torch.full((m.shape[0],), spec.top_k))
        assert torch.equal(m.gather(1, state.ids) > 0, torch.ones_like(state.ids, dtype=torch.bool))
        q = est.quasi(t, state)
        assert torch.equal(est.correction_features(t, q, state), torch.cat([q, m], -1))
        for e in (est, both):   # step 0: learned IS quasi
            out = e.all_logits(t, state, ["quasi", "learned"])
            assert torch.equal(out["learned"], out["quasi"])
            assert torch.equal(e.logits(t, state, "learned"), e.logits(t, state, "quasi"))
    with pytest.raises(SpecmoeError, match="routing"):
        est.logits(pairs[0][1], SourceState(residual=states[0].residual), "learned")

    _randomise_corrections(est)
    t, state = pairs[-1][1], states[-1]
    assert not torch.equal(est.logits(t, state, "learned"), est.logits(t, state, "quasi"))
    # the routing part of the input matters: same q_l, other m_l, other correction
    q = est.quasi(t, state)
    flipped = SourceState(residual=state.residual, ids=state.ids, weights=state.weights.flip(-1))
    assert not torch.equal(est.correction(t, q, state), est.correction(t, q, flipped))
    whole_ids = est.predict_ids(t, state, "learned")
    whole = est.logits(t, state, "learned")
    for n in range(4):
        one = SourceState(residual=state.residual[n:n + 1], ids=state.ids[n:n + 1], weights=state.weights[n:n + 1])
        assert torch.equal(est.predict_ids(t, one, "learned"), whole_ids[n:n + 1])
        torch.testing.assert_close(est.logits(t, one, "learned"), whole[n:n + 1], rtol=1e-5, atol=1e-5)

    # checkpoint round trip with the option
    save_estimator(est, root / "ckpt-routing")
    assert read_config(root / "ckpt-routing")["estimator"]["routing_features"] is True
    again = load_estimator(root / "ckpt-routing", model)
    assert again.routing_features and not again.normed_features
    for (_, t), state in zip(pairs, states):
        assert torch.equal(again.logits(t, state, "learned"), est.logits(t, state, "learned"))

    # an estimator saved before the option existed: no key in config.json, q_l-only nets
    old = build()
    _randomise_corrections(old, seed=1)
    save_estimator(old, root / "ckpt-old")
    cfg_path = root / "ckpt-old" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("routing_features", "normed_features"):
        del cfg["estimator"][key]
    cfg_path.write_text(json.dumps(cfg))
    loaded = load_estimator(root / "ckpt-old", model)
    assert not loaded.routing_features and loaded.correction_inputs == H
    for (_, t), state in zip(pairs, states):
        assert torch.equal(loaded.logits(t, state, "learned"), old.logits(t, state, "learned"))
    # ... and its q_l-only weights are refused, in one line, under a config that claims the option
    shutil.copytree(root / "ckpt-old", root / "ckpt-old-claimed")
    cfg["estimator"]["routing_features"] = True
    (root / "ckpt-old-claimed" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MismatchError, match="routing_features=True"):
        load_estimator(root / "ckpt-old-claimed", model)


# ----------------------------------------------------------------------------- data split


def test_a_target_predicted_from_its_parts(tiny_trace, tiny_q3):
    """predict_target on Estimator.target_parts (what the runtime's compiled decode piece calls)
    gives each kind's logits as recomputed here by hand from the model's modules: the router
    of t on s_l (current), on q_l (quasi), plus the correction net on [q_l, m_l, s_l] (learned);
    the `previous` predictor has no parts, and `learned` without a correction net is refused."""
    from estimators import predict_target, target_logits
    from estimators.predictors import routing_vector

    model = load_model(tiny_q3)
    family = detect_family(model)
    spec = family.spec(model)
    reader = TraceReader(tiny_trace)
    pairs = layer_pairs(spec.moe_layers, reader.layers, 1)
    dv = reader.default_vectors()
    est = Estimator(family, pairs=pairs, default_vectors=dv, parts=collect_parts(model, family, pairs),
                    num_experts=spec.num_experts, top_k=spec.top_k, hidden_size=spec.hidden_size, lookahead=1,
                    width=8, routing_features=True, normed_features=True)
    _randomise_corrections(est)
    batch = next(iter(make_loader(PairBatches([Source(str(tiny_trace))], pairs, 16))))
    with torch.no_grad():
        for i, (src, t) in enumerate(pairs):
            state = batch_source_state(batch, i)
            parts = est.target_parts(t)
            r = state.residual.reshape(-1, spec.hidden_size).float()
            s = family.moe_norm(model, src).float()(r)
            mix = torch.zeros(r.shape[0], spec.num_experts).scatter_add_(1, state.ids.long(), state.weights.float()) \
                @ dv[src].float()
            q = family.moe_norm(model, t).float()(r + mix)
            router = family.router(model, t).float()
            by_hand = {"current": family.router_logits(router, s), "quasi": family.router_logits(router, q)}
            x = torch.cat([q, routing_vector(state.ids, state.weights, spec.num_experts), s], -1)
            by_hand["learned"] = by_hand["quasi"] + est.corrections[str(t)](x)
            for kind, expected in by_hand.items():
                torch.testing.assert_close(target_logits(family, kind, state, **parts), expected.float(),
                                           rtol=1e-4, atol=1e-4)
                ids, w = predict_target(family, kind, state, **parts)
                ref_ids, ref_w = est.predict(t, state, kind)
                assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)
    assert est.predictor("previous").target_parts(pairs[0][1]) is None
    assert est.predictor("hybrid" if est.hybrid else "learned").target_parts(pairs[0][1])[0] in ("quasi", "learned")
    with pytest.raises(SpecmoeError, match="correction net"):
        target_logits(family, "learned", state, **(parts | {"correction": None}))
    with pytest.raises(SpecmoeError, match="unknown predictor kind 'hybrid'"):
        predict_target(family, "hybrid", state, **parts)   # a view, resolved per layer by Predictor


def test_split_is_by_whole_sequences_and_deterministic(tiny_trace):
    reader = TraceReader(tiny_trace)
    mask = split_sequences(reader.num_sequences, 0.1, seed=0)
    assert torch.equal(mask, split_sequences(reader.num_sequences, 0.1, seed=0))
    assert int(mask.sum()) == -(-reader.num_sequences // 10)
    pairs = [(0, 1)]
    seqs = reader.sequence_ids()
    tokens = {}
    for name, m in (("train", ~mask), ("val", mask)):
        ds = PairBatches([Source(str(tiny_trace), m)], pairs, 50, with_previous=True)
        n = sum(b["residual"].shape[0] for b in make_loader(ds))
        tokens[name] = n
        assert n == int(m.sum()) * reader.seq_len
    assert tokens["train"] + tokens["val"] == reader.num_tokens
    assert set(seqs[mask.repeat_interleave(reader.seq_len)].tolist()) == set(mask.nonzero().flatten().tolist())
    # DDP: every rank gets the same number of training batches
    ds = PairBatches([Source(str(tiny_trace), ~mask)], pairs, 100, shuffle=True, even=True, buffer_mb=1)
    assert ds.batches_for(0, 3) == ds.batches_for(1, 3) == ds.batches_for(2, 3)
    with pytest.raises(SpecmoeError):
        split_sequences(1, 0.1, 0)


def test_config_rejects_unknown_and_bad_values(tmp_path):
    assert load_config(None).width == "auto" and load_config(None, width=8).width == 8
    with pytest.raises(SpecmoeError, match="width must be"):
        load_config(write_config(tmp_path / "d.yaml", width=0))
    with pytest.raises(SpecmoeError, match="unknown setting"):
        load_config(write_config(tmp_path / "a.yaml", widht=3))
    with pytest.raises(SpecmoeError, match="val_fraction"):
        load_config(write_config(tmp_path / "b.yaml", val_fraction=1.5))
    with pytest.raises(SpecmoeError, match="width must be"):
        load_config(write_config(tmp_path / "c.yaml", width="wide"))


# ------------------------------------------------------------- training (learned vs quasi)


@pytest.fixture(scope="module")
def trained(root, text_file, tokenizer_dir):
    """`train --predictor all` on a small trace of the demo model (else a tiny model)."""
    if HAVE_DEMO:
        model_dir, width, tokens = DEMO_MODEL_DIR, 64, 4096
    else:
        model_dir = save_tiny(root, tokenizer_dir, "q3-train", "qwen3_moe", 0, **QWEN3_4)
        width, tokens = 8, 4096
    trace = make_trace(model_dir, root / "trace-train", text_file, tokens, seq_len=64)
    cfg = load_config(write_config(root / "train.yaml", width=width), max_steps=45)
    out = root / "ckpt-learned"
    result = run_train(TrainRun(traces=[trace], out=out, estimator=cfg, quiet=True))
    return {"result": result, "out": out, "model_dir": model_dir, "trace": trace}


def test_learned_at_least_quasi_and_kl_decreases(trained):
    import csv

    val = trained["result"]["results"]["validation"]
    for t in val["quasi"]:
        assert val["learned"][t].recall >= val["quasi"][t].recall
        assert val["hybrid"][t].recall == max(val["learned"][t].recall, val["quasi"][t].recall)
    mean = {k: sum(m.recall for m in v.values()) / len(v) for k, v in val.items()}
    assert mean["learned"] > mean["quasi"]
    rows = list(csv.DictReader(open(trained["result"]["training"]["csv_log"])))
    train_kl = [float(r["train/kl"]) for r in rows if r.get("train/kl")]
    val_rows = [r for r in rows if r.get("val/kl")]
    assert len(val_rows) >= 2 and len(train_kl) >= 2
    # step 0 is quasi exactly, so val/kl_quasi is the starting KL
    assert float(val_rows[-1]["val/kl"]) < float(val_rows[-1]["val/kl_quasi"])
    assert float(val_rows[-1]["val/kl"]) < float(val_rows[0]["val/kl"])
    assert train_kl[-1] < train_kl[0]
    params = trained["result"]["parameters"]
    assert params["share"] < 0.02


def test_checkpoint_round_trip_and_mismatch(trained, root, tiny_q3):
    out = trained["out"]
    cfg = read_config(out)
    assert cfg["format"] == "specmoe-estimator" and cfg["lookahead"] == 1
    assert cfg["estimator"]["routing_features"] is False    # the default: the nets read q_l only
    assert set(cfg["predictor"].values()) <= {"quasi", "learned"} and cfg["hybrid"] == cfg["predictor"]
    model = load_model(trained["model_dir"])
    assert cfg["model"]["fingerprint"] == router_fingerprint(model)
    # dtype-independent when the weights are bf16-representable (the demo ships bf16)
    rounded = load_model(trained["model_dir"]).to(torch.bfloat16)
    assert router_fingerprint(rounded) == router_fingerprint(rounded.float())
    before = trained["result"]["estimator"]
    after = load_estimator(out, model)
    assert not after.routing_features and after.correction_inputs == after.hidden_size
    assert after.kinds == before.kinds and after.hybrid == before.hybrid and after.pairs == before.pairs
    batch = next(iter(make_loader(PairBatches([Source(str(trained["trace"]))], before.pairs, 200))))
    for p, (_, t) in enumerate(before.pairs):
        state = batch_source_state(batch, p)
        for kind in ("current", "quasi", "learned", "deployed", "hybrid"):
            a, b = before.predictor(kind), after.predictor(kind)
            assert torch.equal(a.logits(t, state), b.logits(t, state)), (kind, t)
            assert torch.equal(a.predict_ids(t, state), b.predict_ids(t, state)), (kind, t)

    # same architecture, other weights: the fingerprint refuses it
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(123)
    other = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(trained["model_dir"]), dtype=torch.float32)
    with pytest.raises(MismatchError, match="fingerprint"):
        load_estimator(out, other)
    if HAVE_DEMO:   # another shape entirely
        with pytest.raises(MismatchError, match="another model"):
            load_estimator(out, load_model(tiny_q3))


# ---------------------------------------------------------------------- the train command


def test_train_command_end_to_end(root, tiny_trace, tiny_eval_trace, capsys):
    cfg = write_config(root / "tiny.yaml", width=8)
    out = root / "ckpt-tiny"
    rc = train_main(["--traces", str(tiny_trace), "--eval-traces", str(tiny_eval_trace), "--out", str(out),
                     "--config", str(cfg), "--max-steps", "12"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "recall per layer" in captured.out and "== eval ==" in captured.out
    for name in ("estimator.safetensors", "config.json", "report.json", "report.md", "recall_per_layer.png"):
        assert (out / name).is_file(), name
    assert (out / "recall_per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert set(report["splits"]) == {"validation", "eval"}
    for split in ("validation", "eval"):
        preds = report["splits"][split]
        assert list(preds) == ["current", "quasi", "learned", "hybrid", "previous"]
        assert set(preds["quasi"]["layers"]) == {"1", "2", "3"}
        assert 0.0 <= preds["hybrid"]["mean"]["recall"] <= 1.0
    md = (out / "report.md").read_text()
    assert "recall_per_layer.png" in md and "| hybrid |" in md

    # a second run into the same --out refuses and leaves everything in place
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc = train_main(["--traces", str(tiny_trace), "--out", str(out), "--config", str(cfg), "--predictor", "quasi"])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds an estimator" in err and err.count("\n") == 1
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    # --predictor quasi: no training, quasi deployed everywhere, loadable
    out_q = root / "ckpt-quasi"
    assert train_main(["--traces", str(tiny_trace), "--out", str(out_q), "--config", str(cfg),
                       "--predictor", "quasi"]) == 0
    capsys.readouterr()
    est = load_estimator(out_q, load_model(root / "q3"))
    assert set(est.kinds.values()) == {"quasi"} and not len(est.corrections)


def _one_line_error(capsys, argv) -> str:
    rc = train_main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert captured.err.count("\n") == 1 and captured.err.startswith("train: error: "), captured.err
    assert "Traceback" not in captured.err
    return captured.err


def test_train_refuses_bad_inputs(root, tiny_trace, tiny_q3, tiny_q3_other, tokenizer_dir, capsys):
    import shutil

    cfg = write_config(root / "err.yaml", width=8)
    base = ["--config", str(cfg), "--max-steps", "2"]
    out = root / "ckpt-err"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    err = _one_line_error(capsys, ["--traces", str(root / "nope"), "--out", str(out), *base])
    assert "does not exist" in err
    # a trace of another model with the same shapes (weights differ)
    err = _one_line_error(capsys, ["--traces", str(tiny_trace), "--model", str(tiny_q3_other), "--out", str(out), *base])
    assert "another model" in err  # caught by the router fingerprint in the manifest
    # ... and of another family
    q2 = save_tiny(root, tokenizer_dir, "q2", "qwen2_moe", 0)
    err = _one_line_error(capsys, ["--traces", str(tiny_trace), "--model", str(q2), "--out", str(out), *base])
    assert "another model" in err
    err = _one_line_error(capsys, ["--traces", str(tiny_trace), "--lookahead", "4", "--out", str(out), *base])
    assert "too large" in err
    # estimator too big for the 2% budget
    err = _one_line_error(capsys, ["--traces", str(tiny_trace), "--out", str(out), "--width", "512", *base])
    assert "max_param_share" in err
    # a damaged shard (same size, flipped bytes)
    bad = root / "trace-bad"
    shutil.copytree(tiny_trace, bad)
    shard = sorted(bad.glob("shard-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-100:] = bytes(255 - b for b in data[-100:])
    shard.write_bytes(bytes(data))
    err = _one_line_error(capsys, ["--traces", str(bad), "--out", str(out), *base])
    assert "sha256" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_ddp_two_processes_count_every_validation_token_once(root, tiny_trace):
    """`devices: 2` on CPU (Lightning DDP over gloo, in subprocesses): the validation
    metrics summed across ranks equal a one-process evaluation of the same split."""
    import csv
    import subprocess
    import sys

    cfg = write_config(root / "ddp.yaml", width=8, cpu_threads=1, max_epochs=2)
    out = root / "ckpt-ddp"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "estimators", "--traces", str(tiny_trace), "--out", str(out),
                           "--config", str(cfg), "--devices", "2", "--predictor", "learned"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("== validation ==") == 1          # only rank 0 reports
    rows = [r for r in csv.DictReader(open(out / "lightning" / "metrics.csv")) if r.get("val/recall")]
    metrics = read_config(out)["metrics"]["validation"]
    assert float(rows[0]["val/recall_quasi"]) == pytest.approx(metrics["quasi"]["recall"], abs=1e-6)
    assert float(rows[-1]["val/recall_best"]) == pytest.approx(metrics["learned"]["recall"], abs=1e-6)


# ------------------------------------------------ same model elsewhere, evaluation, loading


@pytest.fixture(scope="module")
def tiny_ckpt(root, tiny_trace, tiny_eval_trace):
    """A quick `train` on the tiny model with a separate eval trace (its report has an eval split)."""
    cfg = write_config(root / "tiny-ckpt.yaml", width=8)
    out = root / "ckpt-tiny-eval"
    assert train_main(["--traces", str(tiny_trace), "--eval-traces", str(tiny_eval_trace), "--out", str(out),
                       "--config", str(cfg), "--max-steps", "6", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_q3_copy(root, tiny_q3) -> Path:
    """The very same model, copied into another directory (another id, same weights)."""
    import shutil

    out = root / "elsewhere" / "q3-copy"
    if not out.exists():
        shutil.copytree(tiny_q3, out)
    return out


def test_same_model_in_another_directory_is_the_same_model(root, tiny_trace, tiny_q3_copy, tiny_q3_other,
                                                           text_file, capsys):
    """The router fingerprint decides, not the id: a trace of a copy of the model in another
    directory trains and evaluates with a trace of the original; another model is refused."""
    copy_trace = make_trace(tiny_q3_copy, root / "trace-q3-copy", text_file, 512)
    capsys.readouterr()
    assert TraceReader(copy_trace).manifest["model"]["id"] != TraceReader(tiny_trace).manifest["model"]["id"]
    cfg = write_config(root / "copy.yaml", width=8)
    out = root / "ckpt-copy"
    rc = train_main(["--traces", str(tiny_trace), "--eval-traces", str(copy_trace), "--out", str(out),
                     "--config", str(cfg), "--max-steps", "2", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert train_main(["--traces", str(tiny_trace), str(copy_trace), "--out", str(root / "ckpt-copy-2"),
                       "--config", str(cfg), "--max-steps", "2", "--quiet", "--predictor", "quasi"]) == 0
    capsys.readouterr()
    # load_estimator: the copy (as a loaded model or as a path) is the model the estimator was made for
    est = load_estimator(out, load_model(tiny_q3_copy))
    assert load_estimator(out, str(tiny_q3_copy)).pairs == est.pairs
    # a trace of another model (same shapes, other weights) is still refused, in one line
    other_trace = make_trace(tiny_q3_other, root / "trace-q3-other", text_file, 512)
    capsys.readouterr()
    err = _one_line_error(capsys, ["--traces", str(tiny_trace), "--eval-traces", str(other_trace), "--out",
                                   str(root / "ckpt-other"), "--config", str(cfg), "--max-steps", "2"])
    assert "different models" in err and "fingerprint" in err
    with pytest.raises(MismatchError, match="fingerprint"):
        load_estimator(out, str(tiny_q3_other))


def test_load_estimator_takes_a_model_id_or_says_what_to_pass(tiny_ckpt, tiny_q3):
    model = load_model(tiny_q3)
    ref = load_estimator(tiny_ckpt, model)
    for arg in (str(tiny_q3), tiny_q3, None):      # a directory (str or Path), or the id it records
        est = load_estimator(tiny_ckpt, arg)
        assert est.pairs == ref.pairs and est.kinds == ref.kinds
        for (name, a), b in zip(ref.state_dict().items(), est.state_dict().values()):
            assert torch.equal(a, b), name
    with pytest.raises(SpecmoeError, match="hub id or directory"):
        load_estimator(tiny_ckpt, 42)


def test_evaluate_a_checkpoint_without_training(root, tiny_ckpt, tiny_eval_trace, tiny_q3_other, text_file,
                                                capsys):
    """`train --evaluate CKPT --eval-traces DIR --out DIR` writes the report training writes, with
    the same numbers on the same trace; a trace of another model: one line, exit 2."""
    out = root / "eval-report"
    capsys.readouterr()
    rc = train_main(["--evaluate", str(tiny_ckpt), "--eval-traces", str(tiny_eval_trace), "--out", str(out),
                     "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "== eval ==" in captured.out and "recall per layer" in captured.out
    for name in ("report.json", "report.md", "recall_per_layer.png"):
        assert (out / name).is_file(), name
    assert not (out / "estimator.safetensors").exists()
    mine = json.loads((out / "report.json").read_text())["splits"]["eval"]
    trained = json.loads((tiny_ckpt / "report.json").read_text())["splits"]["eval"]
    assert list(mine) == list(trained) == ["current", "quasi", "learned", "hybrid", "previous"]
    assert mine == trained
    # an existing report is not replaced by accident
    err = _one_line_error(capsys, ["--evaluate", str(tiny_ckpt), "--eval-traces", str(tiny_eval_trace),
                                   "--out", str(out)])
    assert "already holds a report" in err
    other_trace = make_trace(tiny_q3_other, root / "trace-q3-other", text_file, 512)
    capsys.readouterr()
    err = _one_line_error(capsys, ["--evaluate", str(tiny_ckpt), "--eval-traces", str(other_trace),
                                   "--out", str(root / "eval-other")])
    assert "another model" in err
    err = _one_line_error(capsys, ["--evaluate", str(tiny_ckpt), "--eval-traces", str(other_trace),
                                   "--lookahead", "2", "--out", str(root / "eval-other")])
    assert "--lookahead only applies to training" in err


# ---------------------------------------------------------- models without their experts


class _Untouchable(torch.nn.Module):
    """Stands in for a routed-experts module that must not be read, copied or moved."""

    def __deepcopy__(self, memo):
        raise AssertionError("the routed experts were copied")

    def _apply(self, fn, recurse=True):
        raise AssertionError("the routed experts were moved or cast")

    def parameters(self, recurse=True):
        raise AssertionError("the routed experts' parameters were read")


def test_estimator_owns_its_parts_and_never_reads_the_experts(root, tokenizer_dir, text_file):
    """load_estimator / collect_parts copy norms, routers and shared experts: moving or casting
    the estimator leaves the model as it was; a model without routed experts serves as well."""
    from estimators.checkpoint import save_estimator

    model_dir = save_tiny(root, tokenizer_dir, "own-q2", "qwen2_moe", 5)     # has shared experts
    trace = make_trace(model_dir, root / "trace-own-q2", text_file, 2 * SEQ_LEN)
    model = load_model(model_dir)
    family = detect_family(model)
    spec = family.spec(model)
    reader = TraceReader(trace)
    pairs = layer_pairs(spec.moe_layers, reader.layers, 1)
    est = Estimator(family, pairs=pairs, default_vectors=reader.default_vectors(),
                    parts=collect_parts(model, family, pairs, add_shared=True), num_experts=spec.num_experts,
                    top_k=spec.top_k, hidden_size=spec.hidden_size, lookahead=1, width=4, add_shared=True)
    est.meta.update(fingerprint=router_fingerprint(model), id=str(model_dir))
    save_estimator(est, root / "ckpt-own")

    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {p.data_ptr() for p in model.parameters()}
    for made in (est, load_estimator(root / "ckpt-own", model)):
        assert not ptrs & {p.data_ptr() for p in made.parameters()}     # nothing shared with the model
        made.to(torch.float64)
        made.to("meta")
    after = model.state_dict()
    assert all(after[k].device.type == "cpu" and after[k].dtype == v.dtype and torch.equal(after[k], v)
               for k, v in before.items())

    # the same estimator on a model whose routed experts are not there at all
    skeleton = load_model(model_dir)
    for l in spec.moe_layers:
        setattr(family.moe_block(skeleton, l), family.experts_attr, _Untouchable())
    loaded = load_estimator(root / "ckpt-own", skeleton)
    full = load_estimator(root / "ckpt-own", model)
    batch = next(iter(make_loader(PairBatches([Source(str(trace))], pairs, SEQ_LEN))))
    for p, (_, t) in enumerate(pairs):
        state = batch_source_state(batch, p)
        for kind in ("current", "quasi", "learned"):
            assert torch.equal(loaded.logits(t, state, kind), full.logits(t, state, kind)), (kind, t)


# -------------------------------------------------------------- running the train command


def test_default_width_fits_the_budget(root, tiny_trace, capsys):
    """With the shipped config (width auto), a model whose experts are small beside its hidden
    size gets the widest correction net within max_param_share, and the run says which."""
    out = root / "ckpt-auto"
    rc = train_main(["--traces", str(tiny_trace), "--out", str(out), "--max-steps", "2", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    cfg = read_config(out)
    width = cfg["estimator"]["width"]
    assert 1 <= width < 64 and f"width {width}:" in captured.err and "max_param_share" in captured.err
    assert cfg["parameters"]["share"] <= load_config(None).max_param_share
    assert cfg["training"]["width_auto"] is True
    # one wider would not have fitted
    from estimators.predictors import correction_parameter_count

    p = cfg["parameters"]
    wider = p["default_vectors"] + len(cfg["pairs"]) * correction_parameter_count(
        64, 8, width + 1, cfg["estimator"]["depth"])
    assert wider / p["expert"] > load_config(None).max_param_share


def test_progress_by_default_and_quiet(root, tiny_trace, capsys):
    cfg = write_config(root / "progress.yaml", width=8)
    base = ["--traces", str(tiny_trace), "--config", str(cfg), "--max-steps", "6"]
    assert train_main([*base, "--out", str(root / "ckpt-progress")]) == 0
    err = capsys.readouterr().err
    for shown in ("train", "step 6/6", "loss=", "val_recall=", "<"):      # "<": elapsed<ETA
        assert shown in err, (shown, err[-2000:])
    assert train_main([*base, "--out", str(root / "ckpt-progress-q"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "== validation ==" in captured.out


def test_same_seed_same_result(root, tiny_trace):
    """Two runs with the same seed give the same weights and the same report, exactly."""
    cfg = load_config(write_config(root / "seed.yaml", width=8, val_every_steps=3), max_steps=9)
    reports, weights = [], []
    for name in ("ckpt-seed-a", "ckpt-seed-b"):
        torch.rand(7)        # whatever ran before must not matter
        run_train(TrainRun(traces=[tiny_trace], out=root / name, estimator=cfg, quiet=True))
        reports.append(json.loads((root / name / "report.json").read_text())["splits"])
        weights.append((root / name / "estimator.safetensors").read_bytes())
    assert reports[0] == reports[1]
    assert weights[0] == weights[1]
    assert not torch.are_deterministic_algorithms_enabled()     # left as it was


def test_skip_existing_keeps_a_complete_estimator(root, tiny_trace, capsys):
    cfg = write_config(root / "skip.yaml", width=8)
    out = root / "ckpt-skip"
    base = ["--traces", str(tiny_trace), "--out", str(out), "--config", str(cfg), "--max-steps", "2", "--quiet"]
    assert train_main([*base, "--skip-existing"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert train_main([*base, "--skip-existing"]) == 0
    assert "left as it is" in capsys.readouterr().out
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # another lookahead, another trace, or no flag at all: still refused, nothing touched
    err = _one_line_error(capsys, [*base, "--skip-existing", "--lookahead", "2"])
    assert "other settings" in err and "lookahead" in err
    err = _one_line_error(capsys, [*base, "--skip-existing", "--eval-traces", str(tiny_trace)])
    assert "other settings" in err and "eval traces" in err
    err = _one_line_error(capsys, base)
    assert "already holds an estimator" in err
    err = _one_line_error(capsys, [*base, "--skip-existing", "--overwrite"])
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # an incomplete one (its report missing) is made again
    (out / "report.json").unlink()
    assert train_main([*base, "--skip-existing"]) == 0
    assert (out / "report.json").is_file()
    capsys.readouterr()
    # a trace that has grown since (here: the token count the checkpoint recorded) is another trace
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["training"]["trace_tokens"] == [TraceReader(tiny_trace).num_tokens]
    cfg_json["training"]["trace_tokens"] = [1]
    (out / "config.json").write_text(json.dumps(cfg_json))
    err = _one_line_error(capsys, [*base, "--skip-existing"])
    assert "trace tokens" in err


def test_plot_tells_equal_predictors_apart_and_names_the_traces():
    import matplotlib.pyplot as plt

    from estimators.metrics import compute_metrics
    from estimators.report import recall_figure

    ids = torch.tensor([[0, 1], [2, 3]])
    w = torch.ones(2, 2)
    m = compute_metrics(ids, ids, w)
    per = {name: {1: m, 2: m} for name in ("current", "quasi", "learned", "hybrid", "previous")}
    fig = recall_figure({"validation": per, "eval": per}, traces={"validation": ["runs/demo/trace-train"],
                                                                  "eval": ["runs/demo/trace-test"]})
    try:
        for ax in fig.axes:
            looks = {line.get_label(): (line.get_marker(), str(line.get_linestyle()), line.get_color(),
                                        str(line.get_markerfacecolor())) for line in ax.get_lines()}
            assert len(looks) == 5 and len({l[0] for l in looks.values()}) == 5
            assert len({l[2] for l in looks.values()}) == 5
            # hybrid equals learned here: it differs in marker, dash and fill, so both stay visible
            assert all(a != b for a, b in zip(looks["hybrid"], looks["learned"]))
        titles = [ax.get_title() for ax in fig.axes]
        assert "runs/demo/trace-train" in titles[0] and "runs/demo/trace-test" in titles[1]
    finally:
        plt.close(fig)


def test_estimator_copies_compute_where_the_estimator_is(tmp_path):
    """A model spread over GPUs (device_map) carries accelerate hooks that move each
    module's inputs to its device; the estimator's own copies of norms and routers must not
    keep them (they would send the estimator's inputs to the model's other GPU). Here the
    hooks send inputs to the meta device, which no computation survives."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from transformers import AutoModelForCausalLM

    from estimators import load_estimator
    from specmoe.paths import REPO_ROOT

    class ToMeta(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return tuple(a.to("meta") if torch.is_tensor(a) else a for a in args), kwargs

    demo = REPO_ROOT / "checkpoints" / "demo-moe"
    est_dir = REPO_ROOT / "checkpoints" / "demo-estimator-h1"
    plain = load_estimator(est_dir, AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32))
    hooked_model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32)
    for module in hooked_model.modules():
        if module is not hooked_model and any(True for _ in module.parameters(recurse=False)):
            add_hook_to_module(module, ToMeta())
    with pytest.raises(Exception):
        hooked_model.model.norm(torch.ones(1, plain.hidden_size)).tolist()  # the hooks do move inputs
    hooked = load_estimator(est_dir, hooked_model)
    target = plain.targets[0]
    state = torch.randn(3, plain.hidden_size)
    torch.testing.assert_close(hooked.norms[str(target)](state), plain.norms[str(target)](state))
