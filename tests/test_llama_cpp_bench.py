"""benchmarks/llama_cpp_side_by_side.py without llama.cpp: bytes per setting, the llama-bench
command line, parsing of its JSON (a record from a real run), time-boxed runs against stand-in
executables, the results files. Tests that need llama.cpp's source or a built llama-bench
skip when those are absent."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from benchmarks import llama_cpp_side_by_side as lcb
from specmoe.paths import REPO_ROOT

# `llama-bench -m <2-layer small model>.gguf -ngl 99 -ncmoe 1 -p 0 -n 16 -d 64 -t 2 -r 3 -o json`,
# llama.cpp 0c1e570 built for the CPU only: its stdout, verbatim.
SAMPLE = """[
  {
    "build_commit": "0c1e570",
    "build_number": 0,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/tmp/specmoe-llama/qwen3moe-2L-h256-e16-k4-i64-v6144-bf16.gguf",
    "model_type": "qwen3moe ?B BF16",
    "model_size": 18914304,
    "model_n_params": 9447168,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": 99,
    "n_cpu_moe": 1,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 16,
    "n_depth": 64,
    "test_time": "2026-11-30T13:37:24Z",
    "avg_ns": 303700452,
    "stddev_ns": 207741636,
    "avg_ts": 88.710920,
    "stddev_ts": 83.649208,
    "samples_ns": [ 86591899, 323911681, 500597777 ],
    "samples_ts": [ 184.775, 49.3962, 31.9618 ]
  }
]
"""

LLAMA_SRC = REPO_ROOT / ".llama_src" / "llama.cpp"


def _built_llama_bench() -> Path | None:
    candidates = [os.environ.get("LLAMA_BENCH", "")] + [f"/tmp/llama-build-{b}/bin/llama-bench" for b in ("cuda", "cpu")]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def _stand_in(tmp_path: Path, body: str) -> Path:
    """An executable that behaves like llama-bench as far as the runner can tell."""
    exe = tmp_path / "llama-bench"
    exe.write_text(f"#!{sys.executable}\nimport sys, time\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


# --- bytes --------------------------------------------------------------------------------

def test_expert_bytes_model_a():
    per_layer = 3 * 128 * 2048 * 768 * 2
    assert lcb.expert_bytes_per_layer() == per_layer == 1_207_959_552
    assert lcb.expert_bytes_on_gpu(0, 8) == 8 * per_layer
    assert [lcb.expert_bytes_on_gpu(n, 8) for n in (0, 2, 4, 6, 8)] == [8 * per_layer, 6 * per_layer,
                                                                       4 * per_layer, 2 * per_layer, 0]
    assert lcb.expert_bytes_on_gpu(12, 8) == 0     # more than the layers: all in CPU memory
    with pytest.raises(ValueError):
        lcb.expert_bytes_on_gpu(-1, 8)


def test_expert_bytes_small_shape():
    s = lcb.SMALL
    assert lcb.expert_bytes_on_gpu(1, 2, s["experts"], s["hidden"], s["expert_hidden"]) == 3 * 16 * 256 * 64 * 2
    assert lcb.expert_bytes_on_gpu(0, 2, s["experts"], s["hidden"], s["expert_hidden"], bytes_per_param=4) == \
        2 * 3 * 16 * 256 * 64 * 4


def test_settings_and_order():
    assert lcb.default_ncmoe(8) == [0, 2, 4, 6, 8]
    assert lcb.default_ncmoe(2) == [0, 1, 2]
    assert lcb.run_order([0, 2, 4, 6, 8]) == [0, 8, 4, 2, 6]
    assert lcb.run_order([3, 0]) == [0, 3]
    assert lcb.run_order([4, 4, 1]) == [1, 4]


# --- command lines ----------------------------------------------------------------------

def test_bench_command():
    cmd = lcb.bench_command(Path("/b/llama-bench"), Path("/m.gguf"), 4, depth=1024, decode=64, threads=16, reps=3)
    assert cmd[0] == "/b/llama-bench"

    def val(flag):
        return cmd[cmd.index(flag) + 1]

    assert val("-m") == "/m.gguf" and val("-ngl") == "99" and val("-ncmoe") == "4"
    assert val("-p") == "0" and val("-n") == "64" and val("-d") == "1024"
    assert val("-t") == "16" and val("-r") == "3" and val("-o") == "json"
    assert lcb.bench_command(Path("x"), Path("m"), 0, extra=["-fa", "on"])[-2:] == ["-fa", "on"]


def test_cmake_flags():
    cuda = lcb.cmake_flags("cuda", "0c1e570", "90", "/usr/local/cuda/bin/nvcc")
    for f in ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
              "-DLLAMA_BUILD_COMMIT=0c1e570", "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc"):
        assert f in cuda
    cpu = lcb.cmake_flags("cpu")
    assert "-DGGML_CUDA=OFF" in cpu and not any("CUDA_ARCH" in f for f in cpu)
    with pytest.raises(ValueError):
        lcb.cmake_flags("metal")


# --- llama-bench's JSON -----------------------------------------------------------------

def test_parse_recorded_sample():
    recs = lcb.parse_bench_json(SAMPLE)
    assert len(recs) == 1 and recs[0]["n_cpu_moe"] == 1 and recs[0]["n_gen"] == 16
    assert lcb.parse_bench_json("load time ...\n" + SAMPLE + "\nbye\n") == recs
    with pytest.raises(ValueError):
        lcb.parse_bench_json("error: failed to load model\n")


def test_row_from_record():
    rec = lcb.parse_bench_json(SAMPLE)[0]
    row = lcb.row_from_record(rec, ncmoe=1, layers=2, gpu_expert_bytes=1_572_864)
    ms = 323911681 / 16 / 1e6          # the median repetition over its 16 tokens
    assert row["ms_per_token"] == pytest.approx(ms, abs=1e-4)
    assert row["ms_per_layer"] == pytest.approx(ms / 2, abs=1e-4)
    assert row["tokens_per_s"] == pytest.approx(1e3 / ms, abs=1e-3)
    assert row["context"] == 64 and row["decode_tokens"] == 16 and row["threads"] == 2
    assert row["system"] == "llama.cpp" and row["setting"] == "ncmoe=1" and row["gpu_expert_layers"] == 1
    assert row["status"] == "ok" and row["repetitions"] == 3
    with pytest.raises(ValueError):
        lcb.row_from_record({**rec, "n_gen": 0}, 1, 2, 0)


# --- time-boxed runs against stand-ins ---------------------------------------------------

def test_run_ok(tmp_path):
    exe = _stand_in(tmp_path, f"sys.stderr.write('loading\\n')\nprint({SAMPLE!r})")
    row = lcb.run_llama_bench(exe, tmp_path / "m.gguf", 1, 2, depth=64, decode=16, threads=2, timeout=30,
                              gpu_expert_bytes=123, log_file=tmp_path / "run.log")
    assert row["status"] == "ok", row.get("error")
    assert row["gpu_expert_bytes"] == 123 and row["ms_per_token"] > 0
    assert row["llama_bench"]["build_commit"] == "0c1e570"
    assert "-ncmoe 1" in row["command"] and "loading" in (tmp_path / "run.log").read_text()


def test_run_failure_keeps_stderr_tail(tmp_path):
    exe = _stand_in(tmp_path, "sys.stderr.write('x\\n' * 100 + 'CUDA error: out of memory\\n')\nsys.exit(1)")
    row = lcb.run_llama_bench(exe, tmp_path / "m.gguf", 0, 8, timeout=30, gpu_expert_bytes=0)
    assert row["status"] == "failed" and "out of memory" in row["error"] and "exit 1" in row["error"]
    assert row["error"].count("\n") < 40
    assert "failed" in lcb.summary_line(row)


def test_run_unreadable_output(tmp_path):
    exe = _stand_in(tmp_path, "print('| model | size |')")
    row = lcb.run_llama_bench(exe, tmp_path / "m.gguf", 0, 8, timeout=30)
    assert row["status"] == "failed" and "unreadable" in row["error"]


def test_run_timeout(tmp_path):
    exe = _stand_in(tmp_path, "sys.stderr.write('warming up\\n'); sys.stderr.flush(); time.sleep(30)")
    row = lcb.run_llama_bench(exe, tmp_path / "m.gguf", 2, 8, timeout=1.5)
    assert row["status"] == "timeout" and row["wall_s"] < 20


def test_run_missing_executable(tmp_path):
    row = lcb.run_llama_bench(tmp_path / "absent", tmp_path / "m.gguf", 0, 8, timeout=5)
    assert row["status"] == "failed"


# --- results files ------------------------------------------------------------------------

def _doc(rows):
    return {"command": "python x", "llama_cpp": {"llama_cpp_commit": "abc"}, "build": {"backend": "cuda"},
            "model": {"layers": 8, "hidden": 2048, "experts": 128, "top_k": 8, "expert_hidden": 768,
                      "expert_bytes_per_layer": lcb.expert_bytes_per_layer(), "gguf_bytes": 10**10}, "rows": rows}


def test_results_merge(tmp_path):
    rec = lcb.parse_bench_json(SAMPLE)[0]
    ours = [lcb.row_from_record(rec, n, 8, lcb.expert_bytes_on_gpu(n, 8)) for n in (0, 8)]
    path = lcb.write_results(tmp_path, _doc(ours))
    md = path.with_suffix(".md").read_text()
    assert "| llama.cpp | ncmoe=0 | 8 | 8 | 9.66 |" in md and "| llama.cpp | ncmoe=8 | 8 | 0 | 0.00 |" in md
    other = {"system": "specmoe", "setting": "quasi+speculate budget=0", "layers": 8, "gpu_expert_bytes": 0,
             "ms_per_token": 5.0, "ms_per_layer": 0.625}
    doc = lcb.merge_rows(path, [other])
    assert len(doc["rows"]) == 3
    limits = {"cpu_expert_bytes_per_s": 100e9}
    doc = lcb.merge_rows(path, [{**other, "ms_per_token": 4.0}], command="python ours.py --x",   # same key: replaced
                         host_limits=limits)
    assert len(doc["rows"]) == 3 and [r for r in doc["rows"] if r["system"] == "specmoe"][0]["ms_per_token"] == 4.0
    lcb.write_results(tmp_path, _doc(ours[:1]))                     # a new llama.cpp run keeps the other system
    written = json.loads(path.read_text())
    rows = written["rows"]
    assert {r["system"] for r in rows} == {"llama.cpp", "specmoe"} and len(rows) == 2
    assert written["host_limits"] == limits                         # and the host rates measured with its rows
    assert "100.0 GB/s" in path.with_suffix(".md").read_text()
    assert "| specmoe | quasi+speculate budget=0 | 8 |" in path.with_suffix(".md").read_text()
    assert "Command for the specmoe rows: `python ours.py --x`" in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").stat().st_size > 0   # the plot follows the rows, whoever wrote last


def test_markdown_failed_and_skipped_rows():
    rows = [{"system": "llama.cpp", "setting": "ncmoe=4", "ncmoe": 4, "layers": 8, "gpu_expert_layers": 4,
             "gpu_expert_bytes": lcb.expert_bytes_on_gpu(4, 8), "status": "timeout", "error": "no result"},
            {"system": "llama.cpp", "setting": "ncmoe=6", "ncmoe": 6, "layers": 8, "gpu_expert_layers": 2,
             "gpu_expert_bytes": lcb.expert_bytes_on_gpu(6, 8), "status": "skipped", "error": "out of time"}]
    md = lcb.markdown(_doc(rows))
    assert "| 4.83 | - | - | - | - | - | timeout |" in md and "skipped" in md
    assert "timeout: no result" in lcb.summary_line(rows[0])


def test_host_floor_of_each_system():
    """llama.cpp's CPU reads top-k experts (3 * hidden * expert hidden bf16 weights each) in every
    layer whose experts stay in CPU memory, at the rate the host measured; a specmoe row brings
    its own floor; without measured rates there is none."""
    llama = {"system": "llama.cpp", "setting": "ncmoe=6", "layers": 8, "gpu_expert_layers": 2, "status": "ok"}
    ours = {"system": "specmoe", "setting": "none+cpu", "layers": 8, "floor_ms": 3.25, "status": "ok"}
    doc = _doc([llama, ours])
    assert lcb.host_floor_ms(doc, llama) is None
    doc["host_limits"] = {"cpu_expert_bytes_per_s": 100e9}
    expert = 3 * 2048 * 768 * 2
    assert lcb.host_floor_ms(doc, llama) == pytest.approx(1e3 * 6 * 8 * expert / 100e9)
    assert lcb.host_floor_ms(doc, ours) == 3.25
    md = lcb.markdown(doc)
    assert f"| {1e3 * 6 * 8 * expert / 100e9:.2f} | ok |" in md and "| 3.25 | ok |" in md


def test_model_shape():
    shape = lcb.model_shape(8, vocab=6144)
    assert (shape.num_hidden_layers, shape.hidden_size, shape.num_experts, shape.num_experts_per_tok,
            shape.moe_intermediate_size, shape.vocab_size) == (8, 2048, 128, 8, 768, 151936)
    small = lcb.model_shape(2, **lcb.SMALL, vocab=6144)
    assert (small.hidden_size, small.num_experts, small.num_experts_per_tok, small.moe_intermediate_size,
            small.vocab_size) == (256, 16, 4, 64, 6144)


def test_reduce_source_from_sdist(tmp_path):
    import tarfile

    root = tmp_path / "sdist" / "llama_cpp_python-9.9.9"
    lcpp = root / "vendor" / "llama.cpp"
    keep = ["CMakeLists.txt", "LICENSE", "licenses/x", "cmake/build-info.cmake", "include/llama.h", "src/llama.cpp",
            "common/common.cpp", "vendor/nlohmann/json.hpp", "vendor/sheredom/subprocess.h",
            "vendor/cpp-httplib/httplib.cpp", "gguf-py/gguf/__init__.py", "convert_hf_to_gguf.py",
            "conversion/__init__.py", "conversion/base.py", "conversion/qwen.py", "ggml/CMakeLists.txt",
            "ggml/cmake/common.cmake", "ggml/include/ggml.h", "ggml/src/ggml.c", "ggml/src/ggml-cpu/arch/x86/quants.c",
            "ggml/src/ggml-cpu/arch/arm/quants.c", "ggml/src/ggml-cuda/ggml-cuda.cu", "tools/llama-bench/llama-bench.cpp"]
    drop = ["docs/build.md", "models/x.gguf", "tests/test.cpp", "examples/e.cpp", "media/logo.png",
            "conversion/llama.py", "ggml/src/ggml-vulkan/v.cpp", "ggml/src/ggml-blas/b.cpp",
            "ggml/src/ggml-cpu/arch/riscv/q.c", "ggml/src/ggml-cpu/spacemit/i.cpp", "vendor/miniaudio/miniaudio.h",
            "vendor/hash/hash.cpp", "tools/server/server.cpp", "tools/mtmd/clip.cpp", "gguf-py/gguf/scripts/d.py",
            "gguf-py/tests/t.py"]
    for rel in keep + drop + ["tools/CMakeLists.txt", "vendor/CMakeLists.txt"]:
        (lcpp / rel).parent.mkdir(parents=True, exist_ok=True)
        (lcpp / rel).write_text(rel)
    (root / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 9.9.9\n")
    head = root / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    head.parent.mkdir(parents=True)
    head.write_text("0123456789abcdef0123456789abcdef01234567\n")
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    dest = tmp_path / "src" / "llama.cpp"
    meta = lcb.reduce_llama_source(sdist, dest)
    assert meta["llama_cpp_commit_short"] == "0123456" and "9.9.9" in meta["origin"]
    assert lcb.llama_version(dest) == meta
    for rel in keep:
        assert (dest / rel).read_text() == rel
    for rel in drop:
        assert not (dest / rel).exists(), rel
    assert "add_subdirectory(llama-bench)" in (dest / "tools" / "CMakeLists.txt").read_text()
    assert "miniaudio)" not in (dest / "vendor" / "CMakeLists.txt").read_text()
    with pytest.raises(FileExistsError):
        lcb.reduce_llama_source(sdist, dest)


def test_cli_rejects_a_directory_without_llama_cpp(tmp_path, capsys):
    assert lcb.main(["--llama-src", str(tmp_path)]) == 2


# --- with llama.cpp (skipped without it) ----------------------------------------------------

def test_llama_bench_knows_the_flags():
    exe = _built_llama_bench()
    if exe is None:
        pytest.skip("no built llama-bench (set LLAMA_BENCH or build into /tmp/llama-build-<backend>)")
    import subprocess

    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    for flag in ("-ncmoe, --n-cpu-moe", "-d, --n-depth", "-ngl, --n-gpu-layers", "-o, --output", "-r, --repetitions",
                 "-t, --threads", "-p, --n-prompt", "-n, --n-gen"):
        assert flag in text


@pytest.mark.slow
def test_small_model_converts(tmp_path):
    if not (LLAMA_SRC / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"no llama.cpp source at {LLAMA_SRC}")
    pytest.importorskip("safetensors")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(lcb.DEMO_MODEL_DIR))
    shape = lcb.model_shape(2, **lcb.SMALL, vocab=vocab)
    gguf, info = lcb.prepare_gguf(LLAMA_SRC, tmp_path, shape, tmp_path, fresh=True)
    assert gguf.read_bytes()[:4] == b"GGUF"
    assert info["expert_bytes_per_layer"] == lcb.expert_bytes_per_layer(16, 256, 64)
    assert not any(p.name.endswith("-hf") for p in tmp_path.iterdir())       # the checkpoint is deleted
    assert lcb.prepare_gguf(LLAMA_SRC, tmp_path, shape, tmp_path)[0] == gguf  # and the GGUF reused
