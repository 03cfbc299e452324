#!/usr/bin/env bash
# A GPU session's checks in stages, each sized for one 10-minute call of the lent machine (no network there:
# torch/triton/nvcc preinstalled, diffusers carried as a wheel). Run from the repository root:
#
#   bash benchmarks/gpu_session.sh build      # fluxrt._C with its CUDA kernels (build_ext --inplace), import check
#   bash benchmarks/gpu_session.sh tests [PATHS...]  # pytest -m gpu (all, or e.g. tests/kernels), log + JUnit XML;
#                                             # the first run autotunes every kernel: split it if it nears 10 min
#                                             # (Triton's cache under ~/.triton survives while the machine is warm)
#   bash benchmarks/gpu_session.sh kernels    # norms, rope, row quantization, GroupNorm+SiLU benchmarks
#   bash benchmarks/gpu_session.sh gemm       # FP8 GEMMs at FLUX's linear shapes (weight-only, W8A8 both ways)
#   bash benchmarks/gpu_session.sh attention  # joint attention vs SDPA backends
#   bash benchmarks/gpu_session.sh vae        # VAE decode 1024² / 2048² vs diffusers
#   bash benchmarks/gpu_session.sh step       # per-step latency, flux-dev 1024², every implementation
#
# Results go to benchmarks/results/ (and are copied to $OUT when the device tool sets it, so they come back).
# Later stages need the build stage's fluxrt/_C*.so: run `build` first on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stage="${1:?usage: gpu_session.sh build|tests|kernels|gemm|attention|vae|step}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

copy_out() {
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT" && cp "$@" "$OUT"/ 2>/dev/null || true
  fi
}

case "$stage" in
  build)
    python3 setup.py -q build_ext --inplace
    python3 -c "import torch, fluxrt._C; print('fluxrt._C CUDA kernels:', torch._C._dispatch_has_kernel_for_dispatch_key('fluxrt_C::group_norm_silu', 'CUDA'))"
    ;;
  tests)
    shift
    python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml=benchmarks/results/gpu_tests.xml "$@" 2>&1 \
      | tee benchmarks/results/gpu_tests.log
    copy_out benchmarks/results/gpu_tests.xml benchmarks/results/gpu_tests.log
    ;;
  kernels)
    for b in modulated_norm rope_qk_norm quantize_rows group_norm_silu lora lora_swap; do
      python3 "benchmarks/bench_$b.py"
    done
    copy_out benchmarks/results/{modulated_norm,rope_qk_norm,quantize_rows,group_norm_silu,lora,lora_swap}_*.{json,md}
    ;;
  gemm)
    python3 benchmarks/bench_fp8_gemm.py
    copy_out benchmarks/results/fp8_gemm_*.{json,md}
    ;;
  attention)
    python3 benchmarks/bench_joint_attention.py
    copy_out benchmarks/results/joint_attention_*.{json,md}
    ;;
  vae)
    python3 benchmarks/bench_vae.py --skip-ops
    copy_out benchmarks/results/vae_*.{json,md}
    ;;
  step)
    python3 -m fluxrt bench --model flux-dev --size 1024x1024 --batch 1 \
      --impl diffusers-eager diffusers-compile fluxrt-bf16 fluxrt-fp8 fluxrt-fp8-weight fluxrt-fp8-attn
    copy_out benchmarks/results/step_*
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
