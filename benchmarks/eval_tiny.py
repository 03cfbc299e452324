"""FP8 quality baselines of the embedded tiny model (fluxrt/weights/tiny, trained on fluxrt.shapes), on the CPU.
Accuracy numbers only: nothing here is timed.

1. Images. The fp32 pipeline (compile=False) draws one image per held-out scene (fluxrt.shapes_eval.heldout_scenes
   (N, seed=0); prompt fluxrt.shapes.caption(scene); seed = the scene's index; the model's default steps and size).
   The same pipeline with its transformer compiled FP8 weight-only (quantize="fp8-weight") and W8A8 (quantize="fp8",
   torch._scaled_mm on the CPU), backend="torch", draws the same images: PSNR vs the fp32 images (pixels in [0, 1]),
   mean, median and min over images, and prompt adherence (fluxrt.shapes_eval.adherence) for every variant. The renders of
   the scenes themselves are graded too: the evaluator's own ceiling.
2. Ops. SQNR (dB, fluxrt.testing.sqnr_db) of each FP8 op of fluxrt.ops (torch formulas) against its exact fp32
   counterpart, on the activations the fp32 transformer computes over a few denoising steps of the first scenes
   (forward hooks): min and median over the layers the op serves in the W8A8 / weight-only runtime.

    python benchmarks/eval_tiny.py [--model DIR] [--count 64] [--quick] [--out JSON]

Writes benchmarks/results/tiny_quality_cpu.json (--out elsewhere). --quick (8 scenes, 2 captured steps; the CI test)
writes only where --out says, so it never replaces the committed full results.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import fluxrt  # noqa: E402
from fluxrt import ops, shapes, shapes_eval  # noqa: E402
from fluxrt.pipeline import to_pil  # noqa: E402
from fluxrt.quantize import FP8Linear, quantize_weight  # noqa: E402
from fluxrt.reference import DoubleStreamBlock, Flux, SingleStreamBlock, apply_rope  # noqa: E402
from fluxrt.reference.model import Modulation, QKNorm  # noqa: E402
from fluxrt.testing import sqnr_db  # noqa: E402
from fluxrt.tiny import TRAINED  # noqa: E402

RESULT = _common.RESULTS / "tiny_quality_cpu.json"
# Images per pipeline call, fixed so results do not depend on --count: a W8A8 linear runs weight-only up to 16 rows
# (fluxrt.quantize.WEIGHT_ONLY_MAX_ROWS), so the batch decides which form the modulation GEMVs (M = batch) take.
BATCH = 8
VARIANTS = {"fp8-weight": "FP8 weight-only", "fp8": "W8A8 (FP8 weights and activations)"}
FULL = {"count": 64, "capture_steps": 5}
QUICK = {"count": 8, "capture_steps": 2}
OP_LABELS = {  # op -> where the runtime uses it, and what it is compared with
    "fp8_linear": "weight-only linear, every block and modulation linear, vs F.linear",
    "w8a8_linear": "W8A8 linear (quantize_rows + torch._scaled_mm), every block linear, vs F.linear",
    "modulated_layer_norm_fp8": "LN * (1 + scale) + shift as e4m3 rows (qkv, linear1 inputs), dequantized, vs "
                                "modulated_layer_norm",
    "gated_residual_norm_fp8": "x + gate * y, then the modulated LN as e4m3 rows (MLP up inputs), dequantized, vs "
                               "gated_residual_norm",
    "quantize_rows": "round trip with the GELU in the pass (MLP down, linear2 inputs) vs the linears' inputs",
    "joint_attention_fp8": "e4m3 q, k, v (quantize_qkv_fp8), every block, vs joint_attention",
    "joint_attention_fp8_out": "attention written as e4m3 rows (double blocks' proj inputs), dequantized, vs "
                               "joint_attention",
}


# ---- images: PSNR and adherence ------------------------------------------------------------------------------


def load_pipeline(model: Path) -> fluxrt.FluxPipeline:
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"eval_tiny: {model} is not a model folder (no model_index.json); train one with "
                         f"`python -m fluxrt.train_tiny --out {model}` or pass --model DIR")
    return fluxrt.FluxPipeline.from_pretrained(model, device="cpu", dtype=torch.float32, compile=False,
                                               progress=False)


def draw(pipe: fluxrt.FluxPipeline, transformer: nn.Module, prompts: list[str]) -> Tensor:
    """[N, 3, H, W] in [0, 1]: image k for prompts[k] with seed k, drawn by pipe with `transformer` as its model."""
    # FluxPipeline refuses W8A8 on a CPU (a 12B model would take hours there), so the compiled transformer is put
    # in place of the fp32 one; FastFlux keeps Flux's call signature, and the autoencoder stays the fp32 one, so
    # the images differ by the transformer's quantization only.
    pipe.transformer = transformer
    batches = [pipe(prompts[start : start + BATCH], seed=start, output_type="pt", progress=False)
               for start in range(0, len(prompts), BATCH)]
    return torch.cat(batches)


def psnr_db(images: Tensor, reference: Tensor) -> list[float]:
    """Per-image PSNR (pixels in [0, 1]); identical images give inf."""
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse)).tolist()


def _db(value: float) -> float | None:
    """A PSNR for JSON, which has no infinity: None where the images are identical."""
    return value if math.isfinite(value) else None


def adherence(images: Tensor, scenes: list) -> dict:
    return shapes_eval.adherence([np.asarray(image) for image in to_pil(images)], scenes)


def image_quality(pipe: fluxrt.FluxPipeline, scenes: list) -> dict:
    """{variant: {adherence, psnr_db_mean, psnr_db_median, psnr_db_min, ran}} for the renders, the fp32 model and each FP8 variant."""
    prompts = [shapes.caption(scene) for scene in scenes]
    reference_model = pipe.transformer
    reference = draw(pipe, reference_model, prompts)
    results = {"rendered": {"adherence": shapes_eval.adherence([shapes.render(s) for s in scenes], scenes)},
               "fp32": {"adherence": adherence(reference, scenes)}}
    for quantize in VARIANTS:
        # compile quantizes in place: each variant gets its own copy of the fp32 weights
        fast = fluxrt.compile(copy.deepcopy(reference_model), quantize=quantize, backend="torch")
        images = draw(pipe, fast, prompts)
        psnr = psnr_db(images, reference)
        results[quantize] = {"adherence": adherence(images, scenes), "psnr_db_mean": _db(statistics.fmean(psnr)),
                             "psnr_db_median": _db(statistics.median(psnr)), "psnr_db_min": _db(min(psnr)),
                             "ran": fast.plan["last_call"]}
    pipe.transformer = reference_model
    return results


# ---- ops: SQNR on the trained model's activations --------------------------------------------------------------


class Activations:
    """What the fp32 reference transformer's modules see at chosen calls (denoising steps), recorded by forward
    hooks and concatenated over those steps along the batch: records[module name][i] is the i-th captured value
    (linear: input, output; LayerNorm: input; Modulation: its 6 or 3 [B, 1, C] vectors; QKNorm: q, k, v, q', k';
    block: the RoPE table pe)."""

    def __init__(self, model: Flux, calls: set[int]):
        self.model, self.calls, self.call = model, calls, -1
        self._pending: dict[str, list[list[Tensor]]] = defaultdict(list)
        self.records: dict[str, list[Tensor]] = {}

    def __enter__(self) -> "Activations":
        self._handles = [self.model.register_forward_pre_hook(self._count)]
        for name, module in self.model.named_modules():
            if not name.startswith(("double_blocks.", "single_blocks.")):
                continue
            if isinstance(module, (nn.Linear, nn.LayerNorm, Modulation, QKNorm)):
                self._handles.append(module.register_forward_hook(self._recorder(name)))
            elif isinstance(module, (DoubleStreamBlock, SingleStreamBlock)):
                self._handles.append(module.register_forward_pre_hook(self._pe_recorder(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self.records = {name: [torch.cat(parts) for parts in zip(*steps)] for name, steps in self._pending.items()}

    def _count(self, module, args) -> None:
        self.call += 1

    def _keep(self, name: str, values) -> None:
        if self.call in self.calls:
            self._pending[name].append([v.detach().clone() for v in values])

    def _recorder(self, name: str):
        def hook(module, args, output):
            if isinstance(module, nn.LayerNorm):
                self._keep(name, args)
            elif isinstance(module, Modulation):
                self._keep(name, [v for mod in output if mod is not None for v in (mod.shift, mod.scale, mod.gate)])
            else:  # Linear: (input, output); QKNorm: (q, k, v, q', k')
                self._keep(name, [*args, *(output if isinstance(output, tuple) else (output,))])
        return hook

    def _pe_recorder(self, name: str):
        def hook(module, args, kwargs):
            self._keep(name, [kwargs["pe"]])
        return hook


def _guided(pipe: fluxrt.FluxPipeline) -> bool:
    """Whether the model's defaults run true CFG: two transformer calls a step."""
    return pipe.default_negative_prompt is not None and pipe.default_true_cfg_scale > 1


def capture(pipe: fluxrt.FluxPipeline, prompts: list[str], count: int) -> Activations:
    """The fp32 transformer's activations at `count` transformer calls spread from the first step to the last (with
    the model's true CFG a step is two calls: the prompt's and the negative prompt's)."""
    steps = pipe.default_steps * (2 if _guided(pipe) else 1)
    calls = {round(i * (steps - 1) / max(count - 1, 1)) for i in range(count)}
    with Activations(pipe.transformer, calls) as seen:
        pipe(prompts, seed=0, output_type="pt", progress=False)
    return seen


def _dequantized(x8: Tensor, scale: Tensor) -> Tensor:
    return x8.float() * scale[..., None]


def linear_sqnr(model: nn.Module, seen: Activations) -> dict[str, dict[str, float]]:
    """fp8_linear (weight-only) on every block and modulation linear; W8A8 on the block linears (the modulation
    GEMVs, M = batch <= 16 rows, run weight-only in the W8A8 runtime too)."""
    result = {"fp8_linear": {}, "w8a8_linear": {}}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith(("double_blocks.", "single_blocks.")):
            continue
        x, exact = seen.records[name]
        w8, w_scale = quantize_weight(module.weight)
        result["fp8_linear"][name] = sqnr_db(ops.fp8_linear(x, w8, w_scale, module.bias, backend="torch"), exact)
        if not name.endswith(("_mod.lin", "modulation.lin")):
            w8a8 = FP8Linear.from_linear(module, backend="torch", activations="fp8")
            result["w8a8_linear"][name] = sqnr_db(w8a8(x), exact)
    return result


def norm_sqnr(model: Flux, seen: Activations) -> dict[str, dict[str, float]]:
    """The fused norms that emit e4m3 rows, where the W8A8 runtime uses them: the double blocks' first norm of each
    stream and the single blocks' pre-norm (modulated_layer_norm_fp8), the double blocks' residual + second norm
    (gated_residual_norm_fp8)."""
    result = {"modulated_layer_norm_fp8": {}, "gated_residual_norm_fp8": {}}

    def modulated(name: str, x: Tensor, scale: Tensor, shift: Tensor) -> None:
        exact = ops.modulated_layer_norm(x, scale, shift, backend="torch")
        got = _dequantized(*ops.modulated_layer_norm_fp8(x, scale, shift, backend="torch"))
        result["modulated_layer_norm_fp8"][name] = sqnr_db(got, exact)

    for i in range(len(model.double_blocks)):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            shift1, scale1, gate1, shift2, scale2, _ = seen.records[f"{block}_mod"]
            (x,) = seen.records[f"{block}_norm1"]
            modulated(f"{block}_norm1", x, scale1, shift1)
            _, y = seen.records[f"{block}_attn.proj"]
            _, exact = ops.gated_residual_norm(x, gate1, y, scale2, shift2, backend="torch")
            _, x8, row_scale = ops.gated_residual_norm_fp8(x, gate1, y, scale2, shift2, backend="torch")
            result["gated_residual_norm_fp8"][f"{block}_norm2"] = sqnr_db(_dequantized(x8, row_scale), exact)
    for i in range(len(model.single_blocks)):
        block = f"single_blocks.{i}"
        shift, scale, _ = seen.records[f"{block}.modulation"]
        (x,) = seen.records[f"{block}.pre_norm"]
        modulated(f"{block}.pre_norm", x, scale, shift)
    return result


def quantize_rows_sqnr(model: Flux, seen: Activations) -> dict[str, float]:
    """quantize_rows where the W8A8 runtime (torch._scaled_mm) calls it, GELU in the pass: MLP down's input from MLP
    up's output, linear2's [attention | gelu(mlp)] from linear1's mlp columns; vs the input the reference computed."""
    result = {}

    def round_trip(name: str, pre_gelu: Tensor, gelu_from: int) -> None:
        (exact, _) = seen.records[name]
        result[name] = sqnr_db(_dequantized(*ops.quantize_rows(pre_gelu, gelu_from=gelu_from, backend="torch")),
                               exact)

    for i in range(len(model.double_blocks)):
        for stream in ("img", "txt"):
            _, up = seen.records[f"double_blocks.{i}.{stream}_mlp.0"]
            round_trip(f"double_blocks.{i}.{stream}_mlp.2", up, 0)
    for i, block in enumerate(model.single_blocks):
        C = block.hidden_size
        _, hidden = seen.records[f"single_blocks.{i}.linear1"]
        attention = seen.records[f"single_blocks.{i}.linear2"][0][..., :C]
        round_trip(f"single_blocks.{i}.linear2", torch.cat((attention, hidden[..., 3 * C :]), dim=-1), C)
    return result


def attention_inputs(model: Flux, seen: Activations) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """{block: (q, k, v)} as the joint attention reads them: QK-normed, text first, RoPE applied ([B, H, S, D])."""
    inputs = {}
    for i in range(len(model.double_blocks)):
        block = f"double_blocks.{i}"
        txt_q, txt_k = seen.records[f"{block}.txt_attn.norm"][3:]
        img_q, img_k = seen.records[f"{block}.img_attn.norm"][3:]
        v = torch.cat((seen.records[f"{block}.txt_attn.norm"][2], seen.records[f"{block}.img_attn.norm"][2]), dim=2)
        q, k = apply_rope(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2), seen.records[block][0])
        inputs[block] = (q, k, v)
    for i in range(len(model.single_blocks)):
        block = f"single_blocks.{i}"
        _, _, v, q, k = seen.records[f"{block}.norm"]
        inputs[block] = (*apply_rope(q, k, seen.records[block][0]), v)
    return inputs


def attention_sqnr(model: Flux, seen: Activations) -> dict[str, dict[str, float]]:
    """FP8 attention (every block, when compile(attention="fp8")) and attention emitting e4m3 rows (the double
    blocks under W8A8), each vs the fp32 joint attention on the same q, k, v."""
    result = {"joint_attention_fp8": {}, "joint_attention_fp8_out": {}}
    for block, (q, k, v) in attention_inputs(model, seen).items():
        exact = ops.joint_attention(q, k, v, backend="torch")
        fp8 = ops.joint_attention_fp8(*ops.quantize_qkv_fp8(q, k, v), out_dtype=torch.float32, backend="torch")
        result["joint_attention_fp8"][block] = sqnr_db(fp8, exact)
        if block.startswith("double_blocks."):
            v_absmax = v.abs().amax(dim=(1, 2, 3))[:, None].contiguous()  # the bound rope_qk_norm_joint gives
            rows = _dequantized(*ops.joint_attention_fp8_out(q, k, v, v_absmax, backend="torch"))
            result["joint_attention_fp8_out"][block] = sqnr_db(rows, exact)
    return result


def op_quality(pipe: fluxrt.FluxPipeline, prompts: list[str], capture_steps: int) -> tuple[dict, list[int]]:
    """({op: {what, layers, min_db, median_db, worst_layer, per_layer}}, the captured steps) on the trained model's
    activations."""
    model = pipe.transformer
    seen = capture(pipe, prompts, capture_steps)
    with torch.inference_mode():
        per_op = {**linear_sqnr(model, seen), **norm_sqnr(model, seen),
                  "quantize_rows": quantize_rows_sqnr(model, seen), **attention_sqnr(model, seen)}
    summary = {op: {"what": OP_LABELS[op], "layers": len(layers), "min_db": min(layers.values()),
                    "median_db": statistics.median(layers.values()), "worst_layer": min(layers, key=layers.get),
                    "per_layer": layers}
               for op, layers in per_op.items()}
    return summary, sorted(seen.calls)


# ---- report ----------------------------------------------------------------------------------------------------


def environment() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    return {"device": "cpu", "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "commit": _common._git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def tables(results: dict) -> str:
    images = results["images"]
    image_rows = [{"variant": name, "PSNR vs fp32 mean (dB)": row.get("psnr_db_mean"),
                   "median (dB)": row.get("psnr_db_median"), "min (dB)": row.get("psnr_db_min"), "colour": row["adherence"]["colour"],
                   "shape": row["adherence"]["shape"], "both": row["adherence"]["both"]}
                  for name, row in images.items()]
    op_rows = [{"op (CPU, torch formulas, fp32 activations)": op, "layers": row["layers"],
                "min SQNR (dB)": row["min_db"], "median SQNR (dB)": row["median_db"], "worst layer": row["worst_layer"]}
               for op, row in results["ops"].items()]
    return _common.markdown_table(image_rows) + "\n\n" + _common.markdown_table(op_rows)


def write_json(results: dict, out: Path) -> None:
    """Written whole or not at all: a temporary file renamed over `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, out)


def evaluate(model: Path, count: int, capture_steps: int) -> dict:
    pipe = load_pipeline(model)
    scenes = shapes_eval.heldout_scenes(count, seed=0)
    with torch.inference_mode():
        images = image_quality(pipe, scenes)
    op_results, captured_steps = op_quality(pipe, [shapes.caption(s) for s in scenes[:BATCH]], capture_steps)
    return {
        "what": "FP8 quality baselines of the trained tiny model on the CPU (accuracy, not speed): images vs the "
                "fp32 pipeline, and each FP8 op's SQNR on the model's own activations",
        "environment": environment(),
        "setup": {"model": str(model), "scenes": count, "scene_seed": 0, "image_seeds": f"0..{count - 1}",
                  "steps": pipe.default_steps, "width": pipe.default_size[0], "height": pipe.default_size[1],
                  "max_sequence_length": pipe.max_sequence_length, "true_cfg_scale": pipe.default_true_cfg_scale,
                  "negative_prompt": pipe.default_negative_prompt, "batch": BATCH, "dtype": "float32",
                  "backend": "torch", "capture_images": min(count, BATCH),
                  "capture_calls": captured_steps, "calls_per_step": 2 if _guided(pipe) else 1},
        "images": images,
        "ops": op_results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=TRAINED, help="diffusers-layout folder (default: %(default)s)")
    parser.add_argument("--count", type=int, default=None, help=f"held-out scenes (default {FULL['count']}; "
                        f"--quick: {QUICK['count']})")
    parser.add_argument("--quick", action="store_true", help="8 scenes, 2 captured steps (< 60 s on 2 cores)")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON to write (default {RESULT}; --quick: none)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    count = preset["count"] if args.count is None else args.count
    if count < 1:
        parser.error(f"--count must be at least 1, got {count}")
    # One thread: the tiny model's ops are far too small to gain from more, and on a shared 2-core machine OpenMP's
    # spin-waiting threads made the run ~20x slower (measured: 26 s vs 0.9 s for the fp32 images of --quick).
    torch.set_num_threads(1)
    results = evaluate(args.model, count, preset["capture_steps"])
    print(tables(results))
    out = args.out or (None if args.quick else RESULT)
    if out is not None:
        write_json(results, out)
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
