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
// with something else just takes fewer of them. The regions run on a pool of our own
// (SpinPool) whose threads spin for a while between them instead of sleeping.
//
// The binding takes addresses and sizes, not tensors: runtime/cpu_kernels.py checks the
// tensors, and the extension builds in seconds without the whole torch C++ API.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <memory>
#include <functional>
#include <mutex>
#include <pthread.h>
#include <unistd.h>
#include <thread>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// Locality hint of the weights' prefetches (__builtin_prefetch's third argument): 3 keeps
// them in every cache level, 0 (non-temporal) leaves most of the caches to whatever runs
// after a call, such as the interpreter between a layer's experts and the next GPU launch.
#ifndef SPECMOE_PREFETCH_LOCALITY
#define SPECMOE_PREFETCH_LOCALITY 3
#endif

// The vector paths rely on GCC's `#pragma GCC target`; other compilers get the scalar one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define SPECMOE_X86 1
#endif

namespace {

struct Job {
  const int64_t* ptrs;  // one matrix address per item
  const float* x;       // [n, in] rows x_stride apart (rearranged for the [out, in] kernels)
  float* out;           // [n, outd]
  int64_t in, outd, units;  // units of work per matrix
  int64_t x_stride;         // in, or 0 when every matrix takes the same x
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
inline V mul(V a, V b) { return a * b; }
inline V div(V a, V b) { return a / b; }
inline V vmin(V a, V b) { return a < b ? a : b; }
inline V vmax(V a, V b) { return a > b ? a : b; }
inline V loadx(const float* p) { return *p; }
inline V bcast(float v) { return v; }
inline void store(float* p, V v) { *p = v; }
inline float hsum(V v) { return v; }
inline V round_near(V v) { return std::nearbyint(v); }
inline V pow2(V n) {
  const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
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
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V div(V a, V b) { return _mm256_div_ps(a, b); }
inline V vmin(V a, V b) { return _mm256_min_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline V loadx(const float* p) { return _mm256_loadu_ps(p); }
inline V bcast(float v) { return _mm256_set1_ps(v); }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V round_near(V v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V pow2(V n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
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
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V div(V a, V b) { return _mm512_div_ps(a, b); }
inline V vmin(V a, V b) { return _mm512_min_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline V loadx(const float* p) { return _mm512_loadu_ps(p); }
inline V bcast(float v) { return _mm512_set1_ps(v); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V round_near(V v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V pow2(V n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
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

// One step of a spin-wait: tells the core it is spinning (cheaper for its sibling thread).
inline void cpu_pause() {
#ifdef SPECMOE_X86
  _mm_pause();
#endif
}

// How long an idle thread of ours spins before it sleeps: SPECMOE_CPU_SPIN_US microseconds
// (default 2000).
std::chrono::steady_clock::duration spin_time() {
  const char* env = std::getenv("SPECMOE_CPU_SPIN_US");
  return std::chrono::microseconds(env ? std::max(0L, std::atol(env)) : 2000L);
}

// Spins until done() or `spin` has passed; whether done() came. The callers sleep on a
// condition variable after a false: waking a sleeping thread costs about as long as the
// waits they mostly see.
template <class Done>
bool spin_until(Done done, std::chrono::steady_clock::duration spin) {
  const auto start = std::chrono::steady_clock::now();
  for (uint64_t spins = 1; !done(); ++spins) {
    cpu_pause();
    if ((spins & 0xFF) == 0 && std::chrono::steady_clock::now() - start > spin) return false;
  }
  return true;
}

// Threads for the kernels' parallel regions. A decode step calls the kernels every few
// hundred microseconds with GPU work and the interpreter between calls; OpenMP's threads
// (torch's pool), asleep by then, cost about 0.1 ms per layer to wake on a 16-core host.
// These spin for SPECMOE_CPU_SPIN_US microseconds (default 2000) after a region before
// they sleep. A region is done when its tasks are: it never waits for a thread that the
// OS has not scheduled since (with every core spinning, one may sit out a whole time
// slice); such a thread finds the tasks taken when it runs, for a task is claimed on a
// ticket that names its region. The caller takes part in every region; regions from
// several threads run one after another.
class SpinPool {
 public:
  static SpinPool& get() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { instance() = new SpinPool(); }); });
    return *instance();
  }

  static constexpr int64_t kMaxTasks = (int64_t(1) << 20) - 1;

  // task(t) for t in [0, tasks), on up to `threads` threads at once (this one included).
  void run(int64_t threads, int64_t tasks, const std::function<void(int64_t)>& task) {
    if (tasks <= 0) return;
    if (tasks > kMaxTasks) throw std::invalid_argument("SpinPool: too many tasks in one region");
    std::lock_guard<std::mutex> one_at_a_time(run_mutex_);
    const int64_t helpers = std::min(std::max<int64_t>(0, threads - 1), tasks - 1);
    while (int64_t(workers_) < helpers) {
      // It starts from the generation before this region's, whenever it gets to run.
      std::thread(&SpinPool::work, this, int64_t(workers_), generation_.load(std::memory_order_relaxed)).detach();
      ++workers_;
    }
    const uint64_t gen = (generation_.load(std::memory_order_relaxed) + 1) & kGenMask;
    task_ = &task;
    helpers_.store(helpers, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    ticket_.store((gen << kGenShift) | (uint64_t(tasks) << kTaskBits), std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      generation_.store(gen, std::memory_order_release);
      if (sleeping_) wake_.notify_all();
    }
    take(gen);
    // Every task claimed has run: no thread touches this region's task_ or done_ any more.
    while (done_.load(std::memory_order_acquire) < tasks) cpu_pause();
  }

 private:
  // A ticket: the region's generation (24 bits), its task count and the next task (20 bits each).
  static constexpr int kTaskBits = 20, kGenShift = 40;
  static constexpr uint64_t kTaskMask = (uint64_t(1) << kTaskBits) - 1, kGenMask = (uint64_t(1) << 24) - 1;

  // Leaked on purpose: detached threads may still spin on it while the process exits, and a
  // forked child (which has none of them) starts a new one.
  static SpinPool*& instance() {
    static SpinPool* pool = new SpinPool();
    return pool;
  }

  SpinPool() : spin_(spin_time()) {}

  // Run tasks of region `gen` while any are left. A claim succeeds only on that region's
  // ticket, and the region cannot end before the claimed task is done: task_ is its own.
  void take(uint64_t gen) {
    for (;;) {
      uint64_t ticket = ticket_.load(std::memory_order_acquire);
      uint64_t t;
      do {
        if ((ticket >> kGenShift) != gen) return;   // another region: this one is over
        t = ticket & kTaskMask;
        if (t >= ((ticket >> kTaskBits) & kTaskMask)) return;
      } while (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel));
      (*task_)(int64_t(t));
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void work(int64_t index, uint64_t seen) {
    for (;;) {
      const auto posted = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(posted, spin_)) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        ++sleeping_;
        wake_.wait(lock, posted);
        --sleeping_;
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index < helpers_.load(std::memory_order_relaxed)) take(seen);
    }
  }

  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0}, ticket_{0};
  std::atomic<int64_t> done_{0}, helpers_{0};
  const std::function<void(int64_t)>* task_ = nullptr;
  size_t workers_ = 0;
  int sleeping_ = 0;
  std::chrono::steady_clock::duration spin_;
};

// Scratch that lives as long as the calling thread: a decode step calls this every layer,
// and fresh buffers of this size can cost page faults each time.
std::vector<float>& scratch(int which) {
  thread_local std::vector<float> buffers[5];
  return buffers[which];
}

// x: n rows x_stride apart (0: one row for every matrix); threads: how many threads compute
// (0: torch's intra-op count).
template <class T>
void run_batch(const int64_t* ptrs, const float* x, int64_t x_stride, float* out, int64_t n, int64_t in,
               int64_t outd, bool in_out, int isa, int64_t task_bytes, int64_t threads = 0) {
  const Plan plan = plan_for<T>(isa, in_out);
  if (plan.arrange) {
    const int64_t rows = x_stride ? n : 1;
    std::vector<float>& arranged = scratch(0);
    arranged.resize(size_t(rows * in));
    for (int64_t i = 0; i < rows; ++i) plan.arrange(x + i * x_stride, arranged.data() + i * in, in);
    x = arranged.data();
    if (x_stride) x_stride = in;
  }
  const Job job{ptrs, x, out, in, outd, (outd + plan.span - 1) / plan.span, x_stride};
  const int64_t total = n * job.units;
  const int64_t unit_bytes = plan.span * in * int64_t(sizeof(T));
  if (threads < 1) threads = at::get_num_threads();
  // Tasks of about task_bytes, but at least four per thread so the last ones even out.
  const int64_t per_task = std::max<int64_t>(
      {int64_t(1), std::min(task_bytes / unit_bytes, (total + 4 * threads - 1) / (4 * threads)),
       (total + SpinPool::kMaxTasks - 1) / SpinPool::kMaxTasks});
  const int64_t tasks = (total + per_task - 1) / per_task;
  SpinPool::get().run(threads, tasks,
                      [&](int64_t t) { plan.run(job, t * per_task, std::min(total, (t + 1) * per_task)); });
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
  if (dtype == 0) run_batch<float>(p, xs, in, o, n, in, outd, weights_in_out, code, task_bytes);
  if (dtype == 1) run_batch<c10::Half>(p, xs, in, o, n, in, outd, weights_in_out, code, task_bytes);
  if (dtype == 2) run_batch<c10::BFloat16>(p, xs, in, o, n, in, outd, weights_in_out, code, task_bytes);
}

void swiglu_rows(int isa, const float* gate_up, float* a, int64_t n, int64_t inter) {
#ifdef SPECMOE_X86
  if (isa == 2) return avx512::swiglu_rows(gate_up, a, n, inter);
  if (isa == 1) return avx2::swiglu_rows(gate_up, a, n, inter);
#endif
  scalar::swiglu_rows(gate_up, a, n, inter);
}

void gpt_oss_glu_rows(int isa, const float* gate_up, float* a, int64_t n, int64_t inter, float alpha, float limit) {
#ifdef SPECMOE_X86
  if (isa == 2) return avx512::gpt_oss_glu_rows(gate_up, a, n, inter, alpha, limit);
  if (isa == 1) return avx2::gpt_oss_glu_rows(gate_up, a, n, inter, alpha, limit);
#endif
  scalar::gpt_oss_glu_rows(gate_up, a, n, inter, alpha, limit);
}

void weighted_rows(int isa, const float* y, const float* w, int64_t n, int64_t h, float* out) {
#ifdef SPECMOE_X86
  if (isa == 2) return avx512::weighted_rows(y, w, n, h, out);
  if (isa == 1) return avx2::weighted_rows(y, w, n, h, out);
#endif
  scalar::weighted_rows(y, w, n, h, out);
}

template <class T>
void widen(const T* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(x[i]);
}

// rows[i, :] += the bias of expert i (len values of T at ptrs[i] + offset): one fp32 add,
// as torch adds a bias in the store's dtype to a float32 product.
template <class T>
void add_bias_rows(float* rows, const std::vector<int64_t>& ptrs, int64_t offset, int64_t len) {
  for (size_t i = 0; i < ptrs.size(); ++i) {
    const T* b = reinterpret_cast<const T*>(ptrs[i] + offset);
    float* r = rows + int64_t(i) * len;
    for (int64_t j = 0; j < len; ++j) r[j] += to_float(b[j]);
  }
}

enum Glu { kSwiglu = 0, kGptOss = 1 };

// What one expert is, beside its weights: the glu and where its biases sit in a block.
struct ExpertForm {
  int glu;
  float alpha, limit;                 // kGptOss only
  int64_t gate_up_bias, down_bias;    // byte offsets in a block, or -1 for none
};

template <class T>
void glu_sum(const float* x, float* out, const std::vector<int64_t>& ids, const std::vector<float>& weights,
             uintptr_t base, int64_t stride, int64_t gate_up, int64_t down, int64_t hidden, int64_t inter,
             const ExpertForm& form, bool in_out, int isa, int64_t task_bytes, int64_t threads) {
  const int64_t n = int64_t(ids.size());
  std::vector<int64_t> blocks(static_cast<size_t>(n));
  std::vector<int64_t> ptrs(static_cast<size_t>(n));
  std::vector<float>& g = scratch(1);
  std::vector<float>& a = scratch(2);
  std::vector<float>& y = scratch(3);
  g.resize(size_t(n * 2 * inter));
  a.resize(size_t(n * inter));
  y.resize(size_t(n * hidden));
  for (int64_t i = 0; i < n; ++i) {
    blocks[size_t(i)] = int64_t(base) + ids[size_t(i)] * stride;
    ptrs[size_t(i)] = blocks[size_t(i)] + gate_up;
  }
  run_batch<T>(ptrs.data(), x, 0, g.data(), n, hidden, 2 * inter, in_out, isa, task_bytes, threads);
  if (form.gate_up_bias >= 0) add_bias_rows<T>(g.data(), blocks, form.gate_up_bias, 2 * inter);
  if (form.glu == kGptOss)
    gpt_oss_glu_rows(isa, g.data(), a.data(), n, inter, form.alpha, form.limit);
  else
    swiglu_rows(isa, g.data(), a.data(), n, inter);
  for (int64_t i = 0; i < n; ++i) ptrs[size_t(i)] += down - gate_up;
  run_batch<T>(ptrs.data(), a.data(), inter, y.data(), n, inter, hidden, in_out, isa, task_bytes, threads);
  if (form.down_bias >= 0) add_bias_rows<T>(y.data(), blocks, form.down_bias, hidden);
  weighted_rows(isa, y.data(), weights.data(), n, hidden, out);
}

// One layer's experts in the host store, and what each expert is beside its weights.
// Expert e's block starts at base + e * stride; in it gate_up_proj [2I, H] sits at byte
// offset gate_up and down_proj [H, I] at down, or [H, 2I] and [I, H] with in_out; the biases
// gate_up_proj_bias [2I] and down_proj_bias [H] (in the weights' dtype) at the form's
// offsets, -1 where the experts have none. glu 0: silu(gate) * up with gate the first I of
// the 2I columns, up the rest; glu 1: GPT-OSS's clamped glu (gpt_oss_glu_rows) over
// interleaved columns.
struct LayerExperts {
  uintptr_t base;
  int64_t stride, gate_up, down, hidden, inter;
  int dtype;  // 0 float32, 1 float16, 2 bfloat16
  bool in_out;
  int64_t num_experts;
  ExpertForm form;
  int isa;
  int64_t task_bytes;
  int64_t threads;  // 0: torch's intra-op count

  void check(const char* who) const {
    const std::string name(who);
    if (hidden < 1 || inter < 1 || dtype < 0 || dtype > 2 || task_bytes < 1)
      throw std::invalid_argument(name + ": bad sizes or dtype code");
    if (form.glu != kSwiglu && form.glu != kGptOss)
      throw std::invalid_argument(name + ": glu " + std::to_string(form.glu) + " is neither 0 (SwiGLU) nor 1 (GPT-OSS)");
    if (form.glu == kGptOss && (std::isnan(form.alpha) || std::isnan(form.limit)))
      throw std::invalid_argument(name + ": alpha and limit must be numbers");
    const int64_t item = dtype == 0 ? 4 : 2;
    const auto fits = [&](int64_t offset, int64_t count) { return offset >= 0 && count * item <= stride - offset; };
    if (!fits(gate_up, 2 * inter * hidden) || !fits(down, hidden * inter))
      throw std::invalid_argument(name + ": gate_up_proj and down_proj do not fit in a block of " +
                                  std::to_string(stride) + " bytes");
    if ((form.gate_up_bias != -1 && !fits(form.gate_up_bias, 2 * inter)) ||
        (form.down_bias != -1 && !fits(form.down_bias, hidden)))
      throw std::invalid_argument(name + ": a bias offset is neither -1 nor inside a block of " +
                                  std::to_string(stride) + " bytes");
  }

  void check_id(const char* who, int64_t e) const {
    if (e < 0 || e >= num_experts)
      throw std::invalid_argument(std::string(who) + ": expert id " + std::to_string(e) + " is not in [0, " +
                                  std::to_string(num_experts) + ")");
  }

  // out[H] = sum_i weights[i] expert_{ids[i]}(x); zeros for no experts. Each product is one
  // parallel region as in gemv_batch; the rest (in order i = 0, 1, ... for the sum) runs on
  // the calling thread, so the result does not depend on the thread count.
  void sum(const float* x, float* out, const std::vector<int64_t>& ids, const std::vector<float>& weights) const {
    if (ids.empty()) {
      std::fill(out, out + hidden, 0.f);
      return;
    }
    const auto run = [&](auto weight) {
      using T = decltype(weight);
      glu_sum<T>(x, out, ids, weights, base, stride, gate_up, down, hidden, inter, form, in_out, isa, task_bytes,
                 threads);
    };
    if (dtype == 0) run(float());
    if (dtype == 1) run(c10::Half());
    if (dtype == 2) run(c10::BFloat16());
  }
};

// x of `hidden` values in x_dtype (coded as dtype), as float32: itself, or widened into scratch.
const float* widened(uintptr_t x, int x_dtype, int64_t hidden) {
  if (x_dtype < 0 || x_dtype > 2) throw std::invalid_argument("bad x dtype code " + std::to_string(x_dtype));
  if (x_dtype == 0) return reinterpret_cast<const float*>(x);
  std::vector<float>& wide = scratch(4);
  wide.resize(size_t(hidden));
  if (x_dtype == 1) widen(reinterpret_cast<const c10::Half*>(x), wide.data(), hidden);
  if (x_dtype == 2) widen(reinterpret_cast<const c10::BFloat16*>(x), wide.data(), hidden);
  return wide.data();
}

LayerExperts layer_experts(uintptr_t base, int64_t stride, int64_t gate_up, int64_t down, int64_t hidden, int64_t inter,
                           int dtype, bool weights_in_out, int64_t num_experts, int glu, float alpha, float limit,
                           int64_t gate_up_bias, int64_t down_bias, const std::string& isa, int64_t task_bytes,
                           int64_t threads, const char* who) {
  const LayerExperts layer{base,          stride, gate_up, down, hidden, inter, dtype, weights_in_out, num_experts,
                           ExpertForm{glu, alpha, limit, gate_up_bias, down_bias}, isa_code(isa), task_bytes, threads};
  layer.check(who);
  return layer;
}

// out[H] = sum_i weights[i] (Down_i glu(G_i x + b_gu_i) + b_down_i) for one token x [H] and
// the experts ids[i] of one layer (LayerExperts says where they are and what they are). A
// decode step calls this once per layer, so the biases, the glu, the weighted sum and
// widening x (x_dtype, coded as dtype) are done here rather than by torch ops between the
// products.
void expert_glu_sum(uintptr_t x, int x_dtype, uintptr_t out, const std::vector<int64_t>& ids,
                    const std::vector<float>& weights, uintptr_t base, int64_t stride, int64_t gate_up,
                    int64_t down, int64_t hidden, int64_t inter, int dtype, bool weights_in_out,
                    int64_t num_experts, int glu, float alpha, float limit, int64_t gate_up_bias,
                    int64_t down_bias, const std::string& isa, int64_t task_bytes, int64_t threads) {
  const LayerExperts layer = layer_experts(base, stride, gate_up, down, hidden, inter, dtype, weights_in_out,
                                           num_experts, glu, alpha, limit, gate_up_bias, down_bias, isa, task_bytes,
                                           threads, "expert_glu_sum");
  if (x_dtype < 0 || x_dtype > 2) throw std::invalid_argument("expert_glu_sum: bad sizes or dtype code");
  if (ids.size() != weights.size())
    throw std::invalid_argument("expert_glu_sum: " + std::to_string(ids.size()) + " expert ids but " +
                                std::to_string(weights.size()) + " weights");
  for (int64_t e : ids) layer.check_id("expert_glu_sum", e);
  auto* o = reinterpret_cast<float*>(out);
  if (ids.empty()) {
    std::fill(o, o + hidden, 0.f);
    return;
  }
  layer.sum(widened(x, x_dtype, hidden), o, ids, weights);
}

// The CPU's part of one exact decode layer, from the GPU's routing to the GPU's next layer
// with no interpreter in between, on fixed host buffers given by address. A graphed decode
// step runs it once per layer whose experts are not all on the GPU, after queuing the
// layer's graphs: on the calling thread (`run`) or on a LayerQueue's thread.
//
// 1. Waits (spinning: the wait is tens of microseconds, a sleep would cost as much again)
//    until the int64 at `ready` equals `expect`. The layer's graph copies its routing (k
//    int64 expert ids, k float32 weights) and its input x (hidden values in x_dtype) to
//    pinned memory and then the step's count to `ready`: copies on one stream land in order.
//    After timeout_s seconds without it, throws (the gate stays closed: see `open`).
// 2. Takes the ids the GPU did not compute: not marked in present[num_experts] (uint8, the
//    layer's experts in the GPU's table), minus the first reads[m] of the m missed (the
//    experts graph read those from host memory itself; reads = 0: none).
// 3. out[H] = their weighted sum (zeros if none), then writes gate_value to the int32 at
//    `gate` (the GPU's next layer waits for it: cuStreamWaitValue32) after out is written.
// stats (int64 [7]): ids found present, ids the GPU read, experts computed here,
// nanoseconds waited, nanoseconds computed, then when the run began and ended (nanoseconds of
// the monotonic clock, Python's time.monotonic_ns): where a step's time goes between parts.
struct TableLayer {
  LayerExperts layer;
  uintptr_t ready;
  double timeout_s;
  uintptr_t ids, weights;
  int64_t k;
  uintptr_t x;
  int x_dtype;
  uintptr_t present, reads, out, gate, stats;

  void run(int64_t expect, int32_t gate_value) const {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    const auto* flag = reinterpret_cast<const int64_t*>(ready);
    for (uint64_t spins = 1; __atomic_load_n(flag, __ATOMIC_ACQUIRE) != expect; ++spins) {
      cpu_pause();
      if ((spins & 0xFFF) == 0 && std::chrono::duration<double>(clock::now() - start).count() > timeout_s)
        throw std::runtime_error("TableLayer: the layer's routing did not reach host memory within " +
                                 std::to_string(timeout_s) + " s");
    }
    const auto arrived = clock::now();
    const auto* id = reinterpret_cast<const int64_t*>(ids);
    const auto* w = reinterpret_cast<const float*>(weights);
    const auto* on_gpu = reinterpret_cast<const uint8_t*>(present);
    std::vector<int64_t> missed;
    int64_t hits = 0;
    for (int64_t j = 0; j < k; ++j) {
      layer.check_id("TableLayer", id[j]);
      if (on_gpu[id[j]])
        ++hits;
      else
        missed.push_back(j);
    }
    const int64_t read = reads ? std::min<int64_t>(reinterpret_cast<const int64_t*>(reads)[missed.size()],
                                                   int64_t(missed.size()))
                               : 0;
    std::vector<int64_t> experts;
    std::vector<float> scale;
    for (size_t i = size_t(read); i < missed.size(); ++i) {
      experts.push_back(id[missed[i]]);
      scale.push_back(w[missed[i]]);
    }
    auto* o = reinterpret_cast<float*>(out);
    if (experts.empty())
      std::fill(o, o + layer.hidden, 0.f);
    else
      layer.sum(widened(x, x_dtype, layer.hidden), o, experts, scale);
    const auto done = clock::now();
    auto* s = reinterpret_cast<int64_t*>(stats);
    s[0] = hits;
    s[1] = read;
    s[2] = int64_t(experts.size());
    s[3] = std::chrono::duration_cast<std::chrono::nanoseconds>(arrived - start).count();
    s[4] = std::chrono::duration_cast<std::chrono::nanoseconds>(done - arrived).count();
    s[5] = std::chrono::duration_cast<std::chrono::nanoseconds>(start.time_since_epoch()).count();
    s[6] = std::chrono::duration_cast<std::chrono::nanoseconds>(done.time_since_epoch()).count();
    open(gate_value);
  }

  // What a failed run leaves to its caller: the GPU's next layer must not wait forever.
  void open(int32_t gate_value) const {
    __atomic_store_n(reinterpret_cast<int32_t*>(gate), gate_value, __ATOMIC_RELEASE);
  }
};

std::shared_ptr<TableLayer> table_layer(uintptr_t ready, double timeout_s, uintptr_t ids, uintptr_t weights, int64_t k,
                                        uintptr_t x, int x_dtype, uintptr_t present, uintptr_t reads, uintptr_t out,
                                        uintptr_t gate, uintptr_t stats, uintptr_t base, int64_t stride,
                                        int64_t gate_up, int64_t down, int64_t hidden, int64_t inter, int dtype,
                                        bool weights_in_out, int64_t num_experts, int glu, float alpha, float limit,
                                        int64_t gate_up_bias, int64_t down_bias, const std::string& isa,
                                        int64_t task_bytes, int64_t threads) {
  const LayerExperts layer = layer_experts(base, stride, gate_up, down, hidden, inter, dtype, weights_in_out,
                                           num_experts, glu, alpha, limit, gate_up_bias, down_bias, isa, task_bytes,
                                           threads, "TableLayer");
  if (k < 1) throw std::invalid_argument("TableLayer: k must be at least 1");
  if (x_dtype < 0 || x_dtype > 2) throw std::invalid_argument("TableLayer: bad x dtype code");
  return std::make_shared<TableLayer>(
      TableLayer{layer, ready, timeout_s, ids, weights, k, x, x_dtype, present, reads, out, gate, stats});
}

// A whole decode step's CPU parts, run in order on a thread of their own while the host
// goes on queuing the step's graphs: the host is then off the path from a layer's routing
// to its CPU part (queuing a layer's graphs costs about as long as the GPU takes to reach
// the next routing). Each part opens its own gate; after a failure the parts behind it
// only open theirs, and `wait` throws the first failure.
class LayerQueue {
 public:
  LayerQueue() : spin_(spin_time()), pid_(getpid()), thread_([this] { loop(); }) {}

  ~LayerQueue() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    posted_.fetch_add(1, std::memory_order_release);
    wake_.notify_all();
    thread_.join();
  }

  // Returns the part's ticket: wait_for(ticket) returns once it has run.
  int64_t submit(std::shared_ptr<TableLayer> layer, int64_t expect, int32_t gate_value) {
    // A forked child has the object but not its thread: its parts would never run.
    if (getpid() != pid_) throw std::runtime_error("LayerQueue: made before this process was forked; make a new one");
    int64_t ticket;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      items_.push_back(Item{std::move(layer), expect, gate_value});
      ++pending_;
      ticket = ++submitted_;
    }
    posted_.fetch_add(1, std::memory_order_release);
    wake_.notify_one();
    return ticket;
  }

  // Until the part with this ticket (and every one before it) has run; false if a part has
  // failed since the last wait (wait() throws it). The host counts each layer here while the
  // thread computes the next.
  bool wait_for(int64_t ticket) {
    const auto ran = [&] { return finished_.load(std::memory_order_acquire) >= ticket; };
    spin_until(ran, spin_);
    std::unique_lock<std::mutex> lock(mutex_);
    idle_.wait(lock, ran);
    return error_.empty();
  }

  // Until every part submitted has run; throws the first failure since the last wait.
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    idle_.wait(lock, [&] { return pending_ == 0; });
    if (!error_.empty()) {
      std::string error;
      error.swap(error_);
      throw std::runtime_error(error);
    }
  }

  bool idle() {
    std::lock_guard<std::mutex> lock(mutex_);
    return pending_ == 0;
  }

  bool ran(int64_t ticket) { return finished_.load(std::memory_order_acquire) >= ticket; }

 private:
  struct Item {
    std::shared_ptr<TableLayer> layer;
    int64_t expect;
    int32_t gate_value;
  };

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      // Spin a while for the next part (the host submits them tens of microseconds apart),
      // then sleep.
      const auto posted = [&] { return posted_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(posted, spin_)) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, posted);
      }
      seen = posted_.load(std::memory_order_acquire);
      for (;;) {
        Item item;
        bool failed;
        {
          std::lock_guard<std::mutex> lock(mutex_);
          if (stop_) return;
          if (items_.empty()) break;
          item = std::move(items_.front());
          items_.pop_front();
          failed = !error_.empty();
        }
        std::string error;
        if (failed) {
          item.layer->open(item.gate_value);
        } else {
          try {
            item.layer->run(item.expect, item.gate_value);
          } catch (const std::exception& e) {
            error = e.what();
            item.layer->open(item.gate_value);
          }
        }
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error.empty() && error_.empty()) error_ = error;
        finished_.fetch_add(1, std::memory_order_release);
        --pending_;
        idle_.notify_all();
      }
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, idle_;
  std::deque<Item> items_;
  std::atomic<uint64_t> posted_{0};
  int64_t pending_ = 0, submitted_ = 0;
  std::atomic<int64_t> finished_{0};
  bool stop_ = false;
  std::string error_;
  const std::chrono::steady_clock::duration spin_;
  const pid_t pid_;
  std::thread thread_;   // last: it starts once everything above is built
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("gemv_batch", &gemv_batch, "out[i] = W_i x[i] (or x[i] W_i) for matrices given by address",
        py::arg("ptrs"), py::arg("x"), py::arg("out"), py::arg("n"), py::arg("in_dim"), py::arg("out_dim"),
        py::arg("dtype"), py::arg("weights_in_out"), py::arg("isa") = "auto", py::arg("task_bytes") = 256 << 10,
        py::call_guard<py::gil_scoped_release>());
  m.def("expert_glu_sum", &expert_glu_sum,
        "out = sum_i w_i (Down_i glu(G_i x + b_gu_i) + b_down_i) over experts given by block address",
        py::arg("x"), py::arg("x_dtype"), py::arg("out"), py::arg("ids"), py::arg("weights"), py::arg("base"),
        py::arg("stride"), py::arg("gate_up_offset"), py::arg("down_offset"), py::arg("hidden"), py::arg("inter"),
        py::arg("dtype"), py::arg("weights_in_out"), py::arg("num_experts"), py::arg("glu") = 0,
        py::arg("alpha") = 1.f, py::arg("limit") = std::numeric_limits<float>::infinity(),
        py::arg("gate_up_bias_offset") = -1, py::arg("down_bias_offset") = -1, py::arg("isa") = "auto",
        py::arg("task_bytes") = 256 << 10, py::arg("threads") = 0,
        py::call_guard<py::gil_scoped_release>());
  py::class_<TableLayer, std::shared_ptr<TableLayer>>(m, "TableLayer")
      .def("run", &TableLayer::run, "wait for the layer's routing, sum the experts the GPU did not, open the gate",
           py::arg("expect"), py::arg("gate_value"), py::call_guard<py::gil_scoped_release>());
  m.def("table_layer", &table_layer, "one layer's CPU part of a graphed decode step, on buffers given by address",
        py::arg("ready"), py::arg("timeout_s"), py::arg("ids"), py::arg("weights"), py::arg("k"), py::arg("x"),
        py::arg("x_dtype"), py::arg("present"), py::arg("reads"), py::arg("out"), py::arg("gate"), py::arg("stats"),
        py::arg("base"), py::arg("stride"), py::arg("gate_up_offset"), py::arg("down_offset"), py::arg("hidden"),
        py::arg("inter"), py::arg("dtype"), py::arg("weights_in_out"), py::arg("num_experts"), py::arg("glu") = 0,
        py::arg("alpha") = 1.f, py::arg("limit") = std::numeric_limits<float>::infinity(),
        py::arg("gate_up_bias_offset") = -1, py::arg("down_bias_offset") = -1, py::arg("isa") = "auto",
        py::arg("task_bytes") = 256 << 10, py::arg("threads") = 0);
  py::class_<LayerQueue>(m, "LayerQueue")
      .def(py::init<>())
      .def("submit", &LayerQueue::submit, py::arg("layer"), py::arg("expect"), py::arg("gate_value"))
      .def("wait", &LayerQueue::wait, py::call_guard<py::gil_scoped_release>())
      .def("wait_for", &LayerQueue::wait_for, py::arg("ticket"), py::call_guard<py::gil_scoped_release>())
      .def("idle", &LayerQueue::idle, py::call_guard<py::gil_scoped_release>())
      .def("ran", &LayerQueue::ran, py::arg("ticket"), py::call_guard<py::gil_scoped_release>());
  m.def("isas", &isas, "instruction sets this CPU runs, best first");
}
