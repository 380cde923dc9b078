"""llama.cpp beside specmoe on the same random-weight model, same machine.

    python benchmarks/llama_cpp_side_by_side.py --llama-src DIR [--layers 8] [--build] [--bench]

DIR is llama.cpp's source as the `llama-cpp-python` source distribution ships it
(`pip download --no-binary :all: --no-deps llama-cpp-python`, then `vendor/llama.cpp`;
it stays out of this repository). Steps:

1. `--build`: build only the `llama-bench` target with CUDA for sm_90 (tests, examples,
   server and the web UI off).
2. always: write Qwen3-30B-A3B's shape with `--layers` layers and random bf16 weights as
   a Hugging Face checkpoint, and convert it to GGUF bf16 with llama.cpp's own converter.
   The converter refuses a BPE pre-tokenizer it does not know; the weights are random,
   so a known one ("qwen2") is named instead.
3. `--bench`: `llama-bench` at every `-ncmoe` (layers whose experts stay on the CPU),
   batch 1, a `--prompt`-token prompt and `--decode` generated tokens, reporting the
   expert bytes each setting keeps on the GPU; results to benchmarks/results/llama_cpp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specmoe.paths import DEMO_MODEL_DIR, REPO_ROOT  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"


def build(src: Path, jobs: int) -> Path:
    build_dir = src / "build-bench"
    flags = ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_BUILD_WEBUI=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *flags], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-bench", "-j", str(jobs)], check=True)
    return next(build_dir.rglob("llama-bench"))


def write_random_checkpoint(out: Path, layers: int, hidden: int) -> dict:
    """Model A's shape (benchmarks/runtime_decode.py) with random bf16 weights, plus the demo
    tokenizer (the converter needs one; its vocabulary size is the model's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.runtime_decode import qwen3_30b_shape

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    shape = qwen3_30b_shape(layers, hidden)
    shape.vocab_size = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shape, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.02)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    return {"layers": layers, "expert_bytes": expert_bytes, "expert_bytes_per_layer": expert_bytes // layers}


_CONVERT = """
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(src: Path, hf_dir: Path, gguf: Path) -> None:
    """llama.cpp's converter, told the pre-tokenizer's name (it refuses unknown ones)."""
    subprocess.run([sys.executable, "-c", _CONVERT, str(src), str(hf_dir), "--outtype", "bf16", "--outfile", str(gguf)],
                   check=True)


def bench(llama_bench: Path, gguf: Path, layers: int, prompt: int, decode: int, threads: int) -> list[dict]:
    rows = []
    for ncmoe in range(layers + 1):
        out = subprocess.run([str(llama_bench), "-m", str(gguf), "-ngl", "99", "-ncmoe", str(ncmoe), "-p", str(prompt),
                              "-n", str(decode), "-t", str(threads), "-b", "1" if prompt == 0 else "512", "-o", "json",
                              "-r", "3"], check=True, capture_output=True, text=True)
        for r in json.loads(out.stdout):
            r["ncmoe"] = ncmoe
            rows.append(r)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-src", required=True, type=Path)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--build", action="store_true")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "specmoe-llama")
    args = p.parse_args()
    if not (args.llama_src / "convert_hf_to_gguf.py").is_file():
        print(f"llama_cpp_side_by_side: error: {args.llama_src} is not llama.cpp's source", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    hf_dir, gguf = args.work / f"model-{args.layers}L", args.work / f"model-{args.layers}L-bf16.gguf"
    info = write_random_checkpoint(hf_dir, args.layers, args.hidden)
    convert(args.llama_src, hf_dir, gguf)
    info["gguf_bytes"] = gguf.stat().st_size
    print(json.dumps(info), flush=True)
    if args.bench:
        exe = build(args.llama_src, args.jobs) if args.build else next(args.llama_src.rglob("llama-bench"))
        rows = bench(exe, gguf, args.layers, args.prompt, args.decode, args.threads)
        for r in rows:
            r["expert_bytes_on_gpu"] = info["expert_bytes_per_layer"] * (args.layers - r["ncmoe"])
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "llama_cpp.json").write_text(json.dumps({"model": info, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
