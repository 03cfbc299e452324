"""FP8 weight quantization of a FLUX transformer, FP8 checkpoints kept in FP8, save/load round trip."""

import dataclasses
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fluxrt
from fluxrt import FluxConfig, sampling
from fluxrt.kernels._common import FP8_E4M3_MAX
from fluxrt.quantize import FP8Linear, quantize, quantize_weight, save_transformer
from fluxrt.testing import randomize_parameters_, sqnr_db

TINY = FluxConfig.preset("tiny")


def tiny_model(seed=0, **changes):
    return randomize_parameters_(fluxrt.reference.Flux(dataclasses.replace(TINY, **changes)), seed=seed).eval()


def inputs(cfg=TINY, B=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        img=sampling.pack(sampling.get_noise(B, 48, 64, seed=seed)),
        img_ids=sampling.prepare_img_ids(B, 48, 64),
        txt=torch.randn(B, 9, cfg.context_in_dim, generator=gen),
        txt_ids=sampling.prepare_txt_ids(B, 9),
        timesteps=torch.rand(B, generator=gen),
        y=torch.randn(B, cfg.vec_in_dim, generator=gen),
        guidance=torch.full((B,), 3.5) if cfg.guidance_embed else None,
    )


def test_quantize_weight_per_channel():
    w = torch.randn(96, 200) * torch.logspace(-3, 1, 96)[:, None]  # rows spanning 4 decades
    w8, scale = quantize_weight(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (96,)
    torch.testing.assert_close(w8.float().abs().amax(1), torch.full((96,), FP8_E4M3_MAX), atol=0, rtol=0)
    assert sqnr_db(w8.float() * scale[:, None], w) >= 30  # per-op floor on random data


def test_quantize_selects_block_linears_and_reports_memory():
    model = tiny_model()
    report = quantize(model)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    expected_per_double = {"img_mod.lin", "txt_mod.lin", "img_attn.qkv", "img_attn.proj", "txt_attn.qkv",
                           "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"}
    expected = {f"double_blocks.{i}.{n}" for i in range(TINY.depth) for n in expected_per_double}
    expected |= {f"single_blocks.{i}.{n}" for i in range(TINY.depth_single_blocks)
                 for n in ("linear1", "linear2", "modulation.lin")}
    assert fp8 == expected and report["layers"] == len(expected)
    assert isinstance(model.img_in, torch.nn.Linear) and isinstance(model.final_layer.linear, torch.nn.Linear)
    assert report["bytes_after"] < 0.4 * report["bytes_before"]  # fp32 -> fp8 for nearly all weights

    options = tiny_model()
    quantize(options, modulation=False, embedders=True, final_layer=True)
    assert isinstance(options.img_in, FP8Linear) and isinstance(options.final_layer.linear, FP8Linear)
    assert isinstance(options.double_blocks[0].img_mod.lin, torch.nn.Linear)
    with pytest.raises(ValueError, match="no nn.Linear layers selected"):
        quantize(options, modulation=False, embedders=True, final_layer=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_sqnr_after_weight_only_quantization(dtype):
    model = tiny_model(seed=3)
    x = inputs()
    with torch.no_grad():
        expected = model(**x)
        model = model.to(dtype)
        quantize(model, backend="torch")
        cast = {k: (v.to(dtype) if k in ("img", "txt", "y") else v) for k, v in x.items()}
        out = model(**cast)
    assert out.dtype == dtype and sqnr_db(out, expected) >= 20


def test_triton_backend_matches_torch_backend_in_a_model():
    model = tiny_model(seed=4)
    quantize(model, backend="torch")
    x = inputs(seed=5)
    with torch.no_grad(), fluxrt.ops.trace() as ran_torch:
        expected = model(**x)
    for m in model.modules():
        if isinstance(m, FP8Linear):
            m.backend = "triton"
    with torch.no_grad(), fluxrt.ops.trace() as ran_triton:
        out = model(**x)
    assert ran_torch.backends() == {"fp8_linear": {"torch"}} and ran_triton.backends() == {"fp8_linear": {"triton"}}
    assert sqnr_db(out, expected) >= 60  # same fp8 weights; only the fp32 summation order differs


def test_save_and_load_back_bit_identical(tmp_path):
    model = tiny_model(seed=6, axes_dim=(16, 24, 24))  # a config only the file's metadata can tell
    quantize(model)
    save_transformer(model, tmp_path / "flux-fp8.safetensors")
    assert not (tmp_path / "flux-fp8.safetensors.tmp").exists()
    with safe_open(str(tmp_path / "flux-fp8.safetensors"), "pt") as f:
        assert f.get_slice("double_blocks.0.img_attn.qkv.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("double_blocks.0.img_attn.qkv.scale_weight").get_shape() == [3 * TINY.hidden_size]
    loaded = fluxrt.load_transformer(tmp_path / "flux-fp8.safetensors", dtype=torch.float32)
    assert loaded.params == model.params
    assert isinstance(loaded.double_blocks[0].img_attn.qkv, FP8Linear)
    sd, back = model.state_dict(), loaded.state_dict()
    assert sd.keys() == back.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k].view(torch.uint8) if back[k].dtype ==
                                                            torch.float8_e4m3fn else back[k],
                                                            sd[k].view(torch.uint8) if sd[k].dtype ==
                                                            torch.float8_e4m3fn else sd[k]), k


def test_comfy_scaled_fp8_file_keeps_fp8_with_its_scales(tmp_path, caplog):
    model = tiny_model(seed=7)
    sd, expected_scales = {}, {}
    for k, v in model.state_dict().items():
        if v.ndim == 2 and k.startswith(("double_blocks", "single_blocks")):
            scale = v.abs().amax() / FP8_E4M3_MAX  # Comfy stores one scale per tensor
            sd[k] = (v / scale).to(torch.float8_e4m3fn)
            sd[k.removesuffix("weight") + "scale_weight"] = scale.reshape(1)
            expected_scales[k.removesuffix("weight") + "weight_scale"] = scale.expand(v.shape[0])
        else:
            sd[k] = v.to(torch.bfloat16)
    sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, tmp_path / "comfy-scaled-fp8.safetensors")
    with caplog.at_level(logging.INFO, logger="fluxrt"):
        loaded = fluxrt.load_transformer(tmp_path / "comfy-scaled-fp8.safetensors")
    assert "kept in fp8" in caplog.text
    state = loaded.state_dict()
    for k, scale in expected_scales.items():
        torch.testing.assert_close(state[k], scale, atol=0, rtol=0)
        weight = k.removesuffix("weight_scale") + "weight"
        assert state[weight].dtype == torch.float8_e4m3fn
        assert torch.equal(state[weight].view(torch.uint8), sd[f"model.diffusion_model.{weight}"].view(torch.uint8))
    assert state["img_in.weight"].dtype == torch.bfloat16
    with torch.no_grad():
        x = inputs()
        out = loaded(**{k: (v.bfloat16() if k in ("img", "txt", "y") else v) for k, v in x.items()})
        assert sqnr_db(out, model(**x)) >= 15  # per-tensor scales: coarser than fluxrt's per-channel ones


def test_unscaled_fp8_file_is_refused_not_given_unit_scales(tmp_path):
    # A file whose e4m3 weights lost their scales used to load with every scale 1 (117 % off on real weights).
    model = tiny_model(seed=8)
    sd = {k: (v.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn) if v.ndim == 2 else v)
          for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "fp8.safetensors")
    with pytest.raises(fluxrt.CheckpointError, match="no scale"):
        fluxrt.load_transformer(tmp_path / "fp8.safetensors")
    with pytest.raises(ValueError, match="fp8 must be 'keep' or 'upcast'"):
        fluxrt.load_transformer(tmp_path / "fp8.safetensors", fp8="yes")


def test_w8a8_whole_model_sqnr():
    # torch._scaled_mm runs on the CPU too (torch >= 2.13 here), so the W8A8 wiring is checked in CI;
    # its speed and the sm_89+ requirement are GPU matters (tests/kernels, benchmarks/bench_fp8_gemm.py).
    model = tiny_model(seed=9)
    x = inputs(seed=10)
    with torch.no_grad():
        expected = model(**x)
        quantize(model, activations="fp8")
        assert model.double_blocks[0].img_mlp[0].activations == "fp8"
        out = model(**x)
    assert sqnr_db(out, expected) >= 20
    with pytest.raises(ValueError, match="activations must be"):
        FP8Linear(16, 16, activations="int8")


def test_w8a8_runs_weight_only_up_to_16_rows():
    lin = FP8Linear.from_linear(torch.nn.Linear(64, 48), activations="fp8")
    few, many = torch.randn(2, 8, 64), torch.randn(2, 9, 64)  # 16 rows, 18 rows
    weight_only = fluxrt.ops.fp8_linear(few, lin.weight, lin.weight_scale, lin.bias, backend="torch")
    assert torch.equal(lin(few), weight_only)
    assert torch.equal(lin(many), lin.forward_fp8(*fluxrt.ops.quantize_rows(many), out_dtype=torch.float32))
    assert not torch.equal(lin(many), fluxrt.ops.fp8_linear(many, lin.weight, lin.weight_scale, lin.bias))
    with pytest.raises(ValueError, match="w8a8_gemm must be one of"):
        FP8Linear(16, 16, activations="fp8", w8a8_gemm="cublas")


@pytest.mark.parametrize("epilogue", ["none", "gelu_tanh", "gated_residual"])
def test_w8a8_gemm_choices_agree(epilogue):
    """forward_fp8 through torch._scaled_mm (+ the epilogue after it) and through the Triton kernel (interpreter;
    the epilogue fused) compute the same thing."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(80, 96)
    x, residual, gate = torch.randn(2, 20, 80), torch.randn(2, 20, 96), torch.randn(2, 1, 96)
    extra = dict(residual=residual, gate=gate) if epilogue == "gated_residual" else {}
    outs, traces = [], []
    for gemm, backend in (("scaled_mm", "torch"), ("triton", "triton")):
        lin = FP8Linear.from_linear(linear, activations="fp8", w8a8_gemm=gemm, backend=backend)
        x8, x_scale = fluxrt.ops.quantize_rows(x)
        with fluxrt.ops.trace() as ran:
            outs.append(lin.forward_fp8(x8, x_scale, epilogue=epilogue, out_dtype=torch.float32, **extra))
        traces.append(ran)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    # scaled_mm: neither the Triton GEMM nor its formula ran (the unfused gated residual is its torch op);
    # triton: the Triton kernel alone, its epilogue fused
    assert not traces[0].ran_on("triton") and "w8a8_linear" not in traces[0].ran_on("torch")
    assert traces[1].backends() == {"w8a8_linear": {"triton"}}


def test_w8a8_triton_gemm_whole_model():
    model = tiny_model(seed=11)
    x = inputs(seed=12)
    with torch.no_grad():
        expected = model(**x)
        quantize(model, activations="fp8", w8a8_gemm="triton", backend="triton")
        fast = fluxrt.compile(model, backend="torch")  # the block ops as torch formulas, the W8A8 GEMMs Triton
        with fluxrt.ops.trace() as ran:
            out = fast(**x)
    assert sqnr_db(out, expected) >= 20
    # fp8_linear: the modulation GEMVs (<= 16 rows run weight-only), on the FP8Linear's own backend
    assert ran.ran_on("triton") == {"w8a8_linear", "fp8_linear"}
    assert ran.ran_on("torch") == {"modulated_layer_norm_fp8", "rope_qk_norm", "rope_qk_norm_joint_v_absmax",
                                   "joint_attention", "joint_attention_fp8_out", "gated_residual_norm_fp8",
                                   "quantize_rows"}
