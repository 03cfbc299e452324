"""Benchmark fluxrt.kernels.rope_qk_norm (QK RMSNorm + RoPE + split to [3, B, H, S, D]) at FLUX.1 sizes.

H = 24 heads of D = 128, bf16, random qkv; cos/sin built from the model's real position ids (512 text tokens,
then a 1024x1024 image's 4096 tokens: S = 4608) through fluxrt.reference.EmbedND and rope_cos_sin. Cases:
  single      rope_qk_norm on a contiguous [B, S, 9216] qkv
  single-in-place  the same on the first 9216 columns of the single block's linear1 output [B, S, 21504]
  double      rope_qk_norm_joint on txt_qkv [B, 512, 9216] and img_qkv [B, 4096, 9216]
  double+v_absmax  the same also taking max |v| per batch item (atomics; the W8A8 attention rows' bound),
              the zeroed [B, 32] buffer's allocation included, as the op does it
Each: the Triton kernel vs its eager `_ref` vs torch.compile(_ref), do_bench's median ms (L2 flushed between
repetitions; compile time reported apart). GB/s counts the bytes the op must move: qkv read once, q, k, v
written once (3*H*D elements per token each way), cos and sin (fp32) and the RMSNorm scales; the Triton kernel
is also given as a fraction of the measured copy bandwidth. Before timing, the Triton result must pass DESIGN.md
§4's rule against the fp32 truth (the ref on fp32 inputs): max error <= 2 x the eager bf16 ref's + 1e-2 (see
_common.compare).

    python benchmarks/bench_rope_qk_norm.py [--batch 1 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import torch  # noqa: E402

H, D, T, IMG = 24, 128, 512, 1024  # heads, head_dim, text tokens, image side in pixels (4096 tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    _common.require_cuda()
    import fluxrt
    import fluxrt.ops
    from fluxrt import sampling
    from fluxrt.kernels import rope_qk_norm as rq

    meta = {**_common.gpu_info(), "copy_gbps": _common.measure_copy_bandwidth()}
    dtype, dev, C = torch.bfloat16, "cuda", 3 * H * D
    rows = []
    for B in args.batch:
        torch.manual_seed(0)
        ids = torch.cat([sampling.prepare_txt_ids(B, T), sampling.prepare_img_ids(B, IMG, IMG)], 1).to(dev)
        cos, sin = fluxrt.ops.rope_cos_sin(fluxrt.reference.EmbedND(D, 10000, [16, 56, 56])(ids))
        S = ids.shape[1]
        scales = [1 + 0.1 * torch.randn(D, dtype=dtype, device=dev) for _ in range(4)]
        qkv = torch.randn(B, S, C, dtype=dtype, device=dev)
        linear1 = torch.randn(B, S, C + 4 * H * D, dtype=dtype, device=dev)
        txt_qkv, img_qkv = qkv[:, :T].contiguous(), qkv[:, T:].contiguous()
        elt = qkv.element_size()
        table = (cos.numel() * cos.element_size() + sin.numel() * sin.element_size())
        single = 2 * B * S * C * elt + table + 2 * D * elt
        cases = [  # case, triton, ref, args, bytes moved
            ("single", rq.rope_qk_norm, rq.rope_qk_norm_ref, (qkv, *scales[:2], cos, sin, H), single),
            ("single-in-place", rq.rope_qk_norm, rq.rope_qk_norm_ref,
             (linear1[..., :C], *scales[:2], cos, sin, H), single),
            ("double", rq.rope_qk_norm_joint, rq.rope_qk_norm_joint_ref,
             (txt_qkv, img_qkv, *scales, cos, sin, H), single + 2 * D * elt),
            ("double+v_absmax", lambda *a: rq.rope_qk_norm_joint(*a, v_absmax=torch.zeros(
                B, rq.V_ABSMAX_SLOTS, device=dev)), rq.rope_qk_norm_joint_ref,
             (txt_qkv, img_qkv, *scales, cos, sin, H), single + 2 * D * elt),
        ]
        for case, fn, ref, fargs, nbytes in cases:
            row = {"case": case, "B": B, "S": S, "H": H, "D": D, "dtype": "bf16"}
            rows.append(_common.compare(row, fn, ref, fargs, nbytes, meta["copy_gbps"]))
            print(rows[-1], flush=True)
        del qkv, linear1, txt_qkv, img_qkv, cases
        torch.cuda.empty_cache()
    _common.finish("rope_qk_norm", rows, meta)


if __name__ == "__main__":
    main()
