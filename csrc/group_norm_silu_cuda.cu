// CUDA kernels of fluxrt_C::group_norm_silu / add_group_norm_silu (schema and CPU kernels: group_norm_silu.cpp).
//
// Three launches, sized to fill the GPU even at N * G = 32 ([1, 128, 1024, 1024]: 32 groups of 4M elements):
// 1. Partial statistics over many blocks per group. Each thread keeps VEC lane-wise Welford states (one
//    reciprocal per 16-byte load); the block Chan-merges them and writes one (mean, m2) per block (NCHW, where a
//    group is one contiguous slab) or per channel of its pixel tile (channels_last, where a group is D channels
//    of every pixel: whole pixel rows are read, so loads stay coalesced even at D = 4).
// 2. One block per (n, g) Chan-merges the group's partials in double -> mean, rstd.
// 3. Elementwise (x - mean) * rstd * w + b, SiLU, one rounding to T.
// With a residual, pass 1 also writes s = x + y (rounded to T as torch's add does) and pass 3 reads s back:
// 5 tensor-sized transfers instead of the unfused 6. All math in fp32; 16-byte loads/stores where aligned.

#include "group_norm_silu.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace fluxrt {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename A>
struct Welford {
  A n, mean, m2;  // m2: sum of squared deviations from mean
};

// Chan, Golub & LeVeque's pairwise update: the exact moments of the union of two sets.
template <typename A>
__device__ __forceinline__ Welford<A> merge(Welford<A> a, Welford<A> b) {
  const A n = a.n + b.n;
  if (n == A(0)) return a;
  const A delta = b.mean - a.mean, wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

// Merge over the whole block (all kThreads threads call it); the result is valid in thread 0.
template <typename A>
__device__ Welford<A> block_merge(Welford<A> s) {
  __shared__ Welford<A> warp_stats[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) {
    const Welford<A> o{__shfl_down_sync(0xffffffffu, s.n, offset), __shfl_down_sync(0xffffffffu, s.mean, offset),
                       __shfl_down_sync(0xffffffffu, s.m2, offset)};
    s = merge(s, o);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // a previous call's readers of warp_stats are done
  if (lane == 0) warp_stats[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? warp_stats[lane] : Welford<A>{0, 0, 0};
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
      const Welford<A> o{__shfl_down_sync(0xffffffffu, s.n, offset), __shfl_down_sync(0xffffffffu, s.mean, offset),
                         __shfl_down_sync(0xffffffffu, s.m2, offset)};
      s = merge(s, o);
    }
  }
  return s;
}

// VEC running Welford states fed one vector at a time: lane k sees element k of every vector.
template <int VEC>
struct LaneWelford {
  float mean[VEC] = {}, m2[VEC] = {};
  int n = 0;

  __device__ __forceinline__ void add(const float (&f)[VEC]) {
    ++n;
    const float inv = 1.f / n;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = f[k] - mean[k];
      mean[k] += d * inv;
      m2[k] += d * (f[k] - mean[k]);
    }
  }
  __device__ __forceinline__ Welford<float> lane(int k) const { return {static_cast<float>(n), mean[k], m2[k]}; }
};

// f = the op's input at element i in fp32: x, or with a residual s = x + y rounded to T (written to s too).
template <typename T, int VEC, bool ADD>
__device__ __forceinline__ void load_input(const T* x, const T* y, T* s, int64_t i, float (&f)[VEC]) {
  Pack<T, VEC> a = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
  if constexpr (ADD) {
    const Pack<T, VEC> b = *reinterpret_cast<const Pack<T, VEC>*>(y + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a.v[k] = static_cast<T>(static_cast<float>(a.v[k]) + static_cast<float>(b.v[k]));
    *reinterpret_cast<Pack<T, VEC>*>(s + i) = a;
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) f[k] = static_cast<float>(a.v[k]);
}

__device__ __forceinline__ float affine_silu(float v, float mean, float scale, float shift, bool silu) {
  const float r = fmaf(v - mean, scale, shift);
  return silu ? r / (1.f + expf(-r)) : r;
}

// NCHW, grid (N * G, chunks): block (ng, k) reduces elements [k * chunk, (k + 1) * chunk) of group slab ng.
template <typename T, int VEC, bool ADD>
__global__ void __launch_bounds__(kThreads)
    nchw_partial_stats(const T* x, const T* y, T* s, int64_t L, int64_t chunk, float* part_mean, float* part_m2) {
  const int64_t start = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * L + start, vectors = min64(chunk, L - start) / VEC;
  LaneWelford<VEC> acc;
#pragma unroll 4
  for (int64_t v = threadIdx.x; v < vectors; v += kThreads) {
    float f[VEC];
    load_input<T, VEC, ADD>(x, y, s, base + v * VEC, f);
    acc.add(f);
  }
  Welford<float> st{0.f, 0.f, 0.f};
#pragma unroll
  for (int k = 0; k < VEC; ++k) st = merge(st, acc.lane(k));
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const int64_t p = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
    part_mean[p] = st.mean;
    part_m2[p] = st.m2;
  }
}

// channels_last ([N, HW, C] in memory), grid (N * tiles): block (n, t) covers pixels [t * tile, (t + 1) * tile).
// Its threads form [kThreads / cols][cols]: thread (row, col) owns channel vector col (+ cols, ...) and every
// rows-th pixel of the tile. Writes per-channel partials [N, tiles, C].
template <typename T, int VEC, bool ADD>
__global__ void __launch_bounds__(kThreads)
    channels_last_partial_stats(const T* x, const T* y, T* s, int64_t HW, int C, int64_t tile, int cols,
                                float* part_mean, float* part_m2) {
  __shared__ float sh_mean[kThreads][VEC], sh_m2[kThreads][VEC];
  __shared__ int sh_n[kThreads];
  const int64_t tiles = ceil_div(HW, tile);
  const int64_t n = blockIdx.x / tiles, p0 = (blockIdx.x % tiles) * tile, p1 = min64(HW, p0 + tile);
  const int rows = kThreads / cols, col = threadIdx.x % cols, row = threadIdx.x / cols, vectors = C / VEC;
  for (int j0 = 0; j0 < vectors; j0 += cols) {
    const int j = j0 + col;
    LaneWelford<VEC> acc;
    if (row < rows && j < vectors) {
#pragma unroll 4
      for (int64_t p = p0 + row; p < p1; p += rows) {
        float f[VEC];
        load_input<T, VEC, ADD>(x, y, s, (n * HW + p) * C + j * VEC, f);
        acc.add(f);
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      sh_mean[threadIdx.x][k] = acc.mean[k];
      sh_m2[threadIdx.x][k] = acc.m2[k];
    }
    sh_n[threadIdx.x] = acc.n;
    __syncthreads();
    if (row == 0 && j < vectors) {  // merge the column's rows, channel by channel
      for (int k = 0; k < VEC; ++k) {
        Welford<float> st{0.f, 0.f, 0.f};
        for (int r = 0; r < rows; ++r) {
          const int t = r * cols + col;
          st = merge(st, Welford<float>{static_cast<float>(sh_n[t]), sh_mean[t][k], sh_m2[t][k]});
        }
        const int64_t p = static_cast<int64_t>(blockIdx.x) * C + j * VEC + k;
        part_mean[p] = st.mean;
        part_m2[p] = st.m2;
      }
    }
    __syncthreads();  // shared memory is reused by the next channel batch
  }
}

// Where pass 1 left a group's partials. NCHW: [N * G, parts], part k holding min(part_size, total - k *
// part_size) elements. channels_last: [N, parts, C], the group's D channels of tile k each holding the tile's
// min(part_size, total - k * part_size) pixels.
struct PartialLayout {
  bool channels_last;
  int64_t parts, part_size, total, C, D, G;
};

// grid (N * G): mean and rstd of group ng from its partials, merged in double in a fixed order (deterministic).
__global__ void __launch_bounds__(kThreads)
    finalize_stats(const float* part_mean, const float* part_m2, PartialLayout pl, double eps, float* mean,
                   float* rstd) {
  const int64_t ng = blockIdx.x, n = ng / pl.G, g = ng % pl.G;
  const int64_t items = pl.channels_last ? pl.parts * pl.D : pl.parts;
  Welford<double> st{0, 0, 0};
  for (int64_t i = threadIdx.x; i < items; i += kThreads) {
    const int64_t part = pl.channels_last ? i / pl.D : i;
    const int64_t idx = pl.channels_last ? (n * pl.parts + part) * pl.C + g * pl.D + i % pl.D : ng * pl.parts + i;
    const double count = static_cast<double>(min64(pl.part_size, pl.total - part * pl.part_size));
    st = merge(st, Welford<double>{count, part_mean[idx], part_m2[idx]});
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    mean[ng] = static_cast<float>(st.mean);
    rstd[ng] = static_cast<float>(rsqrt(fmax(st.m2 / st.n, 0.0) + eps));
  }
}

// NCHW, grid (N * C, chunks): block (row, k) normalises elements [k * chunk, (k + 1) * chunk) of (n, c) row.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    nchw_normalize(const T* src, T* out, int64_t HW, int64_t chunk, int C, int D, const float* mean,
                   const float* rstd, const float* weight, const float* bias, bool silu) {
  const int64_t row = blockIdx.x, start = static_cast<int64_t>(blockIdx.y) * chunk;
  const int c = static_cast<int>(row % C);
  const int64_t ng = (row / C) * (C / D) + c / D;
  const float m = mean[ng], a = rstd[ng] * weight[c], b = bias[c];
  const int64_t base = row * HW + start, vectors = min64(chunk, HW - start) / VEC;
#pragma unroll 4
  for (int64_t v = threadIdx.x; v < vectors; v += kThreads) {
    Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(src + base + v * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.v[k] = static_cast<T>(affine_silu(static_cast<float>(p.v[k]), m, a, b, silu));
    *reinterpret_cast<Pack<T, VEC>*>(out + base + v * VEC) = p;
  }
}

// channels_last, same grid and thread layout as channels_last_partial_stats; each thread holds the parameters of
// its VEC channels in registers.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    channels_last_normalize(const T* src, T* out, int64_t HW, int C, int D, int64_t tile, int cols,
                            const float* mean, const float* rstd, const float* weight, const float* bias, bool silu) {
  const int rows = kThreads / cols, col = threadIdx.x % cols, row = threadIdx.x / cols, vectors = C / VEC;
  if (row >= rows) return;
  const int64_t tiles = ceil_div(HW, tile);
  const int64_t n = blockIdx.x / tiles, p0 = (blockIdx.x % tiles) * tile, p1 = min64(HW, p0 + tile);
  for (int j = col; j < vectors; j += cols) {
    float m[VEC], a[VEC], b[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int c = j * VEC + k;
      const int64_t ng = n * (C / D) + c / D;
      m[k] = mean[ng];
      a[k] = rstd[ng] * weight[c];
      b[k] = bias[c];
    }
#pragma unroll 4
    for (int64_t p = p0 + row; p < p1; p += rows) {
      const int64_t i = (n * HW + p) * C + j * VEC;
      Pack<T, VEC> v = *reinterpret_cast<const Pack<T, VEC>*>(src + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v.v[k] = static_cast<T>(affine_silu(static_cast<float>(v.v[k]), m[k], a[k], b[k], silu));
      *reinterpret_cast<Pack<T, VEC>*>(out + i) = v;
    }
  }
}

// ---- host side ----

struct Launch {
  cudaStream_t stream;
  int sms;
  at::TensorOptions floats;
};

// Blocks of `kernel` the whole GPU runs at once: the reductions split their work into one such wave of equal
// blocks, so there is no partly-filled last wave.
template <typename Kernel>
int64_t full_wave(Kernel kernel, int sms) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  return int64_t{sms} * std::max(per_sm, 1);
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads per pixel row in the channels_last kernels: one per channel vector, at most the whole block.
int channel_columns(int64_t C, int vec) { return static_cast<int>(std::min<int64_t>(C / vec, kThreads)); }

// Pixels per channels_last block: about target_blocks blocks overall, and at least one pixel per thread row.
int64_t pixel_tile(const GroupNormShape& sh, int cols, int64_t target_blocks) {
  const int64_t rows = kThreads / cols;
  const int64_t tiles = std::clamp(ceil_div(target_blocks, sh.N), int64_t{1}, ceil_div(sh.HW, rows));
  return ceil_div(sh.HW, tiles);
}

template <typename T, int VEC, bool ADD>
void partial_stats(const T* x, const T* y, T* s, const GroupNormShape& sh, const Launch& l, at::Tensor& part,
                   PartialLayout& pl) {
  if (sh.layout == Layout::NCHW) {
    const int64_t L = sh.D * sh.HW;
    // One wave of blocks shared out over the groups, each with >= 4 vectors per thread; gridDim.y <= 65535.
    const int64_t target = full_wave(nchw_partial_stats<T, VEC, ADD>, l.sms);
    const int64_t chunks = std::clamp(ceil_div(target, sh.N * sh.G), int64_t{1}, int64_t{65535});
    const int64_t chunk = round_up(std::max<int64_t>(ceil_div(L, chunks), kThreads * VEC * 4), VEC);
    pl = {false, ceil_div(L, chunk), chunk, L, sh.C, sh.D, sh.G};
    part = at::empty({2, sh.N * sh.G * pl.parts}, l.floats);
    const dim3 grid(static_cast<unsigned>(sh.N * sh.G), static_cast<unsigned>(pl.parts));
    nchw_partial_stats<T, VEC, ADD><<<grid, kThreads, 0, l.stream>>>(x, y, s, L, chunk, part[0].data_ptr<float>(),
                                                                     part[1].data_ptr<float>());
  } else {
    const int cols = channel_columns(sh.C, VEC);
    const int64_t tile = pixel_tile(sh, cols, full_wave(channels_last_partial_stats<T, VEC, ADD>, l.sms));
    pl = {true, ceil_div(sh.HW, tile), tile, sh.HW, sh.C, sh.D, sh.G};
    part = at::empty({2, sh.N * pl.parts * sh.C}, l.floats);
    channels_last_partial_stats<T, VEC, ADD><<<static_cast<unsigned>(sh.N * pl.parts), kThreads, 0, l.stream>>>(
        x, y, s, sh.HW, static_cast<int>(sh.C), tile, cols, part[0].data_ptr<float>(), part[1].data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void normalize(const T* src, T* out, const GroupNormShape& sh, const Launch& l, const float* mean, const float* rstd,
               const float* weight, const float* bias, bool silu) {
  const int C = static_cast<int>(sh.C), D = static_cast<int>(sh.D);
  if (sh.layout == Layout::NCHW) {
    const int64_t chunk = round_up(std::max<int64_t>(ceil_div(sh.HW, 65535), kThreads * VEC * 8), VEC);
    const dim3 grid(static_cast<unsigned>(sh.N * sh.C), static_cast<unsigned>(ceil_div(sh.HW, chunk)));
    nchw_normalize<T, VEC><<<grid, kThreads, 0, l.stream>>>(src, out, sh.HW, chunk, C, D, mean, rstd, weight, bias,
                                                            silu);
  } else {
    const int cols = channel_columns(sh.C, VEC);
    const int64_t tile = pixel_tile(sh, cols, full_wave(channels_last_normalize<T, VEC>, l.sms));
    channels_last_normalize<T, VEC><<<static_cast<unsigned>(sh.N * ceil_div(sh.HW, tile)), kThreads, 0, l.stream>>>(
        src, out, sh.HW, C, D, tile, cols, mean, rstd, weight, bias, silu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The whole op: x (and y, then s = x + y is written) -> out.
template <typename T>
void run(const T* x, const T* y, T* s, T* out, const float* weight, const float* bias, const GroupNormShape& sh,
         double eps, bool silu, const Launch& l) {
  constexpr int V = 16 / sizeof(T);
  const bool aligned = aligned16(x) && aligned16(y) && aligned16(s) && aligned16(out);
  // A vector must never straddle a group slab (stats) or an (n, c) row (NCHW normalise) or a pixel (channels_last).
  const bool vec_stats = aligned && (sh.layout == Layout::NCHW ? (sh.D * sh.HW) % V == 0 : sh.C % V == 0);
  const bool vec_norm = aligned && (sh.layout == Layout::NCHW ? sh.HW % V == 0 : sh.C % V == 0);

  at::Tensor part;
  PartialLayout pl;
  if (y != nullptr) {
    vec_stats ? partial_stats<T, V, true>(x, y, s, sh, l, part, pl) : partial_stats<T, 1, true>(x, y, s, sh, l, part, pl);
  } else {
    vec_stats ? partial_stats<T, V, false>(x, y, s, sh, l, part, pl)
              : partial_stats<T, 1, false>(x, y, s, sh, l, part, pl);
  }
  const at::Tensor stats = at::empty({2, sh.N * sh.G}, l.floats);  // mean, rstd per (n, g)
  float* mean = stats[0].data_ptr<float>();
  float* rstd = stats[1].data_ptr<float>();
  finalize_stats<<<static_cast<unsigned>(sh.N * sh.G), kThreads, 0, l.stream>>>(
      part[0].data_ptr<float>(), part[1].data_ptr<float>(), pl, eps, mean, rstd);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const T* src = y != nullptr ? s : x;
  vec_norm ? normalize<T, V>(src, out, sh, l, mean, rstd, weight, bias, silu)
           : normalize<T, 1>(src, out, sh, l, mean, rstd, weight, bias, silu);
}

std::tuple<at::Tensor, at::Tensor> run_op(const char* op, const at::Tensor& x, const at::Tensor* y,
                                          const at::Tensor& weight, const at::Tensor& bias, int64_t num_groups,
                                          double eps, bool silu) {
  const auto sh = check_inputs(op, x, y, weight, bias, num_groups);
  at::Tensor out = empty_in_layout(x, sh.layout);
  at::Tensor s = y != nullptr ? empty_in_layout(x, sh.layout) : at::Tensor();
  if (x.numel() == 0) return {s, out};

  const c10::cuda::CUDAGuard guard(x.device());
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const Launch l{c10::cuda::getCurrentCUDAStream().stream(), sms, x.options().dtype(at::kFloat)};
  const at::Tensor w = as_float_vector(weight), b = as_float_vector(bias);
  FLUXRT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fluxrt_C group_norm_silu (CUDA)", [&] {
    run<scalar_t>(x.const_data_ptr<scalar_t>(), y != nullptr ? y->const_data_ptr<scalar_t>() : nullptr,
                  s.defined() ? s.mutable_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
                  w.const_data_ptr<float>(), b.const_data_ptr<float>(), sh, eps, silu, l);
  });
  return {s, out};
}

at::Tensor group_norm_silu_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                int64_t num_groups, double eps, bool silu) {
  return std::get<1>(run_op("fluxrt_C::group_norm_silu", x, nullptr, weight, bias, num_groups, eps, silu));
}

std::tuple<at::Tensor, at::Tensor> add_group_norm_silu_cuda(const at::Tensor& x, const at::Tensor& y,
                                                            const at::Tensor& weight, const at::Tensor& bias,
                                                            int64_t num_groups, double eps, bool silu) {
  return run_op("fluxrt_C::add_group_norm_silu", x, &y, weight, bias, num_groups, eps, silu);
}

}  // namespace
}  // namespace fluxrt

TORCH_LIBRARY_IMPL(fluxrt_C, CUDA, m) {
  m.impl("group_norm_silu", &fluxrt::group_norm_silu_cuda);
  m.impl("add_group_norm_silu", &fluxrt::add_group_norm_silu_cuda);
}
