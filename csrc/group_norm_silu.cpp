// Schema of the fluxrt_C ops, the argument checks shared with CUDA, and the CPU kernels.
//
// CPU design. Statistics come from fixed-size chunks: each chunk's mean (summed around a pivot, its first
// value, so a large common offset cancels before fp32 rounding), then its sum of squared deviations from that
// mean (an exact second pass while the chunk sits in cache). Chunks are merged per group with Chan et al.'s
// formula in double. That is stable for 4M-element groups with a large mean, reads x from memory once for the
// statistics, and is deterministic for any thread count: the chunking and the merge order never depend on it.
// A second parallel pass normalises. Both passes use at::vec::Vectorized<float> (fp32 math; bf16/fp16 are
// converted on load and rounded once on store).

#include "group_norm_silu.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fluxrt {

GroupNormShape check_inputs(const char* op, const at::Tensor& x, const at::Tensor* y, const at::Tensor& weight,
                            const at::Tensor& bias, int64_t num_groups) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dtype);
  const int64_t C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, op, ": num_groups must divide the channel count C = ", C,
              ", got num_groups = ", num_groups);
  auto check_vector = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
                "; move them to the same device");
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape [C] = [", C, "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == dtype || t.scalar_type() == at::kFloat, op, ": ", name,
                " must be float32 or x's dtype (", dtype, "), got ", t.scalar_type());
  };
  check_vector("weight", weight);
  check_vector("bias", bias);

  // A tensor with C == 1 or H * W == 1 is both; it is read as NCHW, which is the same memory order then.
  Layout layout;
  if (x.is_contiguous()) {
    layout = Layout::NCHW;
  } else {
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
                ": x must be contiguous NCHW or channels_last, got strides ", x.strides(),
                "; call .contiguous() or .contiguous(memory_format=torch.channels_last)");
    layout = Layout::ChannelsLast;
  }
  if (y != nullptr) {
    TORCH_CHECK(y->device() == x.device(), op, ": y is on ", y->device(), " but x is on ", x.device(),
                "; move them to the same device");
    TORCH_CHECK(y->sizes() == x.sizes(), op, ": y must have x's shape ", x.sizes(), ", got ", y->sizes());
    TORCH_CHECK(y->scalar_type() == dtype, op, ": y must have x's dtype ", dtype, ", got ", y->scalar_type(),
                "; cast one of them");
    const bool same_layout = layout == Layout::NCHW ? y->is_contiguous()
                                                    : y->is_contiguous(at::MemoryFormat::ChannelsLast);
    TORCH_CHECK(same_layout, op, ": y must have x's memory format (",
                layout == Layout::NCHW ? "contiguous NCHW" : "channels_last", "), got strides ", y->strides(),
                "; call .contiguous() or .contiguous(memory_format=torch.channels_last) on it");
  }
  return {x.size(0), C, x.size(2) * x.size(3), num_groups, C / num_groups, layout};
}

at::Tensor empty_in_layout(const at::Tensor& x, Layout layout) {
  return at::empty(x.sizes(), x.options(),
                   layout == Layout::NCHW ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast);
}

at::Tensor as_float_vector(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kChunk = 16384;       // elements per statistics chunk (64 KiB of fp32: stays in L2)
constexpr int64_t kMaxTileRows = 1024;  // channels_last: pixels per chunk, so per-channel fp32 sums stay short
constexpr int64_t kGrain = 32768;       // elements per parallel_for task in the normalise pass

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Moments {
  double count = 0, mean = 0, m2 = 0;  // m2: sum of squared deviations from mean
};

// Chan, Golub & LeVeque's pairwise update: the exact moments of the union of two sets.
Moments merge(const Moments& a, const Moments& b) {
  const double n = a.count + b.count;
  if (n == 0) return a;
  const double delta = b.mean - a.mean, wb = b.count / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

template <typename T>
Vec load_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    float tmp[kVec];
    for (int64_t i = 0; i < kVec; ++i) tmp[i] = static_cast<float>(p[i]);
    return Vec::loadu(tmp);
  }
}

template <typename T>
void store_float(T* p, Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    float tmp[kVec];
    v.store(tmp);
    for (int64_t i = 0; i < kVec; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

float lane_sum(Vec v) {
  float lanes[kVec];
  v.store(lanes);
  float s = 0;
  for (float l : lanes) s += l;
  return s;
}

// buf[0, n) = the op's input in fp32: x, or with a residual s = x + y rounded to T (also written to s) exactly as
// torch's x + y rounds it, so the statistics and the normalisation see the rounded s.
template <typename T>
void load_chunk(const T* x, const T* y, T* s, int64_t n, float* buf) {
  if (y == nullptr) {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const T v = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(y[i]));
    s[i] = v;
    buf[i] = static_cast<float>(v);
  }
}

// Moments of a contiguous fp32 run (NCHW: a piece of one group).
Moments run_moments(const float* p, int64_t n) {
  const float pivot = p[0];
  Vec acc(0.f), vpivot(pivot);
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) acc += Vec::loadu(p + i) - vpivot;
  float shifted = lane_sum(acc);
  for (; i < n; ++i) shifted += p[i] - pivot;
  const double mean = pivot + static_cast<double>(shifted) / n;

  const float meanf = static_cast<float>(mean);
  Vec sq(0.f), vmean(meanf);
  for (i = 0; i + kVec <= n; i += kVec) {
    const Vec d = Vec::loadu(p + i) - vmean;
    sq = at::vec::fmadd(d, d, sq);
  }
  float m2 = lane_sum(sq);
  for (; i < n; ++i) m2 += (p[i] - meanf) * (p[i] - meanf);
  return {static_cast<double>(n), mean, m2};
}

// acc[c] += sum over rows of f(rows[r * C + c], c) for an [nrows, C] fp32 block, vectorised along C.
template <typename VecF, typename ScalarF>
void column_sums(const float* rows, int64_t nrows, int64_t C, float* acc, VecF vf, ScalarF sf) {
  std::fill(acc, acc + C, 0.f);
  for (int64_t r = 0; r < nrows; ++r) {
    const float* row = rows + r * C;
    int64_t c = 0;
    for (; c + kVec <= C; c += kVec) (Vec::loadu(acc + c) + vf(Vec::loadu(row + c), c)).store(acc + c);
    for (; c < C; ++c) acc[c] += sf(row[c], c);
  }
}

// Per-(n, g) moments of x (or s = x + y) in NCHW: a group is one contiguous slab of D * HW elements.
template <typename T>
std::vector<Moments> nchw_moments(const T* x, const T* y, T* s, const GroupNormShape& sh) {
  const int64_t L = sh.D * sh.HW, chunks = ceil_div(L, kChunk), groups = sh.N * sh.G;
  std::vector<Moments> part(groups * chunks);
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::min(L, kChunk));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = i % chunks, off = (i / chunks) * L + k * kChunk, n = std::min(kChunk, L - k * kChunk);
      load_chunk(x + off, y ? y + off : nullptr, s ? s + off : nullptr, n, buf.data());
      part[i] = run_moments(buf.data(), n);
    }
  });
  std::vector<Moments> out(groups);
  for (int64_t i = 0; i < groups * chunks; ++i) out[i / chunks] = merge(out[i / chunks], part[i]);
  return out;
}

// Per-(n, g) moments in channels_last ([N, HW, C] in memory): a group is D channels of every pixel, so work is
// split over pixel tiles (all channels, read contiguously) with per-tile, per-group partial moments.
template <typename T>
std::vector<Moments> channels_last_moments(const T* x, const T* y, T* s, const GroupNormShape& sh) {
  const int64_t C = sh.C, D = sh.D, G = sh.G;
  const int64_t tile = std::clamp(kChunk / C, int64_t{1}, kMaxTileRows), tiles = ceil_div(sh.HW, tile);
  std::vector<Moments> part(sh.N * tiles * G);
  at::parallel_for(0, sh.N * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(tile * C), sums(C), centre(C);
    std::vector<double> group_mean(G);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / tiles, p0 = (i % tiles) * tile, rows = std::min(tile, sh.HW - p0);
      const int64_t off = (n * sh.HW + p0) * C;
      load_chunk(x + off, y ? y + off : nullptr, s ? s + off : nullptr, rows * C, buf.data());
      // Pass 1: per-channel sums around the first row (the pivot), then each group's mean in double.
      const float* pivot = buf.data();
      column_sums(buf.data(), rows, C, sums.data(), [&](Vec v, int64_t c) { return v - Vec::loadu(pivot + c); },
                  [&](float v, int64_t c) { return v - pivot[c]; });
      std::fill(group_mean.begin(), group_mean.end(), 0.0);
      for (int64_t c = 0; c < C; ++c) group_mean[c / D] += (pivot[c] + static_cast<double>(sums[c]) / rows) / D;
      for (int64_t c = 0; c < C; ++c) centre[c] = static_cast<float>(group_mean[c / D]);
      // Pass 2: squared deviations from the group mean, per channel, then per group.
      column_sums(buf.data(), rows, C, sums.data(),
                  [&](Vec v, int64_t c) { const Vec d = v - Vec::loadu(centre.data() + c); return d * d; },
                  [&](float v, int64_t c) { return (v - centre[c]) * (v - centre[c]); });
      for (int64_t g = 0; g < G; ++g) {
        double m2 = 0;
        for (int64_t d = 0; d < D; ++d) m2 += sums[g * D + d];
        part[i * G + g] = {static_cast<double>(rows * D), group_mean[g], m2};
      }
    }
  });
  std::vector<Moments> out(sh.N * G);
  for (int64_t n = 0; n < sh.N; ++n)
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t g = 0; g < G; ++g) out[n * G + g] = merge(out[n * G + g], part[(n * tiles + t) * G + g]);
  return out;
}

Vec affine_silu(Vec v, Vec mean, Vec scale, Vec shift, bool silu) {
  const Vec r = at::vec::fmadd(v - mean, scale, shift);
  return silu ? r / (Vec(1.f) + r.neg().exp()) : r;
}

float affine_silu(float v, float mean, float scale, float shift, bool silu) {
  const float r = (v - mean) * scale + shift;
  return silu ? r / (1.f + std::exp(-r)) : r;
}

// out = affine_silu(src) for a group's statistics and the per-channel weight / bias, both layouts.
template <typename T>
void normalize(const T* src, T* out, const GroupNormShape& sh, const std::vector<Moments>& moments,
               const float* weight, const float* bias, double eps, bool silu) {
  // Per (n, c): the group mean and rstd * weight[c]; (x - mean) * scale + bias keeps a large mean from
  // cancelling in fp32 as x * scale + (bias - mean * scale) would.
  std::vector<float> mean(sh.N * sh.C), scale(sh.N * sh.C);
  for (int64_t n = 0; n < sh.N; ++n) {
    for (int64_t c = 0; c < sh.C; ++c) {
      const Moments& m = moments[n * sh.G + c / sh.D];
      const double rstd = 1.0 / std::sqrt(std::max(m.m2 / m.count, 0.0) + eps);
      mean[n * sh.C + c] = static_cast<float>(m.mean);
      scale[n * sh.C + c] = static_cast<float>(rstd * weight[c]);
    }
  }
  if (sh.layout == Layout::NCHW) {
    at::parallel_for(0, sh.N * sh.C * sh.HW, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end;) {  // one (n, c) row at a time: its parameters are scalars
        const int64_t row = i / sh.HW, row_end = std::min(end, (row + 1) * sh.HW), c = row % sh.C;
        const float m = mean[row], a = scale[row], b = bias[c];
        for (; i + kVec <= row_end; i += kVec)
          store_float(out + i, affine_silu(load_float(src + i), Vec(m), Vec(a), Vec(b), silu));
        for (; i < row_end; ++i) out[i] = static_cast<T>(affine_silu(static_cast<float>(src[i]), m, a, b, silu));
      }
    });
    return;
  }
  at::parallel_for(0, sh.N * sh.HW, std::max<int64_t>(1, kGrain / sh.C), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {  // one pixel: C channels with per-channel parameters
      const T* in = src + p * sh.C;
      T* o = out + p * sh.C;
      const float* m = mean.data() + (p / sh.HW) * sh.C;
      const float* a = scale.data() + (p / sh.HW) * sh.C;
      int64_t c = 0;
      for (; c + kVec <= sh.C; c += kVec)
        store_float(o + c, affine_silu(load_float(in + c), Vec::loadu(m + c), Vec::loadu(a + c),
                                       Vec::loadu(bias + c), silu));
      for (; c < sh.C; ++c) o[c] = static_cast<T>(affine_silu(static_cast<float>(in[c]), m[c], a[c], bias[c], silu));
    }
  });
}

// The whole op on CPU: x (and y, then s = x + y is written) -> out.
template <typename T>
void run(const T* x, const T* y, T* s, T* out, const float* weight, const float* bias, const GroupNormShape& sh,
         double eps, bool silu) {
  const auto moments = sh.layout == Layout::NCHW ? nchw_moments(x, y, s, sh) : channels_last_moments(x, y, s, sh);
  normalize(y ? static_cast<const T*>(s) : x, out, sh, moments, weight, bias, eps, silu);
}

at::Tensor group_norm_silu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                               int64_t num_groups, double eps, bool silu) {
  const auto sh = check_inputs("fluxrt_C::group_norm_silu", x, nullptr, weight, bias, num_groups);
  at::Tensor out = empty_in_layout(x, sh.layout);
  if (x.numel() == 0) return out;
  const at::Tensor w = as_float_vector(weight), b = as_float_vector(bias);
  FLUXRT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fluxrt_C::group_norm_silu", [&] {
    run<scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, nullptr, out.mutable_data_ptr<scalar_t>(),
                  w.const_data_ptr<float>(), b.const_data_ptr<float>(), sh, eps, silu);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_group_norm_silu_cpu(const at::Tensor& x, const at::Tensor& y,
                                                           const at::Tensor& weight, const at::Tensor& bias,
                                                           int64_t num_groups, double eps, bool silu) {
  const auto sh = check_inputs("fluxrt_C::add_group_norm_silu", x, &y, weight, bias, num_groups);
  at::Tensor s = empty_in_layout(x, sh.layout), out = empty_in_layout(x, sh.layout);
  if (x.numel() == 0) return {s, out};
  const at::Tensor w = as_float_vector(weight), b = as_float_vector(bias);
  FLUXRT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "fluxrt_C::add_group_norm_silu", [&] {
    run<scalar_t>(x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), s.mutable_data_ptr<scalar_t>(),
                  out.mutable_data_ptr<scalar_t>(), w.const_data_ptr<float>(), b.const_data_ptr<float>(), sh, eps,
                  silu);
  });
  return {s, out};
}

}  // namespace
}  // namespace fluxrt

TORCH_LIBRARY(fluxrt_C, m) {
  // Fake (meta) implementations live in Python; this tells torch where, for calls made before it was imported.
  m.set_python_module("fluxrt.ops.group_norm_silu");
  m.def("group_norm_silu(Tensor x, Tensor weight, Tensor bias, int num_groups, float eps, bool silu) -> Tensor");
  m.def("add_group_norm_silu(Tensor x, Tensor y, Tensor weight, Tensor bias, int num_groups, float eps, bool silu)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fluxrt_C, CPU, m) {
  m.impl("group_norm_silu", &fluxrt::group_norm_silu_cpu);
  m.impl("add_group_norm_silu", &fluxrt::add_group_norm_silu_cpu);
}
