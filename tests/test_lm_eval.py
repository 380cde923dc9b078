"""specmoe inside lm-evaluation-harness, offline, on a task defined in this repository.

The exact mode must score what lm-evaluation-harness's own `hf` model scores on the same
checkpoint (an independent implementation of the same log-likelihoods); the speculative
modes must run the same task and differ from it."""

from __future__ import annotations

import pytest

lm_eval = pytest.importorskip("lm_eval")

import runtime.lm_eval_harness  # noqa: E402,F401  (registers the model)
from specmoe.paths import DEMO_MODEL_DIR, REPO_ROOT  # noqa: E402

EST = REPO_ROOT / "checkpoints" / "demo-estimator-h1"
TASK_DIR = REPO_ROOT / "benchmarks" / "lm_eval_tasks" / "demo_cloze"


@pytest.fixture(scope="module")
def include_path(tmp_path_factory):
    """The task with its data file named by absolute path (the shipped YAML names it relative
    to the repository root)."""
    d = tmp_path_factory.mktemp("tasks") / "demo_cloze"
    d.mkdir()
    text = (TASK_DIR / "demo_cloze.yaml").read_text()
    text = text.replace("benchmarks/lm_eval_tasks/demo_cloze/demo_cloze.jsonl", str(TASK_DIR / "demo_cloze.jsonl"))
    (d / "demo_cloze.yaml").write_text(text)
    return str(d.parent)


def run(model, model_args, include_path, limit=12):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=["demo_cloze"], limit=limit, log_samples=True,
                          task_manager=TaskManager(include_path=include_path), batch_size=1)
    lls = [float(r[0][0]) for s in out["samples"]["demo_cloze"] for r in s["resps"]]
    return out["results"]["demo_cloze"], lls


@pytest.fixture(scope="module")
def exact(include_path):
    return run("specmoe", f"pretrained={DEMO_MODEL_DIR},device=cpu,dtype=fp32,on_miss=fetch,prefetch=none",
               include_path)


def test_exact_mode_scores_what_the_hf_model_scores(include_path, exact):
    ours, our_lls = exact
    theirs, their_lls = run("hf", f"pretrained={DEMO_MODEL_DIR},device=cpu,dtype=float32", include_path)
    assert ours["acc,none"] == theirs["acc,none"]
    assert ours["acc_norm,none"] == theirs["acc_norm,none"]
    assert our_lls == pytest.approx(their_lls, abs=1e-3)


def test_speculative_mode_runs_the_task(include_path, exact):
    _, exact_lls = exact
    prefetch = "hybrid"
    spec, spec_lls = run("specmoe", f"pretrained={DEMO_MODEL_DIR},device=cpu,dtype=fp32,estimators={EST},"
                                    f"prefetch={prefetch},on_miss=speculate", include_path)
    assert 0.0 <= spec["acc,none"] <= 1.0
    assert spec_lls != pytest.approx(exact_lls, abs=1e-4)   # speculation changed some scores


def test_generation_goes_through_the_runtime():
    from lm_eval.api.instance import Instance

    lm = runtime.lm_eval_harness.SpecmoeLM(pretrained=str(DEMO_MODEL_DIR), device="cpu", estimators=str(EST),
                                           prefetch="hybrid", on_miss="speculate")
    req = Instance("generate_until", {}, ("ROMEO. What light", {"until": ["\n\n"], "max_gen_toks": 12}), 0)
    (text,) = lm.generate_until([req], disable_tqdm=True)
    assert isinstance(text, str) and "\n\n" not in text
    assert lm.engine.telemetry.summary()["decoded_tokens"] >= 1


def test_unknown_task_is_one_line(capsys):
    code = runtime.lm_eval_harness.main(["--model", "specmoe", "--model_args", f"pretrained={DEMO_MODEL_DIR},device=cpu",
                                         "--tasks", "no_such_task_anywhere"])
    assert code == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.startswith("python -m runtime")]
    assert len(err) == 1, err
