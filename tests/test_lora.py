"""fluxrt.load_lora: each FLUX.1 LoRA format against diffusers' own loader of the same file (or the math where
diffusers cannot load it), exact fuse/unfuse, and one clear CheckpointError for every file it cannot apply."""

import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from test_reference_parity import make_inputs, run_diffusers, run_reference

import fluxrt
from fluxrt import CheckpointError, FluxConfig
from fluxrt.testing import randomize_parameters_

CFG = FluxConfig.preset("tiny")  # dev-like: guidance embedder present
H, MLP = CFG.hidden_size, CFG.mlp_hidden_dim
DOUBLE = ("img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj",
          "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")
GLOBAL = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
          "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1")
WEIGHT_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture
def ref():
    return randomize_parameters_(fluxrt.reference.Flux(CFG), seed=11).eval()


def linear_shapes(model):
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def factors(gen, rank, out_features, in_features):
    """Random LoRA factors (A [rank, in], B [out, rank]) big enough to move the output visibly."""
    down = torch.randn(rank, in_features, generator=gen) / in_features**0.5
    up = 0.3 * torch.randn(out_features, rank, generator=gen) / rank**0.5
    return down, up


def write(folder, state_dict, metadata=None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / WEIGHT_FILE), metadata=metadata)
    return folder


def diffusers_twin(ref):
    dif = FluxTransformer2DModel(**CFG.to_diffusers()).eval()
    dif.load_state_dict(fluxrt.bfl_to_diffusers(ref.state_dict()), strict=True)
    return dif


def load_with_diffusers(ref, folder):
    """What pipe.load_lora_weights does for the transformer: diffusers' format conversion, then PEFT adapters."""
    dif = diffusers_twin(ref)
    state_dict, alphas, metadata = FluxPipeline.lora_state_dict(str(folder), return_alphas=True,
                                                                return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=dif, metadata=metadata)
    return dif


def assert_matches_diffusers(ref, folder, scale=1.0):
    inputs = make_inputs(CFG, batch=1, height=64, width=48, txt_len=7, seed=5)
    base = run_reference(ref, inputs, torch.float32)
    dif = load_with_diffusers(ref, folder)
    if scale != 1.0:
        dif.set_adapters(["default_0"], weights=[scale])
    expected = run_diffusers(dif, inputs, torch.float32)
    lora = fluxrt.load_lora(folder / WEIGHT_FILE, config=CFG)
    fused = lora.fuse(ref, scale=scale)
    got = run_reference(ref, inputs, torch.float32)
    fused.unfuse()
    assert (expected - base).abs().max() > 0.05, "the LoRA barely moves the output: parity would prove nothing"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return lora


def expected_fused(ref, layers, scale=1.0):
    """The math: W[rows] += scale * alpha / rank * B A, for (module, row_start, down, up, alpha) tuples."""
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    for module, row_start, down, up, alpha in layers:
        w = state[f"{module}.weight"]
        w[row_start: row_start + up.shape[0]] += scale * alpha / down.shape[0] * (up @ down)
    return state


def assert_fuses_to(ref, lora, layers, scale=1.0):
    want = expected_fused(ref, layers, scale)
    lora.fuse(ref, scale=scale)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(value, want[key], atol=1e-6, rtol=1e-6, msg=lambda m: f"{key}: {m}")


def kohya_layer(gen, sd, name, out_features, in_features, rank, alpha=None):
    down, up = factors(gen, rank, out_features, in_features)
    sd[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = down
    sd[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = up
    if alpha is not None:
        sd[f"lora_unet_{name.replace('.', '_')}.alpha"] = torch.tensor(float(alpha))
    return down, up


# ---- formats vs diffusers' loader ----


def test_diffusers_peft_file_matches_diffusers(ref, tmp_path):
    """A real PEFT adapter on every FLUX linear diffusers has, per-module ranks and alphas in the metadata, saved by
    diffusers' own save_lora_weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
               "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear", "x_embedder", "context_embedder",
               "norm_out.linear", "linear_1", "linear_2"]
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False,
                        rank_pattern={"proj_mlp": 2, "add_k_proj": 3}, alpha_pattern={"to_out.0": 3.0,
                                                                                     "norm_out.linear": 9.0})
    torch.manual_seed(0)
    dif = diffusers_twin(ref)
    dif.add_adapter(config)
    FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(dif),
                                   transformer_lora_adapter_metadata=config.to_dict())
    lora = assert_matches_diffusers(ref, tmp_path, scale=0.7)
    assert lora.format == "diffusers"
    assert {layer.alpha for layer in lora.layers} == {6.0, 3.0, 9.0}
    assert len(lora.layers) == len(get_peft_model_state_dict(dif)) // 2


def test_diffusers_file_with_alpha_keys_matches_diffusers(ref, tmp_path):
    """diffusers naming with kohya-style `.alpha` keys per layer (diffusers reads them as network alphas)."""
    gen = torch.Generator().manual_seed(15)
    modules = {"transformer_blocks.0.attn.to_v": (H, H), "transformer_blocks.1.ff.net.0.proj": (MLP, H),
               "single_transformer_blocks.0.proj_mlp": (MLP, H), "single_transformer_blocks.1.attn.to_q": (H, H)}
    sd = {}
    for j, (name, shape) in enumerate(modules.items()):
        down, up = factors(gen, 4, *shape)
        sd |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up,
               f"transformer.{name}.alpha": torch.tensor(2.0 + 3 * j)}
    lora = assert_matches_diffusers(ref, write(tmp_path, sd))
    assert sorted(layer.alpha for layer in lora.layers) == [2.0, 5.0, 8.0, 11.0]


def test_kohya_file_matches_diffusers(ref, tmp_path):
    """sd-scripts naming on every block linear but single-block linear1 (diffusers' converter hard-codes FLUX's
    3072 split there: tested below), each layer its own rank and alpha."""
    gen = torch.Generator().manual_seed(1)
    shapes = linear_shapes(ref)
    names = [f"double_blocks.{i}.{n}" for i in range(CFG.depth) for n in DOUBLE]
    names += [f"single_blocks.{i}.{n}" for i in range(CFG.depth_single_blocks) for n in ("linear2", "modulation.lin")]
    sd = {}
    for j, name in enumerate(names):
        rank = 6 if name.endswith("qkv") else 2 + j % 5  # qkv: a dense B whose rank 3 divides
        kohya_layer(gen, sd, name, *shapes[name], rank, alpha=rank * (0.5 + 0.25 * (j % 4)))
    lora = assert_matches_diffusers(ref, write(tmp_path, sd))
    assert lora.format == "kohya" and len(lora.layers) == len(names), "dense qkv layers stay whole"


def test_kohya_layers_outside_the_blocks_fuse_to_the_math(ref, tmp_path):
    """Embedders and final layer: diffusers 0.42's kohya converter names these without the `transformer.` prefix
    and then drops them without a word, so the check is the math."""
    gen = torch.Generator().manual_seed(13)
    shapes = linear_shapes(ref)
    sd, layers = {}, []
    for j, name in enumerate(GLOBAL):
        rank, alpha = 2 + j % 3, 1.0 + j
        down, up = kohya_layer(gen, sd, name, *shapes[name], rank, alpha=alpha)
        layers.append((name, 0, down, up, alpha))
    lora = fluxrt.load_lora(write(tmp_path, sd) / WEIGHT_FILE, config=CFG)
    assert_fuses_to(ref, lora, layers, scale=0.8)


def test_kohya_split_trained_qkv_matches_diffusers(ref, tmp_path):
    """sd-scripts' split_qkv training writes qkv as one rank-3r layer whose B is block-diagonal (q, k, v each their
    own r columns): diffusers detects the sparsity and splits it; the math is the same either way."""
    gen = torch.Generator().manual_seed(2)
    sd = {}
    for i in range(CFG.depth):
        for stream in ("img", "txt"):
            r = 3
            down = torch.randn(3 * r, H, generator=gen) / H**0.5
            up = torch.zeros(3 * H, 3 * r)
            for p in range(3):
                up[p * H:(p + 1) * H, p * r:(p + 1) * r] = 0.3 * torch.randn(H, r, generator=gen)
            key = f"lora_unet_double_blocks_{i}_{stream}_attn_qkv"
            sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.5)}
    lora = assert_matches_diffusers(ref, write(tmp_path, sd))
    assert [(la.part, la.rank, la.row_start, la.scale) for la in lora.layers[:3]] == [
        ("q", 3, 0, 0.5), ("k", 3, H, 0.5), ("v", 3, 2 * H, 0.5)], "kept as q, k, v layers of rank 3 each"
    assert len(lora.layers) == 3 * 2 * CFG.depth


def test_kohya_split_trained_linear1_fuses_to_the_math(ref):
    """The same for single-block linear1 (q, k, v, mlp); a dense B of divisible rank stays one layer."""
    gen = torch.Generator().manual_seed(16)
    r, sizes = 2, [H, H, H, MLP]
    down = torch.randn(4 * r, H, generator=gen) / H**0.5
    up = torch.zeros(3 * H + MLP, 4 * r)
    for p, start in enumerate([0, H, 2 * H, 3 * H]):
        up[start:start + sizes[p], p * r:(p + 1) * r] = 0.3 * torch.randn(sizes[p], r, generator=gen)
    key = "lora_unet_single_blocks_1_linear1"
    sd = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(3.0)}
    dense_down, dense_up = kohya_layer(gen, sd, "single_blocks.0.linear1", 3 * H + MLP, H, rank=8, alpha=3.0)
    lora = fluxrt.load_lora(sd, config=CFG)
    assert [(la.module, la.part, la.rank) for la in lora.layers] == [("single_blocks.0.linear1", None, 8)] + [
        ("single_blocks.1.linear1", part, r) for part in ("q", "k", "v", "mlp")]
    assert_fuses_to(ref, lora, [("single_blocks.1.linear1", 0, down, up, 3.0),
                                ("single_blocks.0.linear1", 0, dense_down, dense_up, 3.0)], scale=1.2)


def mixture_layer(gen, sd, name, out_features, in_features, rank, alpha):
    down, up = factors(gen, rank, out_features, in_features)
    sd |= {f"lora_transformer_{name}.lora_down.weight": down, f"lora_transformer_{name}.lora_up.weight": up,
           f"lora_transformer_{name}.alpha": torch.tensor(alpha)}
    return down, up


def test_kohya_names_of_diffusers_modules_match_diffusers(ref, tmp_path):
    """`lora_transformer_<diffusers module>` (OneTrainer-style kohya files): split q/k/v rows of BFL weights. Only
    the attention layers and the layers outside the blocks: diffusers' converter of this naming handles no others."""
    gen = torch.Generator().manual_seed(3)
    modules = {"transformer_blocks_0_attn_to_q": (H, H), "transformer_blocks_1_attn_add_v_proj": (H, H),
               "transformer_blocks_0_attn_to_out_0": (H, H), "single_transformer_blocks_0_attn_to_k": (H, H),
               "norm_out_linear": (2 * H, H), "x_embedder": (H, CFG.in_channels), "proj_out": (CFG.out_channels, H)}
    sd = {}
    for j, (name, shape) in enumerate(modules.items()):
        mixture_layer(gen, sd, name, *shape, rank=2 + j % 3, alpha=1.5 + j)
    lora = assert_matches_diffusers(ref, write(tmp_path, sd))
    assert lora.format == "kohya (diffusers names)"
    assert {(la.module, la.part, la.row_start) for la in lora.layers} >= {
        ("single_blocks.0.linear1", "k", H), ("double_blocks.1.txt_attn.qkv", "v", 2 * H)}


def test_kohya_names_of_diffusers_mlp_modules_fuse_to_the_math(ref):
    gen = torch.Generator().manual_seed(14)
    sd = {}
    mlp_down, mlp_up = mixture_layer(gen, sd, "single_transformer_blocks_1_proj_mlp", MLP, H, rank=3, alpha=2.0)
    out_down, out_up = mixture_layer(gen, sd, "single_transformer_blocks_1_proj_out", H, H + MLP, rank=2, alpha=5.0)
    ff_down, ff_up = mixture_layer(gen, sd, "transformer_blocks_0_ff_context_net_2", H, MLP, rank=4, alpha=1.0)
    assert_fuses_to(ref, fluxrt.load_lora(sd, config=CFG), [
        ("single_blocks.1.linear1", 3 * H, mlp_down, mlp_up, 2.0),
        ("single_blocks.1.linear2", 0, out_down, out_up, 5.0),
        ("double_blocks.0.txt_mlp.2", 0, ff_down, ff_up, 1.0)])


def test_comfy_lora_down_file_matches_diffusers(ref, tmp_path):
    gen = torch.Generator().manual_seed(4)
    shapes = linear_shapes(ref)
    sd = {}
    for j, name in enumerate(["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", "single_blocks.0.linear2",
                              "single_blocks.1.modulation.lin", "double_blocks.0.txt_attn.proj"]):
        down, up = factors(gen, 2 + j, *shapes[name])
        sd |= {f"diffusion_model.{name}.lora_down.weight": down, f"diffusion_model.{name}.lora_up.weight": up,
               f"diffusion_model.{name}.alpha": torch.tensor(1.0 + j)}
    assert fluxrt.load_lora(sd).format == "bfl"
    assert_matches_diffusers(ref, write(tmp_path, sd))


def test_xlabs_file_matches_diffusers(ref, tmp_path):
    gen = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(CFG.depth):
        for name, rows in (("qkv_lora1", 3 * H), ("qkv_lora2", 3 * H), ("proj_lora1", H), ("proj_lora2", H)):
            down, up = factors(gen, 4, rows, H)
            sd |= {f"double_blocks.{i}.processor.{name}.down.weight": down,
                   f"double_blocks.{i}.processor.{name}.up.weight": up}
    down, up = factors(gen, 4, 3 * H, H)
    sd |= {"single_blocks.1.processor.qkv_lora.down.weight": down, "single_blocks.1.processor.qkv_lora.up.weight": up}
    lora = assert_matches_diffusers(ref, write(tmp_path, sd))
    assert lora.format == "xlabs" and all(layer.scale == 1.0 for layer in lora.layers)


# ---- formats diffusers cannot load at this width: against the math ----


def test_kohya_single_block_linear1_fuses_to_the_math(ref, tmp_path):
    gen = torch.Generator().manual_seed(6)
    sd = {}
    down, up = kohya_layer(gen, sd, "single_blocks.0.linear1", 3 * H + MLP, H, rank=4, alpha=3.0)
    down2, up2 = kohya_layer(gen, sd, "single_blocks.1.linear1", 3 * H + MLP, H, rank=2)  # no alpha: scale 1
    lora = fluxrt.load_lora(write(tmp_path, sd) / WEIGHT_FILE, config=CFG)
    assert_fuses_to(ref, lora, [("single_blocks.0.linear1", 0, down, up, 3.0),
                                ("single_blocks.1.linear1", 0, down2, up2, 2.0)], scale=0.6)


def test_kohya_linear1_splits_like_diffusers_at_flux_width():
    """diffusers' kohya converter splits linear1 at FLUX's real sizes (3072 x 3 + 12288): our rows for q, k, v and
    mlp must be its to_q, to_k, to_v and proj_mlp (compared on a probe, without building a model)."""
    gen = torch.Generator().manual_seed(7)
    hidden, mlp, rank = 3072, 12288, 4
    down, up = factors(gen, rank, 3 * hidden + mlp, hidden)
    name = "lora_unet_single_blocks_0_linear1"
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}
    converted = FluxPipeline.lora_state_dict(dict(sd))
    probe = torch.randn(hidden, 3, generator=gen)
    prefix = "transformer.single_transformer_blocks.0"
    theirs = torch.cat([converted[f"{prefix}.{m}.lora_B.weight"] @ (converted[f"{prefix}.{m}.lora_A.weight"] @ probe)
                        for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    (layer,) = fluxrt.load_lora(sd, config=FluxConfig.preset("flux-dev")).layers
    assert (layer.module, layer.rows) == ("single_blocks.0.linear1", slice(0, 3 * hidden + mlp))
    torch.testing.assert_close(layer.scale * (layer.up @ (layer.down @ probe)), theirs, atol=1e-5, rtol=1e-5)


def test_comfy_lora_a_b_file_fuses_to_the_math(ref, tmp_path):
    """`diffusion_model.<BFL>.lora_A/lora_B`: diffusers reads these as PEFT keys and keeps none (no `transformer.`
    prefix), so the check is the math."""
    gen = torch.Generator().manual_seed(8)
    shapes = linear_shapes(ref)
    sd, layers = {}, []
    for j, name in enumerate(["single_blocks.0.linear1", "double_blocks.1.img_attn.qkv", "final_layer.linear"]):
        down, up = factors(gen, 3, *shapes[name])
        sd |= {f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up}
        if j == 0:
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(6.0)
        layers.append((name, 0, down, up, 6.0 if j == 0 else 3.0))
    assert_fuses_to(ref, fluxrt.load_lora(write(tmp_path, sd), config=CFG), layers)


def test_diffusers_norm_out_rows_are_swapped_into_bfl_order(ref):
    """diffusers' norm_out.linear is (scale, shift); BFL's adaLN_modulation.1 is (shift, scale)."""
    gen = torch.Generator().manual_seed(9)
    down, up = factors(gen, 2, 2 * H, H)
    lora = fluxrt.load_lora({"transformer.norm_out.linear.lora_A.weight": down,
                             "transformer.norm_out.linear.lora_B.weight": up})
    swapped = torch.cat([up[H:], up[:H]])
    assert_fuses_to(ref, lora, [("final_layer.adaLN_modulation.1", 0, down, swapped, 2.0)])


# ---- fuse / unfuse ----


def every_layer_lora(ref, seed):
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in linear_shapes(ref).items():
        kohya_layer(gen, sd, name, *shape, rank=3, alpha=2.0)
    return fluxrt.load_lora(sd, config=CFG)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfuse_restores_every_weight_bit_for_bit(ref, dtype):
    ref = ref.to(dtype)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    first, second = every_layer_lora(ref, 1), every_layer_lora(ref, 2)
    fused_first = first.fuse(ref, scale=0.9)
    fused_second = second.fuse(ref, scale=-1.3)
    changed = [k for k, v in ref.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(linear_shapes(ref)), "every linear weight should have changed"
    fused_second.unfuse()
    fused_first.unfuse()
    for key, value in ref.state_dict().items():
        assert value.dtype == dtype and torch.equal(value, before[key]), f"{key} not restored exactly"


def test_unfuse_out_of_order_or_twice_is_refused(ref):
    first, second = every_layer_lora(ref, 1), every_layer_lora(ref, 2)
    fused_first = first.fuse(ref)
    fused_second = second.fuse(ref)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    with pytest.raises(RuntimeError, match="1 LoRA.s. fused after this one are still fused"):
        fused_first.unfuse()
    assert all(torch.equal(v, state[k]) for k, v in ref.state_dict().items()), "a refused unfuse changed weights"
    fused_second.unfuse()
    with pytest.raises(RuntimeError, match="unfused already"):
        fused_second.unfuse()


def test_unfuse_after_load_state_dict_is_refused(ref):
    fused = every_layer_lora(ref, 1).fuse(ref)
    ref.load_state_dict(randomize_parameters_(fluxrt.reference.Flux(CFG), seed=3).state_dict())
    with pytest.raises(RuntimeError, match="changed after this LoRA was fused"):
        fused.unfuse()


def assert_untouched(ref, before):
    for key, value in ref.state_dict().items():
        assert torch.equal(value, before[key]), f"a failed fuse changed {key}"


def test_fuse_that_does_not_fit_changes_nothing(ref):
    gen = torch.Generator().manual_seed(10)
    sd = {}
    kohya_layer(gen, sd, "double_blocks.0.img_mlp.0", MLP, H, rank=2)  # fits
    kohya_layer(gen, sd, "double_blocks.1.img_mlp.2", H, 2 * MLP, rank=2)  # made for a wider model
    lora = fluxrt.load_lora(sd)  # no config: the mismatch shows at fuse
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"double_blocks_1_img_mlp_2.*does not fit its weight \[128, 512\]"):
        lora.fuse(ref)
    assert_untouched(ref, before)


def test_fuse_failing_midway_puts_back_what_it_wrote(ref, monkeypatch):
    """Fault injection: the second module's fused weight cannot be built (as when memory runs out)."""
    lora = every_layer_lora(ref, 1)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    real, calls = fluxrt.lora._fused_weight, []

    def fail_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("injected")
        return real(*args)

    monkeypatch.setattr(fluxrt.lora, "_fused_weight", fail_on_second)
    with pytest.raises(torch.OutOfMemoryError):
        lora.fuse(ref)
    assert_untouched(ref, before)


def test_fuse_into_fp8_weights_is_refused(ref):
    lora = every_layer_lora(ref, 1)
    fluxrt.quantize.quantize(ref)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    with pytest.raises(TypeError, match="FP8Linear.*requantization error"):
        lora.fuse(ref)
    assert_untouched(ref, before)


def test_fuse_into_fp8_dtype_linear_is_refused(ref):
    gen = torch.Generator().manual_seed(12)
    sd = {}
    kohya_layer(gen, sd, "double_blocks.0.img_mlp.0", MLP, H, rank=2)
    ref.double_blocks[0].img_mlp[0].weight.data = ref.double_blocks[0].img_mlp[0].weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="float8_e4m3fn weights"):
        fluxrt.load_lora(sd).fuse(ref)


@pytest.mark.parametrize("scale", [float("nan"), True, "1"])
def test_fuse_refuses_a_bad_scale(ref, scale):
    with pytest.raises(ValueError, match="scale must be a finite number"):
        every_layer_lora(ref, 1).fuse(ref, scale=scale)


# ---- refusals: every file fluxrt cannot apply fully is one CheckpointError ----


def pair(name, rank=2, out_features=H, in_features=H, seed=0):
    down, up = factors(torch.Generator().manual_seed(seed), rank, out_features, in_features)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}


GOOD = "lora_unet_double_blocks_0_img_attn_proj"


def with_key(key, value, base=None):
    return {**(base if base is not None else pair(GOOD)), key: value}


REFUSALS = {
    "text encoder": (with_key("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", torch.ones(2, 4)),
                     r"text-encoder parts: lora_te1_.*transformer LoRAs only"),
    "diffusers text encoder": (with_key("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
                                        torch.ones(2, 4)), "text-encoder parts"),
    "unknown keys": ({**pair(GOOD), **{f"lora_unet_foo_{i}.lora_down.weight": torch.ones(1, 1) for i in range(9)}},
                     r"unknown keys.*lora_unet_foo_0.*\(9 in all\)"),
    "unknown block layer": (with_key("lora_unet_double_blocks_0_img_attn_norm.lora_down.weight", torch.ones(2, 4)),
                            "unknown keys.*img_attn_norm"),
    "A without B": ({f"{GOOD}.lora_down.weight": torch.ones(2, H)}, r"has A \(down\) but no B \(up\)"),
    "B without A": ({f"{GOOD}.lora_up.weight": torch.ones(H, 2)}, r"has B \(up\) but no A \(down\)"),
    "alpha alone": ({**pair(GOOD), "lora_unet_double_blocks_1_img_attn_proj.alpha": torch.tensor(1.0)},
                    r"lora_unet_double_blocks_1_img_attn_proj has an alpha but no A \(down\), B \(up\)"),
    "rank mismatch": (with_key(f"{GOOD}.lora_up.weight", torch.ones(H, 3)), r"B's columns must equal A's rows"),
    "1-dim factor": (with_key(f"{GOOD}.lora_down.weight", torch.ones(2)), "2-dim floating-point matrix"),
    "integer factor": (with_key(f"{GOOD}.lora_down.weight", torch.ones(2, H, dtype=torch.int64)),
                       "2-dim floating-point matrix"),
    "NaN": (with_key(f"{GOOD}.lora_up.weight", torch.full((H, 2), float("nan"))), "NaN or infinite"),
    "inf alpha": (with_key(f"{GOOD}.alpha", torch.tensor(float("inf"))), r"alpha is inf"),
    "vector alpha": (with_key(f"{GOOD}.alpha", torch.ones(2)), "an alpha is one number"),
    "wrong in features": (pair(GOOD, in_features=2 * H), r"does not fit its weight \[128, 128\]"),
    "wrong rows": (pair(GOOD, out_features=H + 1), r"does not fit its weight \[128, 128\]"),
    "block the model lacks": (pair("lora_unet_double_blocks_7_img_attn_proj"),
                              "targets double_blocks.7.img_attn.proj, which a FLUX model with hidden size 128, "
                              "2 double"),
    "q part of wrong size": (pair("transformer.transformer_blocks.0.attn.to_q", out_features=H // 2),
                             r"updates 64 rows, but the q part of double_blocks.0.img_attn.qkv has 128"),
    "mlp part that overruns": (pair("transformer.single_transformer_blocks.0.proj_mlp", out_features=MLP + 8),
                               "does not fit its weight"),
    "mixed namings": ({**pair(GOOD), **pair("transformer.transformer_blocks.0.attn.to_out.0")},
                      r"mixes LoRA namings: kohya .*diffusers"),
    "duplicate": ({**pair("diffusion_model.double_blocks.0.img_attn.proj"),
                   "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.ones(2, H)},
                  "repeats the down of layer diffusion_model.double_blocks.0.img_attn.proj"),
    "DoRA": (with_key(f"{GOOD}.dora_scale", torch.ones(1, H)), "DoRA file"),
    "XLabs single proj": ({"single_blocks.0.processor.proj_lora.down.weight": torch.ones(2, H),
                           "single_blocks.0.processor.proj_lora.up.weight": torch.ones(H, 2)},
                          "single-block proj_lora"),
    "empty": ({}, "holds no tensors"),
    "not tensors": ({GOOD + ".lora_down.weight": [1.0, 2.0]}, "names to tensors"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal(case):
    state_dict, message = REFUSALS[case]
    with pytest.raises(CheckpointError, match=message):
        fluxrt.load_lora(state_dict, config=CFG)


def test_the_good_base_of_the_refusals_loads():
    """The refusals above differ from this file by one defect each."""
    state_dict = pair(GOOD)
    keys, tensors = list(state_dict), list(state_dict.values())
    (layer,) = fluxrt.load_lora(state_dict, config=CFG).layers
    assert (layer.module, layer.rank, layer.scale) == ("double_blocks.0.img_attn.proj", 2, 1.0)
    assert list(state_dict) == keys and all(a is b for a, b in zip(state_dict.values(), tensors)), "input changed"


def test_pickle_file_is_refused_unread(tmp_path):
    path = tmp_path / "lora.pt"
    torch.save(pair(GOOD), path)
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*never pickle"):
        fluxrt.load_lora(path)


def test_missing_file_and_ambiguous_folder_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no LoRA file at"):
        fluxrt.load_lora(tmp_path / "absent.safetensors")
    for name in ("a.safetensors", "b.safetensors"):
        save_file({k: v.contiguous() for k, v in pair(GOOD).items()}, str(tmp_path / name))
    with pytest.raises(CheckpointError, match="folder with 2 .safetensors files"):
        fluxrt.load_lora(tmp_path)


@pytest.mark.parametrize("metadata, message", [
    ({"transformer.r": 2, "transformer.lora_alpha": 2, "transformer.use_dora": True}, "use_dora=True"),
    ({"transformer.r": 2, "transformer.lora_alpha": 2, "transformer.use_rslora": True}, "use_rslora=True"),
])
def test_metadata_fluxrt_cannot_apply_is_refused(tmp_path, metadata, message):
    sd = pair("transformer.transformer_blocks.0.attn.to_out.0")
    write(tmp_path, sd, {"lora_adapter_metadata": json.dumps(metadata)})
    with pytest.raises(CheckpointError, match=message):
        fluxrt.load_lora(tmp_path)


def test_alphas_in_keys_and_metadata_at_once_are_refused(tmp_path):
    sd = {**pair("transformer.transformer_blocks.0.attn.to_out.0"),
          "transformer.transformer_blocks.0.attn.to_out.0.alpha": torch.tensor(1.0)}
    write(tmp_path, sd, {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 4})})
    with pytest.raises(CheckpointError, match="alphas twice"):
        fluxrt.load_lora(tmp_path)


def test_a_kept_fuse_is_permanent_and_frees_its_originals(ref):
    a, b = every_layer_lora(ref, 1), every_layer_lora(ref, 2)
    original = {k: v.clone() for k, v in ref.state_dict().items()}
    first = a.fuse(ref, 0.5)
    after_first = {k: v.clone() for k, v in ref.state_dict().items()}
    second = b.fuse(ref, 1.0)
    first.keep()
    assert fluxrt.lora.fused_loras(ref) == [second] and not first.fused and second.fused
    with pytest.raises(RuntimeError, match="unfused or kept already"):
        first.keep()
    with pytest.raises(RuntimeError, match="unfused already"):
        first.unfuse()
    second.unfuse()  # the LoRA fused on top still unfuses, back to the kept fuse's weights
    assert all(torch.equal(v, after_first[k]) for k, v in ref.state_dict().items())
    assert any(not torch.equal(v, original[k]) for k, v in ref.state_dict().items())
