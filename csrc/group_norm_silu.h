// Fused GroupNorm (+ SiLU) and residual-add + GroupNorm (+ SiLU) for the FLUX VAE decoder: the pieces shared by
// the CPU (group_norm_silu.cpp) and CUDA (group_norm_silu_cuda.cu) implementations. Op semantics: csrc/README.md.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

// The three dtypes the ops accept; AT_DISPATCH_FLOATING_TYPES_AND2 would also instantiate double, which nobody
// calls, for compile time on both the host and nvcc side.
#define FLUXRT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)         \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace fluxrt {

enum class Layout { NCHW, ChannelsLast };

// What a validated call works on: x is [N, C, H, W] with HW = H * W, in G groups of D = C / G channels each.
struct GroupNormShape {
  int64_t N, C, HW, G, D;
  Layout layout;
};

// TORCH_CHECKs every precondition of group_norm_silu (x, weight, bias, num_groups) and of the residual y when
// given (add_group_norm_silu); `op` names the op in the messages.
GroupNormShape check_inputs(const char* op, const at::Tensor& x, const at::Tensor* y, const at::Tensor& weight,
                            const at::Tensor& bias, int64_t num_groups);

// An uninitialised tensor shaped like x in the layout the kernels index (outputs keep x's memory format).
at::Tensor empty_in_layout(const at::Tensor& x, Layout layout);

// weight / bias as contiguous fp32 (a no-op when they already are): the kernels do all math in fp32.
at::Tensor as_float_vector(const at::Tensor& t);

}  // namespace fluxrt
