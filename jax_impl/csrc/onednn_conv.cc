// oneDNN convolutions as XLA FFI custom calls (CPU, float32).
//
// Three handlers with the semantics of jax_impl/layers.py (VALID padding,
// stride 1, NHWC activations, HWIO kernel), H' = H - kh + 1, W' = W - kw + 1:
//
//   AgpOnednnConvForward:    x (B,H,W,Ci), k (kh,kw,Ci,Co)    -> y  (B,H',W',Co)
//       y[b,h,w,o]  = sum_{i,j,c} x[b,h+i,w+j,c] k[i,j,c,o]
//   AgpOnednnConvInputGrad:  ct (B,H',W',Co), k (kh,kw,Ci,Co) -> dx (B,H,W,Ci)
//       dx[b,h,w,c] = sum_{i,j,o} ct[b,h-i,w-j,o] k[i,j,c,o]
//   AgpOnednnConvKernelGrad: x (B,H,W,Ci), ct (B,H',W',Co)    -> dk (kh,kw,Ci,Co)
//       dk[i,j,c,o] = sum_{b,h,w} x[b,h+i,w+j,c] ct[b,h,w,o]
//
// How the work is run, and why:
// * The activations stay in XLA's NHWC buffers where oneDNN runs NHWC with its
//   brgemm kernels (faster, and no copies), or where its own choice would not
//   block the input anyway (3 channels); elsewhere oneDNN picks its preferred
//   (blocked) formats (format_tag::any) and XLA's buffers are reordered into
//   them and back. The kernel is always in oneDNN's format (reordered once per
//   call): with plain HWIO forced too, oneDNN falls back to gemm-based kernels,
//   up to 2x slower (MakePlan).
// * Threads come from XLA's own intra-op pool, not from oneDNN's OpenMP: the
//   batch is cut into chunks that the calling thread and pool helpers take
//   from a shared counter, each chunk one single-threaded oneDNN call. OpenMP
//   teams beside XLA's pool oversubscribe the cores, and their static split
//   with a barrier stalls whenever another process takes a core (measured
//   3-10x slower than one thread on a busy 2-core machine); taking chunks
//   from a counter balances itself. The kernel gradient sums the chunks'
//   partial gradients.
// * Primitives are created once per shape and cached (creation JIT-compiles
//   code, ~0.1-1 ms); every call uses its own thread's stream and scratch
//   memory (user scratchpad), so concurrent calls do not share state.
//
// Every call is checked before any memory is touched (CheckForward & co.): rank
// and element type by the FFI binding (rank-4 float32 buffers), then batch and
// channel agreement between the operands and the result, a kernel window of at
// least 1x1 that fits in the image (VALID), and sizes within oneDNN's 32-bit
// offsets (an image 2^24 pixels wide crashed its kernels). A call that fails
// gets an INVALID_ARGUMENT error, never a read past a buffer. The Python
// wrappers (jax_impl/onednn_conv) check the same first and raise ValueError.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

// The threading below relies on oneDNN running on the calling thread's OpenMP settings.
#if DNNL_CPU_RUNTIME != DNNL_RUNTIME_OMP && DNNL_CPU_RUNTIME != DNNL_RUNTIME_SEQ
#error "this oneDNN is not a CPU (OpenMP) build (the 'onednn' wheel is the SYCL one): install onednn-cpu-gomp"
#endif

namespace ffi = xla::ffi;

namespace {

enum class Op : int { kForward = 0, kInputGrad = 1, kKernelGrad = 2 };

// The problem: batch, image, channels, kernel window. Everything else follows.
struct Shape {
  int64_t b, h, w, ci, co, kh, kw;
  int64_t ho() const { return h - kh + 1; }
  int64_t wo() const { return w - kw + 1; }
  Shape with_batch(int64_t batch) const { return {batch, h, w, ci, co, kh, kw}; }
};

using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Descriptors of XLA's buffers (oneDNN's logical order is NCHW / OIHW); tag::any lets oneDNN choose.
dnnl::memory::desc SrcMd(const Shape& s, tag t = tag::nhwc) { return {{s.b, s.ci, s.h, s.w}, dt::f32, t}; }
dnnl::memory::desc DstMd(const Shape& s, tag t = tag::nhwc) {
  return {{s.b, s.co, s.ho(), s.wo()}, dt::f32, t};
}
dnnl::memory::desc WeiMd(const Shape& s, tag t = tag::hwio) { return {{s.co, s.ci, s.kh, s.kw}, dt::f32, t}; }

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A reorder between a plain buffer (XLA's) and the primitive's format; no primitive when they agree.
struct Reorder {
  dnnl::memory::desc plain, inner;
  std::optional<dnnl::reorder> prim;
  size_t scratch = 0;
};

// ``to_inner``: plain -> inner (an input), else inner -> plain (the output).
Reorder MakeReorder(const dnnl::memory::desc& plain, const dnnl::memory::desc& inner, bool to_inner) {
  Reorder r{plain, inner, std::nullopt, 0};
  if (plain == inner) return r;
  auto pd = to_inner ? dnnl::reorder::primitive_desc(Engine(), plain, Engine(), inner, UserScratchpad())
                     : dnnl::reorder::primitive_desc(Engine(), inner, Engine(), plain, UserScratchpad());
  r.scratch = pd.scratchpad_desc().get_size();
  r.prim.emplace(pd);
  return r;
}

// One cached convolution: out = prim(a, b), with the reorders of its two inputs and its output.
struct Plan {
  dnnl::primitive prim;
  int arg_a, arg_b, arg_out;  // DNNL_ARG_* of a, b and out
  Reorder a, b, out;
  size_t scratch = 0;  // the convolution's own scratchpad
  std::string impl;    // oneDNN's name of the kernel (impl_info_str), e.g. "brgconv:avx2"
};

// The plan of ``op`` with the activations (src, dst) in format ``act``: tag::nhwc (XLA's own layout, no
// reorders) or tag::any (oneDNN's choice, reordered from and to NHWC); the kernel is always oneDNN's choice.
Plan MakePlanWith(Op op, const Shape& s, tag act) {
  const dnnl::memory::dims stride{1, 1}, pad{0, 0};
  auto src = SrcMd(s, act), wei = WeiMd(s, tag::any), dst = DstMd(s, act);
  auto algo = dnnl::algorithm::convolution_direct;
  // The backward primitives take the forward one as a hint (it fixes the kernel family).
  dnnl::convolution_forward::primitive_desc fwd(Engine(), dnnl::prop_kind::forward_training, algo, src, wei,
                                                dst, stride, pad, pad, UserScratchpad());
  Plan p;
  if (op == Op::kForward) {
    p.prim = dnnl::convolution_forward(fwd);
    p.impl = fwd.impl_info_str();
    p.arg_a = DNNL_ARG_SRC, p.arg_b = DNNL_ARG_WEIGHTS, p.arg_out = DNNL_ARG_DST;
    p.a = MakeReorder(SrcMd(s), fwd.src_desc(), true);
    p.b = MakeReorder(WeiMd(s), fwd.weights_desc(), true);
    p.out = MakeReorder(DstMd(s), fwd.dst_desc(), false);
    p.scratch = fwd.scratchpad_desc().get_size();
  } else if (op == Op::kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc bwd(Engine(), algo, src, wei, dst, stride, pad, pad, fwd,
                                                        UserScratchpad());
    p.prim = dnnl::convolution_backward_data(bwd);
    p.impl = bwd.impl_info_str();
    p.arg_a = DNNL_ARG_DIFF_DST, p.arg_b = DNNL_ARG_WEIGHTS, p.arg_out = DNNL_ARG_DIFF_SRC;
    p.a = MakeReorder(DstMd(s), bwd.diff_dst_desc(), true);
    p.b = MakeReorder(WeiMd(s), bwd.weights_desc(), true);
    p.out = MakeReorder(SrcMd(s), bwd.diff_src_desc(), false);
    p.scratch = bwd.scratchpad_desc().get_size();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(Engine(), algo, src, wei, dst, stride, pad, pad,
                                                           fwd, UserScratchpad());
    p.prim = dnnl::convolution_backward_weights(bwd);
    p.impl = bwd.impl_info_str();
    p.arg_a = DNNL_ARG_SRC, p.arg_b = DNNL_ARG_DIFF_DST, p.arg_out = DNNL_ARG_DIFF_WEIGHTS;
    p.a = MakeReorder(SrcMd(s), bwd.src_desc(), true);
    p.b = MakeReorder(DstMd(s), bwd.diff_dst_desc(), true);
    p.out = MakeReorder(WeiMd(s), bwd.diff_weights_desc(), false);
    p.scratch = bwd.scratchpad_desc().get_size();
  }
  return p;
}

// Whether oneDNN serves a problem with one of its direct kernels (jit:*, brgconv:*, brg_*), not a
// gemm-based ("gemm:*") or reference ("ref:*") one; and whether that kernel is a brgemm one.
bool DirectKernel(const std::string& impl) {
  return impl.rfind("gemm", 0) != 0 && impl.rfind("ref", 0) != 0;
}
bool BrgemmKernel(const std::string& impl) { return impl.rfind("brg", 0) == 0; }

// Where the activations live, per problem: in XLA's NHWC buffers (no reorders) when oneDNN runs NHWC
// with its brgemm kernels, which are made for it, or when its own choice would not block the input
// anyway (3 input channels: plain NCHW), so that NHWC costs nothing; else in oneDNN's blocked formats
// (its jit kernels), reordered from and to NHWC. Measured on a 2-core AVX2 EPYC, one thread, oneDNN
// 3.2, GFLOP/s NHWC vs blocked: forward (brgconv) 95-104 vs 42-100 (2.3x for 256 channels at 6x6),
// input gradient (brgconv) 86 vs 71 for the seed CNN's conv2 and 88-98 vs 88-98 for 3x3 ResNet
// layers; the kernel gradient has no brgemm kernel on AVX2 and its jit kernel runs NHWC at 54-75
// against 83-86 blocked for 64-256 channels, alike for the seed CNN. The kernel itself stays in
// oneDNN's format: forced to plain HWIO too, oneDNN falls back to gemm kernels (up to 2x slower).
Plan MakePlan(Op op, const Shape& s) {
  std::optional<Plan> plain;
  try {
    plain = MakePlanWith(op, s, tag::nhwc);
  } catch (const dnnl::error&) {  // no kernel for NHWC at all: oneDNN's own choice below
  }
  if (plain && BrgemmKernel(plain->impl)) return *plain;
  Plan blocked = MakePlanWith(op, s, tag::any);
  const bool input_blocked = blocked.a.inner.get_inner_nblks() > 0;
  return plain && DirectKernel(plain->impl) && !input_blocked ? *plain : blocked;
}

// Primitive creation is expensive (JIT), lookup is cheap: one map for the process.
std::shared_ptr<const Plan> GetPlan(Op op, const Shape& s) {
  using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
  static std::mutex mutex;
  static std::map<Key, std::shared_ptr<const Plan>> cache;
  Key key{static_cast<int>(op), s.b, s.h, s.w, s.ci, s.co, s.kh, s.kw};
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto plan = std::make_shared<const Plan>(MakePlan(op, s));  // outside the lock: it takes a while
  std::lock_guard<std::mutex> lock(mutex);
  return cache.emplace(key, std::move(plan)).first->second;
}

// Scratch memory, grown on demand and kept: no allocation per call in steady state.
class Arena {
 public:
  static constexpr size_t kAlign = 64;
  static size_t Round(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
  char* Reserve(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = Round(std::max<size_t>(bytes, kAlign));
      data_ = static_cast<char*>(std::aligned_alloc(kAlign, size_));
      if (data_ == nullptr) {
        size_ = 0;
        throw std::bad_alloc();
      }
    }
    return data_;
  }
  ~Arena() { std::free(data_); }

 private:
  char* data_ = nullptr;
  size_t size_ = 0;
};

size_t InnerBytes(const Reorder& r) { return r.prim ? Arena::Round(r.inner.get_size()) : 0; }

// oneDNN's OpenMP runs single-threaded on this thread while the guard lives (the
// setting is per thread; it is restored because the thread may be one that runs
// PyTorch or other OpenMP code too).
class SingleThreaded {
 public:
  SingleThreaded() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SingleThreaded() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

// Runs ``prim`` on this thread's stream with ``scratch`` (at least ``bytes`` long) as its scratchpad.
void Execute(const dnnl::primitive& prim, std::unordered_map<int, dnnl::memory> args, size_t bytes,
             char* scratch) {
  thread_local dnnl::stream stream(Engine());
  dnnl::memory::desc scratch_md({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, dt::u8, tag::x);
  args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(scratch_md, Engine(), scratch));
  prim.execute(stream, args);
  stream.wait();
}

// Copies ``from`` to ``to`` through the reorder (plain -> inner for inputs, inner -> plain for outputs).
void ApplyReorder(const Reorder& r, bool to_inner, void* from, void* to, char* scratch) {
  dnnl::memory plain(r.plain, Engine(), to_inner ? from : to), inner(r.inner, Engine(), to_inner ? to : from);
  Execute(*r.prim, {{DNNL_ARG_FROM, to_inner ? plain : inner}, {DNNL_ARG_TO, to_inner ? inner : plain}},
          r.scratch, scratch);
}

// out = conv(a, b) with the plan's primitive, through the reorders where formats differ.
// ``b_inner`` (optional): b already in the primitive's format (a kernel shared by all chunks).
void Run(const Plan& p, void* a, void* b, void* out, void* b_inner = nullptr) {
  thread_local Arena arena;
  const bool reorder_b = p.b.prim && b_inner == nullptr;
  const size_t scratch = Arena::Round(std::max({p.scratch, p.a.scratch, p.b.scratch, p.out.scratch}));
  const size_t copies = InnerBytes(p.a) + (reorder_b ? InnerBytes(p.b) : 0) + InnerBytes(p.out);
  char* base = arena.Reserve(scratch + copies);
  char* next = base + scratch;  // the steps run one after the other, so they share one scratchpad at base
  // Where the primitive reads or writes an operand: XLA's buffer itself, or a reordered copy.
  auto place = [&](const Reorder& r, void* plain, bool copy) -> void* {
    if (!r.prim) return plain;
    void* inner = next;
    next += InnerBytes(r);
    if (copy) ApplyReorder(r, true, plain, inner, base);
    return inner;
  };
  void* ia = place(p.a, a, true);
  void* ib = b_inner != nullptr ? b_inner : place(p.b, b, true);
  void* io = place(p.out, out, false);
  Execute(p.prim,
          {{p.arg_a, dnnl::memory(p.a.inner, Engine(), ia)},
           {p.arg_b, dnnl::memory(p.b.inner, Engine(), ib)},
           {p.arg_out, dnnl::memory(p.out.inner, Engine(), io)}},
          p.scratch, base);
  if (p.out.prim) ApplyReorder(p.out, false, io, out, base);
}

// fn(0), ..., fn(n-1) on the calling thread and up to pool.num_threads() - 1 helpers
// (XLA sizes its pool to the cores, and the caller is busy too: one worker per core).
// Indices are taken from a shared counter, so a helper that the pool starts late
// (or never, while its threads are busy) only means the caller does more of them.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t n, done = 0;
    std::function<void(int64_t)> fn;
    std::mutex mutex;
    std::condition_variable all_done;
    std::exception_ptr error;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = fn;  // a copy: a helper that starts after the call returned finds no index and never calls it
  auto work = [state] {
    for (int64_t i; (i = state->next.fetch_add(1)) < state->n;) {
      std::exception_ptr error;
      try {
        state->fn(i);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(state->mutex);
      if (error && !state->error) state->error = error;
      if (++state->done == state->n) state->all_done.notify_all();
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));  // a copy per task
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done == state->n; });
  if (state->error) std::rethrow_exception(state->error);
}

// Contiguous batch chunks [start, start + size): ``n`` of them, sizes differing by at most one.
struct Chunk {
  int64_t start, size;
};

std::vector<Chunk> SplitBatch(int64_t batch, int64_t n) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0, start = 0; i < n; ++i) {
    int64_t size = batch / n + (i < batch % n ? 1 : 0);
    chunks.push_back({start, size});
    start += size;
  }
  return chunks;
}

// Chunks per pool thread: one. Smaller chunks let a thread slowed by another process hand work to the
// others, but each oneDNN call is then smaller and less efficient: on a quiet 2-core AVX2 EPYC the seed
// CNN's penalised step took 17.3-17.9 ms with one chunk per thread against 18.1-18.6 with two (batch
// 32; 73.3-73.5 against 74.1-74.2 ms at batch 128); on a busy machine 1, 2 and 4 timed alike.
constexpr int64_t kChunksPerThread = 1;

// Limits of one oneDNN call, per tensor, with the channels padded to its 16-wide blocks
// (jax_impl/onednn_conv/__init__.py: MAX_EXAMPLE_ELEMENTS, MAX_SIDE; the same numbers).
constexpr int64_t kMaxElements = int64_t{1} << 27;
constexpr int64_t kMaxSide = int64_t{1} << 20;

int64_t Pad16(int64_t c) { return (c + 15) / 16 * 16; }

// Whether the product of the (non-negative) ``factors`` is at most ``limit``, without overflowing.
bool ProductWithin(std::initializer_list<int64_t> factors, int64_t limit) {
  int64_t product = 1;
  for (int64_t f : factors) {
    if (f == 0) return true;
    if (product > limit / f) return false;
    product *= f;
  }
  return true;
}

// The largest of the three tensors of one example (activations) or of the kernel, padded to blocks.
int64_t LargestPerExample(const Shape& s) {
  return std::max({s.h * s.w * Pad16(s.ci), s.ho() * s.wo() * Pad16(s.co), s.kh * s.kw * Pad16(s.ci) * Pad16(s.co)});
}

// Chunks: kChunksPerThread per pool thread, more if a chunk's tensors would exceed kMaxElements;
// at most one per example.
int64_t NumChunks(ffi::ThreadPool& pool, const Shape& s) {
  const int64_t per_chunk = std::max<int64_t>(kMaxElements / std::max<int64_t>(LargestPerExample(s), 1), 1);
  const int64_t needed = (s.b + per_chunk - 1) / per_chunk;
  return std::clamp<int64_t>(std::max<int64_t>(pool.num_threads() * kChunksPerThread, needed), 1, s.b);
}

float* At(void* base, int64_t offset) { return static_cast<float*>(base) + offset; }

// y = conv(x, k) or dx = input_grad(ct, k): chunks of the batch, the kernel reordered once for all of them.
void BatchParallel(ffi::ThreadPool& pool, Op op, const Shape& s, void* a, void* kernel, void* out) {
  const bool forward = op == Op::kForward;
  const int64_t a_per_example = forward ? s.h * s.w * s.ci : s.ho() * s.wo() * s.co;
  const int64_t out_per_example = forward ? s.ho() * s.wo() * s.co : s.h * s.w * s.ci;
  auto chunks = SplitBatch(s.b, NumChunks(pool, s));
  std::vector<std::shared_ptr<const Plan>> plans;
  for (const Chunk& c : chunks) plans.push_back(GetPlan(op, s.with_batch(c.size)));
  // The kernel in each plan's format, reordered once for all the chunks of that plan
  // (chunk sizes differ by at most one, so there are at most two plans).
  std::map<const Plan*, size_t> offsets;  // of each plan's reordered kernel in the arena
  size_t bytes = 0, scratch = 0;
  for (auto& p : plans) {
    if (!p->b.prim || offsets.count(p.get())) continue;
    offsets[p.get()] = bytes;
    bytes += InnerBytes(p->b);
    scratch = std::max(scratch, p->b.scratch);
  }
  thread_local Arena kernel_arena;
  char* base = kernel_arena.Reserve(bytes + scratch);
  for (auto& [p, offset] : offsets) ApplyReorder(p->b, true, kernel, base + offset, base + bytes);
  ParallelFor(pool, static_cast<int64_t>(chunks.size()), [&](int64_t i) {
    SingleThreaded one_thread;
    auto it = offsets.find(plans[i].get());
    Run(*plans[i], At(a, chunks[i].start * a_per_example), kernel, At(out, chunks[i].start * out_per_example),
        it == offsets.end() ? nullptr : base + it->second);
  });
}

// dk = sum over batch chunks of kernel_grad(x chunk, ct chunk).
void KernelGradParallel(ffi::ThreadPool& pool, const Shape& s, void* x, void* ct, void* dk) {
  const int64_t x_per_example = s.h * s.w * s.ci, ct_per_example = s.ho() * s.wo() * s.co;
  const int64_t kernel_size = s.kh * s.kw * s.ci * s.co;
  auto chunks = SplitBatch(s.b, NumChunks(pool, s));
  std::vector<std::shared_ptr<const Plan>> plans;
  for (const Chunk& c : chunks) plans.push_back(GetPlan(Op::kKernelGrad, s.with_batch(c.size)));
  // Chunk 0 writes into dk, the others into their own partial sums (plain HWIO), added at the end.
  thread_local Arena partial_arena;
  float* partials = reinterpret_cast<float*>(
      partial_arena.Reserve(sizeof(float) * kernel_size * std::max<size_t>(chunks.size() - 1, 1)));
  auto partial = [&](int64_t i) {
    return i == 0 ? static_cast<float*>(dk) : partials + (i - 1) * kernel_size;
  };
  ParallelFor(pool, static_cast<int64_t>(chunks.size()), [&](int64_t i) {
    SingleThreaded one_thread;
    const Chunk& c = chunks[i];
    Run(*plans[i], At(x, c.start * x_per_example), At(ct, c.start * ct_per_example), partial(i));
  });
  float* out = static_cast<float*>(dk);
  for (size_t i = 1; i < chunks.size(); ++i) {
    const float* p = partial(static_cast<int64_t>(i));
    for (int64_t e = 0; e < kernel_size; ++e) out[e] += p[e];
  }
}

using F32Buffer = ffi::Buffer<ffi::F32, 4>;

ffi::Error Dispatch(ffi::ThreadPool& pool, Op op, const Shape& s, void* a, void* b, void* out,
                    size_t out_bytes) {
  if (s.b == 0 || s.ci == 0 || s.co == 0 || s.h == 0 || s.w == 0) {
    std::memset(out, 0, out_bytes);  // an empty sum, or an empty array: nothing for oneDNN to do
    return ffi::Error::Success();
  }
  try {
    SingleThreaded one_thread;  // primitives are created for (and run on) one thread each
    if (op == Op::kKernelGrad)
      KernelGradParallel(pool, s, a, b, out);
    else
      BatchParallel(pool, op, s, a, b, out);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") + e.what());
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------- checks

// Collects the disagreements of one call; ``Error()`` is INVALID_ARGUMENT naming them (or Success).
class Checks {
 public:
  explicit Checks(const char* op) : op_(op) {}
  // ``what`` must hold: ``a`` (named) equals ``b`` (named).
  void Equal(const char* a_name, int64_t a, const char* b_name, int64_t b) {
    if (a != b) Fail() << a_name << " = " << a << " but " << b_name << " = " << b;
  }
  std::ostream& Fail() {
    if (failed_) message_ << "; ";
    failed_ = true;
    return message_;
  }
  // The window and size limits of a problem whose dimensions already agree.
  void Problem(const Shape& s) {
    if (s.kh < 1 || s.kw < 1 || s.kh > s.h || s.kw > s.w)
      Fail() << "the kernel window " << s.kh << "x" << s.kw << " must be at least 1x1 and fit in the "
             << s.h << "x" << s.w << " image (VALID padding)";
    else if (s.h > kMaxSide || s.w > kMaxSide || s.b > INT32_MAX ||
             !ProductWithin({s.h, s.w, Pad16(s.ci)}, kMaxElements) ||
             !ProductWithin({s.kh, s.kw, Pad16(s.ci), Pad16(s.co)}, kMaxElements) ||
             !ProductWithin({s.ho(), s.wo(), Pad16(s.co)}, kMaxElements))
      Fail() << "the problem (batch " << s.b << ", image " << s.h << "x" << s.w << ", channels " << s.ci
             << "->" << s.co << ", window " << s.kh << "x" << s.kw << ") exceeds oneDNN's 32-bit limits";
  }
  ffi::Error Error() const {
    if (!failed_) return ffi::Error::Success();
    return ffi::Error::InvalidArgument(std::string("oneDNN ") + op_ + ": " + message_.str());
  }

 private:
  const char* op_;
  bool failed_ = false;
  std::ostringstream message_;
};

ffi::Error Forward(ffi::ThreadPool pool, F32Buffer x, F32Buffer k, ffi::Result<F32Buffer> y) {
  auto xd = x.dimensions(), kd = k.dimensions(), yd = y->dimensions();
  Shape s{xd[0], xd[1], xd[2], xd[3], kd[3], kd[0], kd[1]};
  Checks check("conv_forward");
  check.Equal("x channels", s.ci, "kernel input channels", kd[2]);
  check.Problem(s);
  if (!check.Error().success()) return check.Error();
  check.Equal("result batch", yd[0], "x batch", s.b);
  check.Equal("result height", yd[1], "H - kh + 1", s.ho());
  check.Equal("result width", yd[2], "W - kw + 1", s.wo());
  check.Equal("result channels", yd[3], "kernel output channels", s.co);
  if (!check.Error().success()) return check.Error();
  return Dispatch(pool, Op::kForward, s, x.untyped_data(), k.untyped_data(), y->untyped_data(),
                  y->size_bytes());
}

ffi::Error InputGrad(ffi::ThreadPool pool, F32Buffer ct, F32Buffer k, ffi::Result<F32Buffer> dx) {
  auto cd = ct.dimensions(), dd = dx->dimensions(), kd = k.dimensions();
  Shape s{dd[0], dd[1], dd[2], dd[3], kd[3], kd[0], kd[1]};
  Checks check("conv_input_grad");
  check.Equal("result channels", s.ci, "kernel input channels", kd[2]);
  check.Equal("ct channels", cd[3], "kernel output channels", s.co);
  check.Equal("ct batch", cd[0], "result batch", s.b);
  check.Problem(s);
  if (!check.Error().success()) return check.Error();
  check.Equal("ct height", cd[1], "H - kh + 1", s.ho());
  check.Equal("ct width", cd[2], "W - kw + 1", s.wo());
  if (!check.Error().success()) return check.Error();
  return Dispatch(pool, Op::kInputGrad, s, ct.untyped_data(), k.untyped_data(), dx->untyped_data(),
                  dx->size_bytes());
}

ffi::Error KernelGrad(ffi::ThreadPool pool, F32Buffer x, F32Buffer ct, ffi::Result<F32Buffer> dk) {
  auto xd = x.dimensions(), cd = ct.dimensions(), kd = dk->dimensions();
  Shape s{xd[0], xd[1], xd[2], xd[3], kd[3], kd[0], kd[1]};
  Checks check("conv_kernel_grad");
  check.Equal("ct batch", cd[0], "x batch", s.b);
  check.Equal("result input channels", kd[2], "x channels", s.ci);
  check.Equal("result output channels", s.co, "ct channels", cd[3]);
  check.Problem(s);
  if (!check.Error().success()) return check.Error();
  check.Equal("ct height", cd[1], "H - kh + 1", s.ho());
  check.Equal("ct width", cd[2], "W - kw + 1", s.wo());
  if (!check.Error().success()) return check.Error();
  return Dispatch(pool, Op::kKernelGrad, s, x.untyped_data(), ct.untyped_data(), dk->untyped_data(),
                  dk->size_bytes());
}

// (pool; a, b) -> out, all rank-4 float32.
auto Binding() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32Buffer>().Arg<F32Buffer>().Ret<F32Buffer>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AgpOnednnConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AgpOnednnConvInputGrad, InputGrad, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AgpOnednnConvKernelGrad, KernelGrad, Binding());
