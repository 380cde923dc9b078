// Batched matrix-vector products over weight matrices given by address, for expert
// weights read in place from the host store (no gather, no copy):
//   out[i] = W_i x[i]   (W_i [out, in] row-major, the F.linear layout), or
//   out[i] = x[i] W_i   (W_i [in, out], weights_in_out),
// with W_i in bf16, fp16 or fp32 and x, out float32. Weights are widened to fp32 exactly
// and every product is accumulated in fp32: the only difference to an exact result is the
// order of the fp32 sums.
//
// At batch 1 this is bound by memory reads, so the whole batch is one parallel region
// over small runs of rows (or column lines) of every matrix at once, handed out from a
// shared counter: all cores stream from DRAM together, and a core that is also busy
// with something else just takes fewer of them.
//
// The binding takes addresses and sizes, not tensors: runtime/cpu_kernels.py checks the
// tensors, and the extension builds in seconds without the whole torch C++ API.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// The vector paths rely on GCC's `#pragma GCC target`; other compilers get the scalar one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define SPECMOE_X86 1
#endif

namespace {

struct Job {
  const int64_t* ptrs;  // one matrix address per item
  const float* x;       // [n, in] (rearranged for the [out, in] kernels)
  float* out;           // [n, outd]
  int64_t in, outd, units;  // units of work per matrix
};

using UnitFn = void (*)(const Job&, int64_t, int64_t);
using ArrangeFn = void (*)(const float*, float*, int64_t);
struct Plan {
  UnitFn run;
  ArrangeFn arrange;  // null when x is used as is
  int64_t span;       // rows (or columns) of one matrix per unit
};

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

namespace scalar {
using V = float;
constexpr int W = 1, R = 1;
inline V zero() { return 0.f; }
inline V fma(V a, V b, V c) { return c + a * b; }
inline V add(V a, V b) { return a + b; }
inline V loadx(const float* p) { return *p; }
inline V bcast(float v) { return v; }
inline void store(float* p, V v) { *p = v; }
inline float hsum(V v) { return v; }
template <class T>
inline void load_line(const T* p, V* w) {
  for (int k = 0; k < int(64 / sizeof(T)); ++k) w[k] = to_float(p[k]);
}
#include "expert_gemv_kernels.h"
}  // namespace scalar

#ifdef SPECMOE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
using V = __m256;
constexpr int W = 8, R = 2;  // 2 rows x 4 vectors of bf16 fill 8 of the 16 registers with sums
inline V zero() { return _mm256_setzero_ps(); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V loadx(const float* p) { return _mm256_loadu_ps(p); }
inline V bcast(float v) { return _mm256_set1_ps(v); }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline float hsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline void load_line(const float* p, V* w) {
  w[0] = _mm256_loadu_ps(p);
  w[1] = _mm256_loadu_ps(p + 8);
}
inline void load_line(const c10::Half* p, V* w) {
  for (int q = 0; q < 4; ++q) w[q] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * q)));
}
inline void load_line(const c10::BFloat16* p, V* w) {
  const __m256i high = _mm256_set1_epi32(int(0xFFFF0000u));
  for (int q = 0; q < 2; ++q) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * q));
    w[2 * q] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    w[2 * q + 1] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
  }
}
#include "expert_gemv_kernels.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
namespace avx512 {
using V = __m512;
constexpr int W = 16, R = 4;
inline V zero() { return _mm512_setzero_ps(); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V loadx(const float* p) { return _mm512_loadu_ps(p); }
inline V bcast(float v) { return _mm512_set1_ps(v); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline float hsum(V v) { return _mm512_reduce_add_ps(v); }
inline void load_line(const float* p, V* w) { w[0] = _mm512_loadu_ps(p); }
inline void load_line(const c10::Half* p, V* w) {
  for (int q = 0; q < 2; ++q) w[q] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * q)));
}
inline void load_line(const c10::BFloat16* p, V* w) {
  const __m512i v = _mm512_loadu_si512(p);
  w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  w[1] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
}
#include "expert_gemv_kernels.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

bool supported(int isa) {
#ifdef SPECMOE_X86
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == 1) return avx2;
  if (isa == 2) return avx2 && __builtin_cpu_supports("avx512f");
#endif
  return isa == 0;
}

std::vector<std::string> isas() {
  std::vector<std::string> names;
  for (int isa = 2; isa >= 0; --isa)
    if (supported(isa)) names.emplace_back(kIsaNames[isa]);
  return names;
}

template <class T>
Plan plan_for(int isa, bool in_out) {
#ifdef SPECMOE_X86
  if (isa == 2) return avx512::plan<T>(in_out);
  if (isa == 1) return avx2::plan<T>(in_out);
#endif
  return scalar::plan<T>(in_out);
}

template <class T>
void run_batch(const int64_t* ptrs, const float* x, float* out, int64_t n, int64_t in, int64_t outd, bool in_out,
               int isa, int64_t task_bytes) {
  const Plan plan = plan_for<T>(isa, in_out);
  std::vector<float> arranged;
  if (plan.arrange) {
    arranged.resize(size_t(n * in));
    for (int64_t i = 0; i < n; ++i) plan.arrange(x + i * in, arranged.data() + i * in, in);
    x = arranged.data();
  }
  const Job job{ptrs, x, out, in, outd, (outd + plan.span - 1) / plan.span};
  const int64_t total = n * job.units;
  const int64_t unit_bytes = plan.span * in * int64_t(sizeof(T));
  const int64_t threads = at::get_num_threads();
  // Tasks of about task_bytes, but at least four per thread so the last ones even out.
  const int64_t per_task = std::max<int64_t>(
      1, std::min(task_bytes / unit_bytes, (total + 4 * threads - 1) / (4 * threads)));
  const int64_t tasks = (total + per_task - 1) / per_task;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;)
      plan.run(job, t * per_task, std::min(total, (t + 1) * per_task));
  });
}

int isa_code(const std::string& isa) {
  if (isa == "auto") {
    int code = 2;
    while (!supported(code)) --code;
    return code;
  }
  for (int code = 0; code < 3; ++code)
    if (isa == kIsaNames[code] && supported(code)) return code;
  throw std::invalid_argument("instruction set '" + isa + "' is not available on this CPU");
}

// Addresses: ptrs int64 [n] (one matrix each), x float32 [n, in], out float32 [n, outd], all
// contiguous; dtype of the weights: 0 float32, 1 float16, 2 bfloat16; isa: "auto" or a name
// isas() lists. The caller keeps all of it alive and checked (runtime/cpu_kernels.py).
void gemv_batch(uintptr_t ptrs, uintptr_t x, uintptr_t out, int64_t n, int64_t in, int64_t outd, int dtype,
                bool weights_in_out, const std::string& isa, int64_t task_bytes) {
  const int code = isa_code(isa);
  if (n < 0 || in < 0 || outd < 0 || dtype < 0 || dtype > 2 || task_bytes < 1)
    throw std::invalid_argument("gemv_batch: bad sizes or dtype code");
  const auto* p = reinterpret_cast<const int64_t*>(ptrs);
  const auto* xs = reinterpret_cast<const float*>(x);
  auto* o = reinterpret_cast<float*>(out);
  if (in == 0) std::fill(o, o + n * outd, 0.f);
  if (n == 0 || in == 0 || outd == 0) return;
  if (dtype == 0) run_batch<float>(p, xs, o, n, in, outd, weights_in_out, code, task_bytes);
  if (dtype == 1) run_batch<c10::Half>(p, xs, o, n, in, outd, weights_in_out, code, task_bytes);
  if (dtype == 2) run_batch<c10::BFloat16>(p, xs, o, n, in, outd, weights_in_out, code, task_bytes);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("gemv_batch", &gemv_batch, "out[i] = W_i x[i] (or x[i] W_i) for matrices given by address",
        py::arg("ptrs"), py::arg("x"), py::arg("out"), py::arg("n"), py::arg("in_dim"), py::arg("out_dim"),
        py::arg("dtype"), py::arg("weights_in_out"), py::arg("isa") = "auto", py::arg("task_bytes") = 256 << 10,
        py::call_guard<py::gil_scoped_release>());
  m.def("isas", &isas, "instruction sets this CPU runs, best first");
}
