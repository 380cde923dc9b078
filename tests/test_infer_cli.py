"""The `infer` command as a user runs it: text out, tables and files written, one-line errors."""

from __future__ import annotations

import json

import pytest

from runtime.cli import main
from specmoe.paths import REPO_ROOT

EST = str(REPO_ROOT / "checkpoints" / "demo-estimator-h1")


def test_generate_streams_text_and_writes_telemetry(tmp_path, capsys):
    tel = tmp_path / "telemetry.json"
    code = main(["generate", "To be, or not to be", "--device", "cpu", "--max-new-tokens", "12",
                 "--estimators", EST, "--prefetch", "hybrid", "--on-miss", "cpu", "--telemetry", str(tel), "--quiet"])
    out = capsys.readouterr()
    assert code == 0
    assert len(out.out.strip()) > 0
    assert "time per token, median" in out.err
    data = json.loads(tel.read_text())
    assert data["decoded_tokens"] == 11 and data["engine"]["prefetch"] == "hybrid"
    assert data["prefetch_hit_rate"] > 0.5
    # the CPU computed missed experts, and its time is reported with them
    assert data["cpu_experts_per_token"] > 0 and data["cpu_expert_seconds"] > 0
    assert "CPU experts per decoded token" in out.err


def test_generate_reads_stdin(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("And God said"))
    assert main(["generate", "--device", "cpu", "--max-new-tokens", "4", "--prefetch", "none", "--quiet"]) == 0
    assert capsys.readouterr().out.strip()


def test_bench_writes_json_and_markdown_with_the_copy_floor(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--device", "cpu", "--estimators", EST, "--modes", "none+fetch,hybrid+speculate",
                 "--budgets", "0,25%", "--prompt-tokens", "32", "--decode-tokens", "6", "--warmup", "2",
                 "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    assert [r["mode"] for r in data["modes"]] == ["none+fetch"] * 2 + ["hybrid+speculate"] * 2
    assert all(r["copy_floor_ms"] is not None for r in data["modes"])
    assert "copy floor ms" in (out / "bench.md").read_text()
    assert data["command"].startswith("infer bench")


@pytest.mark.parametrize("argv,message", [
    (["generate", "hi", "--device", "cpu", "--gpu-expert-budget", "1KiB"], "minimum"),
    (["generate", "hi", "--device", "cpu", "--model", "/nonexistent/model"], "does not exist"),
    (["generate", "hi", "--device", "cpu", "--prefetch", "learned"], "--estimators"),
    (["generate", "hi", "--device", "cpu", "--prefetch", "none", "--on-miss", "speculate"], "speculate"),
    (["generate", "hi", "--device", "cpu", "--max-context", "8", "--max-new-tokens", "16"], "context"),
    (["generate", "hi", "--device", "cpu", "--estimators", "/nonexistent/est"], "does not exist"),
    (["bench", "--device", "cpu", "--modes", "quasi"], "PREFETCH+ON_MISS"),
    (["generate", "hi", "--device", "cpu", "--on-miss", "cpu", "--cpu-copy-share", "1.5"], "cpu_copy_share"),
    (["generate", "hi", "--device", "cpu", "--on-miss", "cpu", "--host-read-share", "2"], "host_read_share"),
    (["generate", "hi", "--device", "cpu", "--prefetch", "current", "--on-miss", "speculate",
      "--host-read-share", "0.25"], "exact decode"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("infer: error:") and message in err[0], err


def test_host_read_share_auto_on_the_command_line(capsys):
    """`--host-read-share auto` is the YAML's null: measured at start on CUDA, none on the CPU."""
    from runtime.cli import build_parser, runtime_config

    args = build_parser().parse_args(["generate", "hi", "--device", "cpu", "--on-miss", "cpu",
                                      "--host-read-share", "auto"])
    assert runtime_config(args).host_read_share is None
    assert main(["generate", "hi", "--device", "cpu", "--on-miss", "cpu", "--prefetch", "none",
                 "--host-read-share", "auto", "--max-new-tokens", "2", "--quiet"]) == 0


def test_cache_fill_on_the_command_line(capsys):
    """`--cache-fill` reaches the engine's config (default: prompt, as the YAML says); a value
    outside the choices is refused by the parser."""
    from runtime.cli import build_parser, runtime_config

    parser = build_parser()
    assert runtime_config(parser.parse_args(["generate", "hi"])).cache_fill == "prompt"
    assert runtime_config(parser.parse_args(["generate", "hi", "--cache-fill", "recent"])).cache_fill == "recent"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["generate", "hi", "--cache-fill", "hot"])
    assert exit_.value.code == 2 and "invalid choice: 'hot'" in capsys.readouterr().err


def test_cuda_without_cuda_is_exit_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", "hi", "--device", "cuda", "--quiet"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly():
    """`infer generate ... | head -1`: no traceback when the reader goes away."""
    import subprocess
    import sys

    proc = subprocess.run(f"{sys.executable} -m runtime generate 'And God said' --device cpu --max-new-tokens 40 "
                          "--prefetch none --quiet | head -c 1", shell=True, capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_generate_stops_at_a_stop_string_and_samples_reproducibly(capsys):
    args = ["generate", "ROMEO. What light", "--device", "cpu", "--max-new-tokens", "40", "--prefetch", "none",
            "--quiet"]
    assert main(args + ["--stop", "\n"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") <= 2   # the stop string ends generation (the first newline may open the reply)
    assert main(args + ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(args + ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first


def test_chat_without_a_template_is_one_line(capsys):
    assert main(["generate", "hi", "--chat", "--device", "cpu", "--prefetch", "none", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat template" in err[0]
