"""llama.cpp beside specmoe on the same random-weight model, same machine.

    python benchmarks/llama_cpp_side_by_side.py --llama-src .llama_src/llama.cpp --build --bench --layers 8 \\
        [--out DIR]

DIR (default benchmarks/results) receives llama_cpp.json, llama_cpp.md and logs/.
`--llama-src` is llama.cpp's source as the `llama-cpp-python` source distribution ships
it, reduced to what llama-bench and the converter need (about 15 MB), with a SOURCE.json
naming the llama.cpp commit; it stays out of this repository. To make it:

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/lcp
    python benchmarks/llama_cpp_side_by_side.py --llama-src .llama_src/llama.cpp \\
        --from-sdist /tmp/lcp/llama_cpp_python-0.3.36.tar.gz

One call then does:

1. `--build` (in a thread, beside step 2): configure and build only the `llama-bench`
   target, CUDA for sm_90 by default (`--backend cpu` for a CPU-only build), in
   `--build-dir` (default /tmp/llama-build-<backend>, outside the source tree); skipped
   when that directory already holds a build of the same source and flags.
2. always: write model A's shape (Qwen3-30B-A3B: 128 experts, top-8, hidden 2048, expert
   hidden 768, bf16) with `--layers` layers and random weights as a Hugging Face
   checkpoint in `--work` (default /tmp/specmoe-llama), convert it to GGUF bf16 with
   llama.cpp's own converter, delete the checkpoint. A GGUF already converted for the
   same shape is reused. With 8 layers both are 11.2 GB (22.4 GB on disk at the peak).
   The converter refuses a BPE pre-tokenizer it does not know; the weights are random,
   so a known one ("qwen2") is named instead. The vocabulary is the demo model's
   tokenizer padded to the shape's (151936, as model A's).
3. `--bench`: `llama-bench` once per `--ncmoe` setting (layers whose experts stay in CPU
   memory, llama.cpp's `--n-cpu-moe`), all other weights on the GPU (`-ngl 99`), batch 1
   decode of `--decode` tokens after a `--depth`-token context, `--threads` CPU threads.
   Every run is time-boxed; results are written after each setting, a failed setting
   is recorded with the tail of its stderr and does not stop the others; settings that
   no longer fit in `--deadline` seconds (counted from the start) are recorded as skipped.
   The default deadline (560 s) keeps the whole job inside a 10-minute call; the build
   is stopped at it too. Each phase prints its elapsed time.

Checked against llama.cpp 0c1e570 (llama-cpp-python 0.3.36): its llama-bench has
`-ncmoe/--n-cpu-moe`, `-d/--n-depth` and `-o json`; `-fa` stays at its default (auto).

The results' rows (`system`, `setting`, `layers`, `gpu_expert_bytes`, `ms_per_token`,
`ms_per_layer`, ...) are the common format of this comparison: `merge_rows` adds rows of
another system to the same file. ms_per_layer is ms_per_token / layers (so it includes
each layer's share of the embedding and the output head).

`--small` shrinks the shape (hidden 256, 16 experts, top-4, expert hidden 64) for a
check of the whole flow on any machine, e.g. with a CPU-only build:

    python benchmarks/llama_cpp_side_by_side.py --llama-src .llama_src/llama.cpp --backend cpu --build \\
        --bench --small --layers 2 --ncmoe 0,1,2 --depth 64 --decode 16 --threads 2 --jobs 2 --out /tmp/llama-check
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specmoe.paths import DEMO_MODEL_DIR, REPO_ROOT  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
SYSTEM = "llama.cpp"
PRE_TOKENIZER = "qwen2"
# Model A (benchmarks/runtime_decode.py: qwen3_30b_shape) and the small check shape.
MODEL_A = {"hidden": 2048, "experts": 128, "top_k": 8, "expert_hidden": 768}
SMALL = {"hidden": 256, "experts": 16, "top_k": 4, "expert_hidden": 64}
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --- bytes ------------------------------------------------------------------------------

def expert_bytes_per_layer(experts: int = MODEL_A["experts"], hidden: int = MODEL_A["hidden"],
                           expert_hidden: int = MODEL_A["expert_hidden"], bytes_per_param: int = 2) -> int:
    """Bytes of one layer's routed experts (gate, up and down projections)."""
    return 3 * experts * hidden * expert_hidden * bytes_per_param


def expert_bytes_on_gpu(ncmoe: int, layers: int, experts: int = MODEL_A["experts"], hidden: int = MODEL_A["hidden"],
                        expert_hidden: int = MODEL_A["expert_hidden"], bytes_per_param: int = 2) -> int:
    """Expert bytes llama.cpp keeps on the GPU with `-ngl 99 --n-cpu-moe ncmoe`: the experts of
    the first `ncmoe` layers stay in CPU memory, those of the other layers go to the GPU."""
    if ncmoe < 0 or layers < 0:
        raise ValueError(f"ncmoe and layers must be >= 0, got {ncmoe}, {layers}")
    return (layers - min(ncmoe, layers)) * expert_bytes_per_layer(experts, hidden, expert_hidden, bytes_per_param)


def default_ncmoe(layers: int) -> list[int]:
    """0, a quarter, half, three quarters and all of the layers' experts in CPU memory."""
    return sorted({round(layers * q / 4) for q in range(5)})


def run_order(settings: list[int]) -> list[int]:
    """Both ends first, then the middle ones from the centre out: if time runs out, the range
    is still covered."""
    s = sorted(set(settings))
    if len(s) <= 2:
        return s
    centre = (s[0] + s[-1]) / 2
    return [s[0], s[-1], *sorted(s[1:-1], key=lambda x: abs(x - centre))]


# --- llama.cpp's source and build ---------------------------------------------------------

def llama_version(src: Path) -> dict:
    """The llama.cpp commit of the source: SOURCE.json beside its CMakeLists.txt, else git."""
    meta = src / "SOURCE.json"
    if meta.is_file():
        return json.loads(meta.read_text())
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, env={**os.environ, "GIT_CEILING_DIRECTORIES": str(src.resolve().parent)})
        c = commit.stdout.strip()
        return {"origin": str(src), "llama_cpp_commit": c, "llama_cpp_commit_short": c[:7]}
    except (OSError, subprocess.CalledProcessError):
        return {"origin": str(src), "llama_cpp_commit": "unknown", "llama_cpp_commit_short": "unknown"}


# What llama-bench (CPU and CUDA backends) and the converter (Qwen3-MoE) need of llama.cpp's tree.
_KEEP = ["CMakeLists.txt", "LICENSE", "licenses", "cmake", "include", "src", "common", "vendor", "gguf-py",
         "convert_hf_to_gguf.py", "conversion/__init__.py", "conversion/base.py", "conversion/qwen.py",
         "ggml/CMakeLists.txt", "ggml/cmake", "ggml/include", "ggml/src", "tools/llama-bench"]
_DROP = ["vendor/miniaudio", "vendor/stb", "vendor/hash", "gguf-py/examples", "gguf-py/tests", "gguf-py/gguf/scripts",
         "ggml/src/ggml-cpu/spacemit", "ggml/src/ggml-cpu/kleidiai",
         *(f"ggml/src/ggml-cpu/arch/{a}" for a in ("loongarch", "powerpc", "riscv", "s390", "wasm"))]
_TOOLS_CMAKE = """# Reduced from the original: only llama-bench is kept in this copy of the source.

find_package(Threads REQUIRED)

llama_add_compile_flags()

add_subdirectory(llama-bench)
"""
_VENDOR_CMAKE = """# Reduced from the original: hash, miniaudio and stb (used only by tools/mtmd) are not kept.
add_subdirectory(nlohmann)
add_subdirectory(sheredom)

# only used by common
if (LLAMA_BUILD_COMMON)
    add_subdirectory(cpp-httplib)
endif()
"""


def reduce_llama_source(sdist: Path, dest: Path) -> dict:
    """llama.cpp's source from a llama-cpp-python source distribution (the .tar.gz that
    `pip download --no-binary :all: --no-deps llama-cpp-python==X` saves), reduced to what
    this benchmark needs (about 15 MB: llama-bench with the CPU and CUDA backends, the
    converter for Qwen3-MoE; no docs, models, tests, examples, other backends or tools),
    written to dest with a SOURCE.json naming the commit. Returns that SOURCE.json."""
    import tarfile

    dest = dest.resolve()
    if dest.exists():
        raise FileExistsError(f"{dest} exists")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name or "/.git/modules/" in m.name
                       or m.name.endswith("/PKG-INFO")]
            try:
                tar.extractall(tmp, members=members, filter="data")
            except TypeError:       # Python without extraction filters
                tar.extractall(tmp, members=members)
        root = next(Path(tmp).iterdir())
        lcpp = root / "vendor" / "llama.cpp"
        for rel in _KEEP:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (lcpp / rel).is_dir() else shutil.copy2)(lcpp / rel, dest / rel)
        for rel in _DROP:
            shutil.rmtree(dest / rel, ignore_errors=True)
        for d in (dest / "ggml" / "src").iterdir():
            if d.is_dir() and d.name.startswith("ggml-") and d.name not in ("ggml-cpu", "ggml-cuda"):
                shutil.rmtree(d)
        for d in list(dest.rglob("__pycache__")):
            shutil.rmtree(d, ignore_errors=True)
        (dest / "tools" / "CMakeLists.txt").write_text(_TOOLS_CMAKE)
        (dest / "vendor" / "CMakeLists.txt").write_text(_VENDOR_CMAKE)
        version = next((line.split(":", 1)[1].strip() for line in (root / "PKG-INFO").read_text().splitlines()
                        if line.startswith("Version:")), "?")
        head = root / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
        commit = head.read_text().strip() if head.is_file() else "unknown"
    meta = {"origin": f"llama-cpp-python {version} source distribution (PyPI), vendor/llama.cpp",
            "llama_cpp_commit": commit, "llama_cpp_commit_short": commit[:7],
            "reduced": "kept only what llama-bench (CPU, CUDA backends) and convert_hf_to_gguf.py for Qwen3-MoE "
                       "need; tools/CMakeLists.txt and vendor/CMakeLists.txt reduced to those"}
    (dest / "SOURCE.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def cuda_compiler() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in (os.environ.get("CUDACXX"), os.environ.get("CUDA_HOME", "") + "/bin/nvcc",
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def cmake_flags(backend: str, commit: str = "unknown", cuda_arch: str = "90", nvcc: str | None = None) -> list[str]:
    """Only what llama-bench needs: no tests, examples, server, web UI, app, TLS."""
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CCACHE=OFF", "-DLLAMA_BUILD_COMMON=ON",
             "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF",
             f"-DLLAMA_BUILD_COMMIT={commit}"]
    if backend == "cuda":
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}", "-DGGML_CUDA_NCCL=OFF"]
        if nvcc:
            flags.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    elif backend == "cpu":
        flags.append("-DGGML_CUDA=OFF")
    else:
        raise ValueError(f"backend must be cuda or cpu, not {backend!r}")
    return flags


def bench_exe(build_dir: Path) -> Path:
    return build_dir / "bin" / "llama-bench"


def _run_logged(cmd: list[str], log, env: dict, timeout: float | None) -> int:
    """Runs cmd with its output appended to the open file `log`; on timeout kills its whole
    process group (make/ninja and the compilers under it) and returns -9."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _CHILDREN.add(proc)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        log.write(f"\n(killed after {timeout:.0f}s)\n")
        return -9
    finally:
        _CHILDREN.discard(proc)


_CHILDREN: set[subprocess.Popen] = set()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM first (ninja then stops the compilers it started in their own process groups),
    SIGKILL for whatever is left of the group after a few seconds."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:
                time.sleep(0.5)     # the group's other members (ninja) finish their cleanup
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            return
        except subprocess.TimeoutExpired:
            continue


def _stop_children() -> None:
    """Stops a build still running when the job ends (its compilers run in its own group)."""
    for proc in list(_CHILDREN):
        if proc.poll() is None:
            log(f"stopping {proc.args[0]} {proc.args[1] if len(proc.args) > 1 else ''} (pid {proc.pid})")
            _kill_group(proc)


def build(src: Path, build_dir: Path, backend: str = "cuda", jobs: int = os.cpu_count() or 2,
          log_file: Path | None = None, cuda_arch: str = "90", timeout: float | None = None) -> Path:
    """Configure and build the `llama-bench` target in build_dir; returns the executable.
    Skipped when build_dir holds a build of the same source commit and flags. Raises
    RuntimeError with the tail of the log when a step fails or `timeout` seconds pass."""
    src, build_dir = src.resolve(), build_dir.resolve()
    commit = llama_version(src).get("llama_cpp_commit_short", "unknown")
    nvcc = cuda_compiler() if backend == "cuda" else None
    if backend == "cuda" and nvcc is None:
        raise RuntimeError("no CUDA compiler: nvcc is neither on PATH nor in $CUDA_HOME/bin or /usr/local/cuda/bin")
    flags = cmake_flags(backend, commit, cuda_arch, nvcc)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    stamp = build_dir / "specmoe-build.json"
    key = {"src": str(src), "commit": commit, "flags": flags, "generator": gen}
    exe = bench_exe(build_dir)
    if exe.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == key:
        log(f"build: {exe} is already built from the same source and flags; skipped")
        return exe
    build_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_file or build_dir / "specmoe-build.log"
    # git must not find an enclosing repository (this one) and report its commit as llama.cpp's
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(src.parent)}
    steps = [("configure", ["cmake", "-S", str(src), "-B", str(build_dir), *gen, *flags]),
             ("compile", ["cmake", "--build", str(build_dir), "--target", "llama-bench", "-j", str(jobs)])]
    end = None if timeout is None else time.perf_counter() + timeout
    with open(log_file, "w") as f:
        for name, cmd in steps:
            t0 = time.perf_counter()
            log(f"build: {name}: {shlex.join(cmd)}")
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            rc = _run_logged(cmd, f, env, None if end is None else max(1.0, end - t0))
            if rc != 0:
                f.flush()
                raise RuntimeError(f"build: {name} failed (exit {rc}); last lines of {log_file}:\n"
                                   f"{tail(Path(log_file).read_text(errors='replace'), 40)}")
            log(f"build: {name} done in {time.perf_counter() - t0:.1f}s")
    if not exe.is_file():
        raise RuntimeError(f"build: finished but {exe} is missing")
    stamp.write_text(json.dumps(key, indent=1))
    return exe


# --- the model ------------------------------------------------------------------------------

def model_shape(layers: int, hidden: int = MODEL_A["hidden"], experts: int = MODEL_A["experts"],
                top_k: int = MODEL_A["top_k"], expert_hidden: int = MODEL_A["expert_hidden"], vocab: int | None = None):
    """benchmarks/runtime_decode.py's qwen3_30b_shape (model A), with its expert count, top-k
    and expert hidden size set (model A's by default) and a vocabulary of at least `vocab`."""
    from benchmarks.runtime_decode import qwen3_30b_shape

    shape = qwen3_30b_shape(layers, hidden)
    shape.num_experts, shape.num_experts_per_tok, shape.moe_intermediate_size = experts, top_k, expert_hidden
    if vocab is not None:
        shape.vocab_size = max(shape.vocab_size, vocab)
    return shape


def write_random_checkpoint(out: Path, shape, tokenizer_dir: Path = DEMO_MODEL_DIR, seed: int = 0) -> dict:
    """A Hugging Face checkpoint of `shape` with random bf16 weights (norms 1, the rest
    N(0, 0.02)), one safetensors file per layer, written tensor by tensor without building
    the model (random numbers on the GPU when there is one), plus the tokenizer of
    tokenizer_dir. Returns byte counts."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tok) > shape.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the vocabulary ({shape.vocab_size})")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(shape, dtype=torch.bfloat16)
    names = {n: (tuple(t.shape), t.dtype) for n, t in meta.state_dict().items()}
    need = sum(t.numel() * t.element_size() for t in meta.state_dict().values())
    del meta
    free = shutil.disk_usage(out).free
    if free < 2 * need + 2**30:     # the checkpoint and the GGUF are on disk together for a while
        raise RuntimeError(f"{out} has {free / 1e9:.1f} GB free; the checkpoint and its GGUF need "
                           f"{2 * need / 1e9:.1f} GB (choose another --work)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)

    def part_of(name: str) -> int:
        parts = name.split(".")
        return int(parts[2]) + 1 if name.startswith("model.layers.") else 0

    n_parts = shape.num_hidden_layers + 1
    weight_map, total, experts = {}, 0, 0
    for part in range(n_parts):
        tensors = {}
        for name, (dims, dtype) in names.items():
            if part_of(name) != part:
                continue
            if "norm" in name:
                t = torch.ones(dims, dtype=dtype)
            else:
                t = torch.empty(dims, dtype=dtype, device=device).normal_(0, 0.02, generator=gen).cpu()
            tensors[name] = t
            nbytes = t.numel() * t.element_size()
            total += nbytes
            experts += nbytes if ".experts." in name else 0
        fname = f"model-{part + 1:05d}-of-{n_parts:05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    shape.architectures = ["Qwen3MoeForCausalLM"]
    shape.save_pretrained(out)
    tok.save_pretrained(out)
    layers = shape.num_hidden_layers
    return {"layers": layers, "hidden": shape.hidden_size, "experts": shape.num_experts,
            "top_k": shape.num_experts_per_tok, "expert_hidden": shape.moe_intermediate_size,
            "vocab": shape.vocab_size, "checkpoint_bytes": total, "expert_bytes": experts,
            "expert_bytes_per_layer": experts // layers}


_CONVERT = """
import runpy, sys
src, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(src: Path, hf_dir: Path, gguf: Path, log_file: Path | None = None, timeout: float | None = None) -> None:
    """llama.cpp's converter (its own gguf-py first on the path), told the pre-tokenizer's
    name (it refuses unknown ones). Raises RuntimeError with the tail of its output."""
    cmd = [sys.executable, "-c", _CONVERT, str(src.resolve()), PRE_TOKENIZER, str(hf_dir), "--outtype", "bf16",
           "--outfile", str(gguf)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": "1"},
                             timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise RuntimeError(f"convert: no result within {timeout:.0f}s\n{tail(err, 20)}") from None
    if log_file is not None:
        log_file.write_text(f"$ {shlex.join(cmd)}\n{out.stdout}\n{out.stderr}")
    if out.returncode != 0 or not gguf.is_file():
        raise RuntimeError(f"convert failed (exit {out.returncode}):\n{tail(out.stdout + out.stderr, 40)}")


def prepare_gguf(src: Path, work: Path, shape, log_dir: Path | None = None, fresh: bool = False,
                 timeout: float | None = None) -> tuple[Path, dict]:
    """The GGUF of `shape` in `work` (reused when already converted), with its byte counts."""
    name = (f"qwen3moe-{shape.num_hidden_layers}L-h{shape.hidden_size}-e{shape.num_experts}"
            f"-k{shape.num_experts_per_tok}-i{shape.moe_intermediate_size}-v{shape.vocab_size}-bf16")
    gguf, done = work / f"{name}.gguf", work / f"{name}.json"
    if not fresh and gguf.is_file() and done.is_file():
        info = json.loads(done.read_text())
        log(f"model: reusing {gguf} ({info['gguf_bytes'] / 1e9:.2f} GB)")
        return gguf, info
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = work / f"{name}-hf"
    shutil.rmtree(hf_dir, ignore_errors=True)
    gguf.unlink(missing_ok=True)
    free = shutil.disk_usage(work).free
    log(f"model: writing a random checkpoint to {hf_dir} ({free / 1e9:.0f} GB free there)")
    t0 = time.perf_counter()
    info = write_random_checkpoint(hf_dir, shape)
    log(f"model: checkpoint written in {time.perf_counter() - t0:.1f}s ({info['checkpoint_bytes'] / 1e9:.2f} GB)")
    t0 = time.perf_counter()
    try:
        convert(src, hf_dir, gguf, log_dir / "convert.log" if log_dir else None, timeout)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    info["gguf_bytes"] = gguf.stat().st_size
    info["convert_s"] = round(time.perf_counter() - t0, 1)
    log(f"model: converted to {gguf} in {info['convert_s']:.1f}s ({info['gguf_bytes'] / 1e9:.2f} GB)")
    done.write_text(json.dumps(info, indent=1))
    return gguf, info


# --- llama-bench ------------------------------------------------------------------------------

def bench_command(exe: Path, gguf: Path, ncmoe: int, depth: int = 1024, decode: int = 64, threads: int = 16,
                  reps: int = 3, ngl: int = 99, extra: list[str] | None = None) -> list[str]:
    """One llama-bench run: batch 1 decode of `decode` tokens after a `depth`-token context
    (-d, filled before each timed repetition and not timed), the experts of the first
    `ncmoe` layers in CPU memory, every other weight on the GPU, JSON to stdout."""
    cmd = [str(exe), "-m", str(gguf), "-ngl", str(ngl), "-ncmoe", str(ncmoe), "-p", "0", "-n", str(decode),
           "-d", str(depth), "-t", str(threads), "-r", str(reps), "-o", "json"]
    return cmd + list(extra or [])


def parse_bench_json(stdout: str) -> list[dict]:
    """llama-bench's `-o json` output: a JSON list of test records (one per test). Text
    around the list (if any) is ignored."""
    start, end = stdout.find("["), stdout.rfind("]")
    if start < 0 or end < start:
        raise ValueError(f"no JSON list in llama-bench's output: {stdout[:200]!r}")
    records = json.loads(stdout[start:end + 1])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("llama-bench's JSON is not a list of records")
    return records


def row_from_record(rec: dict, ncmoe: int, layers: int, gpu_expert_bytes: int) -> dict:
    """A results row from a llama-bench decode record (n_gen > 0). ms_per_token is the
    median over repetitions of (time of the repetition / tokens decoded)."""
    n_gen = int(rec["n_gen"])
    if n_gen <= 0:
        raise ValueError("not a decode record (n_gen is 0)")
    samples = rec.get("samples_ns") or [rec["avg_ns"]]
    ms_per_token = statistics.median(samples) / n_gen / 1e6
    return {"system": SYSTEM, "setting": f"ncmoe={ncmoe}", "ncmoe": ncmoe, "layers": layers,
            "gpu_expert_layers": layers - min(ncmoe, layers), "gpu_expert_bytes": gpu_expert_bytes,
            "context": int(rec.get("n_depth", 0)) + int(rec.get("n_prompt", 0)), "decode_tokens": n_gen,
            "threads": rec.get("n_threads"), "tokens_per_s": round(1e3 / ms_per_token, 3),
            "ms_per_token": round(ms_per_token, 4), "ms_per_layer": round(ms_per_token / layers, 4),
            "llama_bench_avg_ts": rec.get("avg_ts"), "llama_bench_stddev_ts": rec.get("stddev_ts"),
            "repetitions": len(samples), "status": "ok"}


def run_llama_bench(exe: Path, gguf: Path, ncmoe: int, layers: int, *, depth: int = 1024, decode: int = 64,
                    threads: int = 16, reps: int = 3, timeout: float = 150, gpu_expert_bytes: int | None = None,
                    extra: list[str] | None = None, log_file: Path | None = None) -> dict:
    """Run llama-bench at one `-ncmoe` setting; returns a results row. Never raises for a
    failed run: the row has status "failed" or "timeout" and the tail of stderr."""
    cmd = bench_command(exe, gguf, ncmoe, depth, decode, threads, reps, extra=extra)
    row = {"system": SYSTEM, "setting": f"ncmoe={ncmoe}", "ncmoe": ncmoe, "layers": layers,
           "gpu_expert_layers": layers - min(ncmoe, layers), "gpu_expert_bytes": gpu_expert_bytes,
           "context": depth, "decode_tokens": decode, "threads": threads, "command": shlex.join(cmd)}
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        row.update(status="timeout", error=f"no result within {timeout:.0f}s\n{tail(err)}",
                   wall_s=round(time.perf_counter() - t0, 1))
        if log_file is not None:
            log_file.write_text(f"$ {shlex.join(cmd)}\n(timeout)\n{err}")
        return row
    except OSError as e:
        row.update(status="failed", error=f"{type(e).__name__}: {e}", wall_s=0.0)
        return row
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    if log_file is not None:
        log_file.write_text(f"$ {shlex.join(cmd)}\nexit {out.returncode}\n--- stdout\n{out.stdout}\n"
                            f"--- stderr\n{out.stderr}")
    if out.returncode != 0:
        row.update(status="failed", error=f"exit {out.returncode}\n{tail(out.stderr)}")
        return row
    try:
        recs = [r for r in parse_bench_json(out.stdout) if int(r.get("n_gen", 0)) > 0]
        if not recs:
            raise ValueError("no decode record in llama-bench's output")
        parsed = row_from_record(recs[0], ncmoe, layers, gpu_expert_bytes)
    except (ValueError, KeyError, TypeError) as e:
        row.update(status="failed", error=f"unreadable output: {e}\n{tail(out.stdout, 10)}\n{tail(out.stderr, 10)}")
        return row
    row.update({k: v for k, v in parsed.items() if v is not None or k not in row})
    row["llama_bench"] = {k: recs[0].get(k) for k in ("build_commit", "build_number", "backends", "gpu_info",
                                                       "cpu_info", "model_type", "model_size", "model_n_params",
                                                       "n_batch", "n_ubatch", "n_gpu_layers", "n_cpu_moe",
                                                       "flash_attn", "type_k", "type_v", "use_mmap",
                                                       "samples_ns") if k in recs[0]}
    return row


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 or n == 0 else f"{n / 1e6:.2f} MB"


def summary_line(row: dict) -> str:
    head = (f"{row['system']} {row['setting']}: {row.get('gpu_expert_layers')}/{row['layers']} layers' experts "
            f"on the GPU ({fmt_bytes(row.get('gpu_expert_bytes'))})")
    if row.get("status") != "ok":
        first = (row.get("error") or "").splitlines()
        return f"{head}: {row.get('status')}: {first[0] if first else ''}"
    return (f"{head}: {row['tokens_per_s']:.1f} tokens/s, {row['ms_per_token']:.3f} ms/token, "
            f"{row['ms_per_layer']:.4f} ms/layer")


# --- results ----------------------------------------------------------------------------------

def host_floor_ms(doc: dict, row: dict) -> float | None:
    """A row's host floor (see markdown): specmoe's rows carry theirs; llama.cpp's CPU reads
    top-k experts in each layer whose experts stay in CPU memory."""
    if row.get("floor_ms") is not None:
        return row["floor_ms"]
    rate = (doc.get("host_limits") or {}).get("cpu_expert_bytes_per_s")
    m = doc.get("model") or {}
    if row.get("system") != SYSTEM or not rate or not m.get("experts") or row.get("gpu_expert_layers") is None:
        return None
    per_expert = m["expert_bytes_per_layer"] / m["experts"]
    cpu_layers = row["layers"] - row["gpu_expert_layers"]
    return 1e3 * cpu_layers * m["top_k"] * per_expert / rate


def markdown(doc: dict) -> str:
    lines = ["# llama.cpp beside specmoe: decode with experts partly in CPU memory", ""]
    m, v, b = doc.get("model", {}), doc.get("llama_cpp", {}), doc.get("bench", {})
    if m:
        lines.append(f"Model: Qwen3-MoE shape, {m.get('layers')} layers, hidden {m.get('hidden')}, "
                     f"{m.get('experts')} experts (top-{m.get('top_k')}), expert hidden {m.get('expert_hidden')}, "
                     f"vocabulary {m.get('vocab')}, bf16, random weights; "
                     f"{m.get('expert_bytes_per_layer', 0) / 1e9:.3f} GB of experts per layer; "
                     f"GGUF {m.get('gguf_bytes', 0) / 1e9:.2f} GB.")
    if v:
        lines.append(f"llama.cpp {v.get('llama_cpp_commit')} ({v.get('origin')}), "
                     f"{doc.get('build', {}).get('backend')} build.")
    machine = next((r["llama_bench"] for r in doc.get("rows", []) if r.get("llama_bench")), None)
    if machine:
        lines.append(f"Machine: {machine.get('gpu_info') or 'no GPU'}; {machine.get('cpu_info')}.")
    if b:
        lines.append(f"llama-bench: batch 1 decode of {b.get('decode')} tokens after a {b.get('depth')}-token context "
                     f"(`-p 0 -n {b.get('decode')} -d {b.get('depth')}`), `-ngl {b.get('ngl')}`, "
                     f"`-t {b.get('threads')}`, median of `-r {b.get('reps')}` repetitions.")
    if doc.get("command"):
        lines.append(f"Command: `{doc['command']}`")
    for system, command in sorted(doc.get("commands", {}).items()):
        lines.append(f"Command for the {system} rows: `{command}`")
    limits = doc.get("host_limits") or {}
    rate = limits.get("cpu_expert_bytes_per_s")
    lines += ["", "`setting` is each system's own knob; for llama.cpp it is `--n-cpu-moe N`: the experts of the "
              "first N layers stay in CPU memory, all else is on the GPU. ms/layer = ms/token / layers."]
    if rate:
        lines.append(f"Host floor: the expert bytes the CPU reads per token over the CPU expert rate measured with "
                     f"these rows ({rate / 1e9:.1f} GB/s, specmoe's kernels, 8 experts per call), and for specmoe "
                     "the larger of that and its bytes over PCIe (copied or read in place) over the copy bandwidth; "
                     "GPU work is not in it.")
    lines += ["", "| system | setting | layers | layers' experts on GPU | expert GB on GPU | context | tokens/s "
              "| ms/token | ms/layer | host floor ms | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) else "-"

    rows = sorted(doc.get("rows", []), key=lambda r: (r.get("system", ""), r.get("layers", 0),
                                                      -(r.get("gpu_expert_bytes") or 0), r.get("setting", "")))
    for r in rows:
        gb = r.get("gpu_expert_bytes")
        lines.append(f"| {r.get('system')} | {r.get('setting')} | {r.get('layers')} | "
                     f"{r.get('gpu_expert_layers', '-')} | {f(gb / 1e9 if gb is not None else None, '.2f')} | "
                     f"{r.get('context', '-')} | {f(r.get('tokens_per_s'), '.1f')} | "
                     f"{f(r.get('ms_per_token'), '.3f')} | {f(r.get('ms_per_layer'), '.4f')} | "
                     f"{f(host_floor_ms(doc, r), '.2f')} | {r.get('status', 'ok')} |")
    notes = [f"- {r.get('system')} {r.get('setting')}: {r.get('status')}: {(r.get('error') or '').splitlines()[0]}"
             for r in rows if r.get("status", "ok") != "ok" and r.get("error")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    """ms per token against the expert bytes on the GPU: llama.cpp and each of our modes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    for r in doc.get("rows", []):
        if r.get("status", "ok") != "ok" or r.get("ms_per_token") is None:
            continue
        name = r["system"] if r["system"] != "specmoe" else "specmoe " + r["setting"].split(",")[0]
        lines.setdefault(name, []).append((r["gpu_expert_bytes"] / 1e9, r["ms_per_token"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, pts) in enumerate(sorted(lines.items())):
        pts.sort()
        ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="osD^v<>"[i % 7],
                linestyle=["-", "--", ":", "-."][i % 4], label=name, linewidth=2.5 if name == "llama.cpp" else 1.5)
    ax.set_xlabel("expert bytes on the GPU (GB)")
    ax.set_ylabel("ms per token (median)")
    ax.set_title("decode, batch 1, experts partly in CPU memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out_dir: Path, doc: dict, name: str = "llama_cpp") -> Path:
    """Writes name.json, name.md and name.png; rows of other systems already in name.json are kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    ours = {r.get("system") for r in doc.get("rows", [])}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            kept = [r for r in old.get("rows", []) if r.get("system") not in ours]
            commands = {k: v for k, v in old.get("commands", {}).items() if k not in ours}
            doc = {**doc, "rows": kept + doc["rows"], **({"commands": commands} if commands else {})}
            if "host_limits" in old and "host_limits" not in doc:   # measured with the kept rows
                doc["host_limits"] = old["host_limits"]
        except (ValueError, AttributeError):
            pass
    path.write_text(json.dumps(doc, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(doc))
    plot(doc, path.with_suffix(".png"))
    return path


def merge_rows(path: Path, rows: list[dict], command: str | None = None, host_limits: dict | None = None) -> dict:
    """Adds rows (any system, the row format above) to a results JSON: a row with the same
    system, setting and layers replaces the old one. Rewrites the JSON, its .md and its plot.
    `host_limits`: the host's rates measured with these rows (runtime_decode.host_limits),
    kept for the floors of every row."""
    doc = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    if host_limits:
        doc["host_limits"] = host_limits
    key = lambda r: (r.get("system"), r.get("setting"), r.get("layers"))  # noqa: E731
    new = {key(r) for r in rows}
    doc["rows"] = [r for r in doc.get("rows", []) if key(r) not in new] + list(rows)
    if command:   # what made these rows, beside the command of llama.cpp's run
        for system in {r.get("system") for r in rows}:
            doc.setdefault("commands", {})[system] = command
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(doc))
    plot(doc, path.with_suffix(".png"))
    return doc


# --- the job ------------------------------------------------------------------------------

def _skipped_row(ncmoe: int, layers: int, on_gpu: int, why: str) -> dict:
    return {"system": SYSTEM, "setting": f"ncmoe={ncmoe}", "ncmoe": ncmoe, "layers": layers,
            "gpu_expert_layers": layers - min(ncmoe, layers), "gpu_expert_bytes": on_gpu, "status": "skipped",
            "error": why}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-src", required=True, type=Path, help="llama.cpp's source (convert_hf_to_gguf.py there)")
    p.add_argument("--build", action="store_true", help="build llama-bench (skipped when already built)")
    p.add_argument("--bench", action="store_true", help="run llama-bench at every --ncmoe setting")
    p.add_argument("--backend", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--cuda-arch", default="90")
    p.add_argument("--build-dir", type=Path, help="default /tmp/llama-build-<backend>")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--small", action="store_true", help="hidden 256, 16 experts, top-4, expert hidden 64")
    p.add_argument("--ncmoe", help="comma-separated --n-cpu-moe settings (default 0, L/4, L/2, 3L/4, L)")
    p.add_argument("--depth", type=int, default=1024, help="context before the decoded tokens")
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=150, help="seconds per llama-bench run")
    p.add_argument("--deadline", type=float, default=560,
                   help="seconds from the start: the build is stopped and no run starts after it")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "specmoe-llama",
                   help="scratch for the checkpoint (deleted after conversion) and the GGUF")
    p.add_argument("--fresh", action="store_true", help="convert again even if the GGUF is there")
    p.add_argument("--out", type=Path, default=RESULTS, help="where llama_cpp.json, .md, .png and logs/ go")
    p.add_argument("--from-sdist", type=Path, metavar="TAR_GZ",
                   help="write --llama-src from a llama-cpp-python source distribution first")
    args = p.parse_args(argv)
    src = args.llama_src.resolve()
    if args.from_sdist:
        meta = reduce_llama_source(args.from_sdist, src)
        size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
        log(f"source: llama.cpp {meta['llama_cpp_commit']} written to {src} ({size / 1e6:.1f} MB)")
        if not (args.build or args.bench):
            return 0
    if not (src / "convert_hf_to_gguf.py").is_file() or not (src / "CMakeLists.txt").is_file():
        print(f"llama_cpp_side_by_side: error: {args.llama_src} is not llama.cpp's source", file=sys.stderr)
        return 2
    settings = [int(x) for x in args.ncmoe.split(",")] if args.ncmoe else default_ncmoe(args.layers)
    if any(s < 0 or s > args.layers for s in settings):
        p.error(f"--ncmoe settings must be within 0..{args.layers}")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):   # everything is local; no waiting on a network
        os.environ.setdefault(var, "1")
    build_dir = (args.build_dir or Path(tempfile.gettempdir()) / f"llama-build-{args.backend}").resolve()
    dims = SMALL if args.small else MODEL_A
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    version = llama_version(src)
    command = shlex.join(["python", *sys.argv] if argv is None else ["python", __file__, *argv])
    log(f"llama.cpp {version.get('llama_cpp_commit')} from {src}; results to {args.out}")
    phases: dict[str, float] = {}
    doc = {"command": command, "llama_cpp": version,
           "build": {"backend": args.backend, "dir": str(build_dir),
                     "cuda_arch": args.cuda_arch if args.backend == "cuda" else None,
                     "flags": cmake_flags(args.backend, version.get("llama_cpp_commit_short", "unknown"),
                                          args.cuda_arch)},
           "model": {}, "bench": {"depth": args.depth, "decode": args.decode, "threads": args.threads,
                                  "reps": args.reps, "ngl": 99, "timeout_s": args.timeout, "batch": 1},
           "phases_s": phases, "rows": []}
    on_gpu = {n: expert_bytes_on_gpu(n, args.layers, dims["experts"], dims["hidden"], dims["expert_hidden"])
              for n in settings}

    def give_up(why: str) -> int:
        log(why)
        doc["error"] = why
        doc["rows"] = [_skipped_row(n, args.layers, on_gpu[n], why.splitlines()[0]) for n in sorted(settings)]
        write_results(args.out, doc)
        return 1

    # 1. the build, in a thread beside the model's conversion
    built: dict = {}

    def do_build():
        t0 = time.perf_counter()
        try:
            built["exe"] = build(src, build_dir, args.backend, args.jobs, logs / "build.log", args.cuda_arch,
                                 timeout=max(30.0, args.deadline - (time.perf_counter() - _T0)))
        except Exception as e:  # reported by the main thread
            built["error"] = f"{type(e).__name__}: {e}"
        phases["build_s"] = round(time.perf_counter() - t0, 1)

    thread = threading.Thread(target=do_build, daemon=True) if args.build else None
    try:
        if thread:
            thread.start()

        # 2. the model
        t0 = time.perf_counter()
        try:
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(DEMO_MODEL_DIR))
            shape = model_shape(args.layers, dims["hidden"], dims["experts"], dims["top_k"], dims["expert_hidden"],
                                vocab)
            gguf, info = prepare_gguf(src, args.work, shape, logs, args.fresh,
                                      timeout=max(30.0, args.deadline - (time.perf_counter() - _T0)))
        except Exception as e:
            return give_up(f"model: FAILED: {type(e).__name__}: {e}")
        phases["model_s"] = round(time.perf_counter() - t0, 1)
        doc["model"] = info
        per_layer = expert_bytes_per_layer(dims["experts"], dims["hidden"], dims["expert_hidden"])
        if info.get("expert_bytes_per_layer") not in (None, per_layer):
            log(f"warning: the checkpoint has {info['expert_bytes_per_layer']} expert bytes per layer, "
                f"the arithmetic {per_layer}")
        print(json.dumps(info), flush=True)
        write_results(args.out, doc)

        if thread:
            log("build: waiting for it")
            thread.join()
            if "error" in built:
                return give_up(f"build: FAILED after {phases.get('build_s')}s\n{built['error']}")
            log(f"build: ready after {phases['build_s']:.1f}s: {built['exe']}")
            exe = built["exe"]
        else:
            exe = bench_exe(build_dir)
        if not args.bench:
            return 0
        if not exe.is_file():
            return give_up(f"bench: {exe} does not exist; build it with --build")
        try:
            help_out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
            for flag in ("-ncmoe", "-d,", "-o,"):
                if flag not in help_out.stdout + help_out.stderr:
                    log(f"warning: llama-bench --help does not list {flag.rstrip(',')}")
        except (OSError, subprocess.TimeoutExpired) as e:
            log(f"warning: llama-bench --help: {e}")

        # 3. the runs, each time-boxed; the results are written after each
        t_bench = time.perf_counter()
        for ncmoe in run_order(settings):
            left = args.deadline - (time.perf_counter() - _T0)
            if left < 15:
                row = _skipped_row(ncmoe, args.layers, on_gpu[ncmoe], f"out of time ({args.deadline:.0f}s deadline)")
            else:
                log(f"bench: ncmoe={ncmoe} (timeout {min(args.timeout, left):.0f}s)")
                row = run_llama_bench(exe, gguf, ncmoe, args.layers, depth=args.depth, decode=args.decode,
                                      threads=args.threads, reps=args.reps, timeout=min(args.timeout, left),
                                      gpu_expert_bytes=on_gpu[ncmoe], log_file=logs / f"llama-bench-ncmoe{ncmoe}.log")
                if row["status"] != "ok":
                    log(f"bench: ncmoe={ncmoe} {row['status']}:\n{row.get('error')}")
            doc["rows"].append(row)
            doc["rows"].sort(key=lambda r: r["ncmoe"])
            phases["bench_s"] = round(time.perf_counter() - t_bench, 1)
            write_results(args.out, doc)
            log(summary_line(row))
        phases["total_s"] = round(time.perf_counter() - _T0, 1)
        path = write_results(args.out, doc)
        print(markdown(doc), flush=True)
        log(f"done: {path}; phases {json.dumps(phases)}")
        for r in doc["rows"]:
            print(summary_line(r), flush=True)
        return 0 if all(r["status"] == "ok" for r in doc["rows"]) else 1
    finally:
        _stop_children()


if __name__ == "__main__":
    raise SystemExit(main())
