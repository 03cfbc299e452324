"""diffusers' LoRA surface through fluxrt.compile (fluxrt.diffusers_lora): a tiny fp32 FluxPipeline doing the same
LoRA calls (load_lora_weights, set_adapters, joint_attention_kwargs scale, disable/enable, delete, unload,
fuse/unfuse) plain and compiled gives the same pixels (<= 1e-4), with the LoRAs loaded before compile or after it;
what fluxrt does not run (DoRA, rsLoRA, Control LoRAs, a LoRA for another model size, a LoRA fused with its peft
layers still loaded) is refused with the pipeline left as it was."""

import copy

import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from test_compile_atomic import assert_as_before, snapshot

import fluxrt
from fluxrt import CheckpointError, FluxConfig
from fluxrt.testing import sqnr_db

SIZE = 32  # pixels: 2 x 2 latent tokens
CALL = dict(prompt="a red apple", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=3.5,
            max_sequence_length=16, output_type="pt")
ATTENTION = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"]
EVERYWHERE = ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                          "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear", "x_embedder",
                          "context_embedder", "norm_out.linear"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tiny_pipeline import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_lora_pipeline"), seed=5)


def fresh(base) -> FluxPipeline:
    """A pipeline of its own (compile consumes the transformer and VAE; LoRAs change the text encoder)."""
    pipe = FluxPipeline(**{name: copy.deepcopy(component) for name, component in base.components.items()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **extra) -> torch.Tensor:
    return pipe(**CALL, generator=torch.Generator().manual_seed(0), **extra).images


def lora_file(folder, base, seed: int, targets, rank: int, alpha: float, text_encoder: bool = False, **extra):
    """A real PEFT LoRA for the tiny transformer (random factors, so it moves the image), saved by diffusers'
    save_lora_weights with its config as metadata; text_encoder=True adds a CLIP LoRA beside it."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base.transformer)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
    model.add_adapter(config)
    layers = dict(transformer_lora_layers={k: 3 * v for k, v in get_peft_model_state_dict(model).items()},
                  transformer_lora_adapter_metadata=config.to_dict())
    if text_encoder:
        width = base.text_encoder.config.hidden_size
        gen = torch.Generator().manual_seed(seed)
        prefix = "text_model.encoder.layers.0.self_attn"
        layers["text_encoder_lora_layers"] = {
            f"{prefix}.{proj}.lora_{ab}.weight": torch.randn(*((2, width) if ab == "A" else (width, 2)), generator=gen)
            for proj in ("q_proj", "v_proj") for ab in "AB"}
        layers["text_encoder_lora_adapter_metadata"] = LoraConfig(r=2, lora_alpha=2,
                                                                  target_modules=["q_proj", "v_proj"]).to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(str(folder), **layers)
    return str(folder / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "style": lora_file(root / "style", base, 1, EVERYWHERE, rank=4, alpha=6.0, text_encoder=True),
        "detail": lora_file(root / "detail", base, 2, ATTENTION + ["proj_mlp", "ff.net.2"], rank=2, alpha=1.0),
        "detail2": lora_file(root / "detail2", base, 3, ATTENTION + ["proj_mlp", "ff.net.2"], rank=2, alpha=1.0),
    }


def assert_same(plain, compiled, what: str, **extra):
    torch.testing.assert_close(run(compiled, **extra), run(plain, **extra), atol=1e-4, rtol=0,
                               msg=lambda m: f"{what}: {m}")


def both(pipes, method: str, *args, **kwargs):
    for pipe in pipes:
        getattr(pipe, method)(*args, **kwargs)


def check_the_lora_surface(plain, compiled):
    """The same LoRA calls on both pipelines; the pixels agree after each (two adapters are loaded, "b" active)."""
    pipes = (plain, compiled)
    assert compiled.get_list_adapters() == plain.get_list_adapters()
    assert compiled.get_active_adapters() == plain.get_active_adapters()
    assert_same(plain, compiled, "as loaded")
    both(pipes, "set_adapters", ["a", "b"], [0.7, -0.4])
    assert_same(plain, compiled, "set_adapters a 0.7, b -0.4")
    assert_same(plain, compiled, "joint_attention_kwargs scale 0.5", joint_attention_kwargs={"scale": 0.5})
    both(pipes, "disable_lora")
    assert_same(plain, compiled, "disable_lora")
    both(pipes, "enable_lora")
    assert_same(plain, compiled, "enable_lora")
    both(pipes, "fuse_lora", lora_scale=0.8)
    assert compiled.fused_loras == plain.fused_loras == {"a", "b"}
    assert_same(plain, compiled, "fuse_lora(lora_scale=0.8)")
    both(pipes, "unfuse_lora")
    assert compiled.fused_loras == plain.fused_loras == set()
    assert_same(plain, compiled, "unfuse_lora (the scale 0.8 stays, as in peft)")
    both(pipes, "delete_adapters", "a")
    assert compiled.get_list_adapters() == plain.get_list_adapters()
    assert compiled.get_active_adapters() == plain.get_active_adapters() == ["b"]
    assert_same(plain, compiled, "delete_adapters a")
    both(pipes, "unload_lora_weights")
    assert compiled.get_list_adapters() == plain.get_list_adapters() == {}
    assert_same(plain, compiled, "unload_lora_weights")


def test_loras_loaded_after_compile_match_diffusers(base, files):
    plain, compiled = fresh(base), fluxrt.compile(fresh(base), backend="torch")
    before = run(compiled)
    for pipe in (plain, compiled):
        pipe.load_lora_weights(files["style"], adapter_name="a")
        pipe.load_lora_weights(files["detail"], adapter_name="b")
    assert (run(plain) - before).abs().max() > 0.05, "the LoRAs must move the image for parity to mean anything"
    assert compiled.transformer.active_adapters() == ["b"], "peft activates the adapter loaded last, alone"
    check_the_lora_surface(plain, compiled)
    assert torch.equal(run(compiled), before), "unloading every LoRA must give back the compiled model's pixels"


def test_loras_loaded_before_compile_match_diffusers(base, files):
    plain, pipe = fresh(base), fresh(base)
    for each in (plain, pipe):
        each.load_lora_weights(files["style"], adapter_name="a")
        each.load_lora_weights(files["detail"], adapter_name="b")
        each.set_adapters(["a", "b"], [0.5, 1.5])
    compiled = fluxrt.compile(pipe, backend="torch")
    assert compiled.transformer.fast.lora.loaded() == {"a": pytest.approx(0.5), "b": pytest.approx(1.5)}
    assert_same(plain, compiled, "set_adapters before compile")
    both((plain, compiled), "set_adapters", "b")
    check_the_lora_surface(plain, compiled)


def test_disabled_and_inactive_adapters_before_compile_stay_so(base, files):
    plain, pipe = fresh(base), fresh(base)
    for each in (plain, pipe):
        each.load_lora_weights(files["style"], adapter_name="a")
        each.load_lora_weights(files["detail"], adapter_name="b")  # a inactive from here
    compiled = fluxrt.compile(pipe, backend="torch")
    assert compiled.transformer.fast.lora.loaded() == {"a": 0.0, "b": 1.0}
    assert_same(plain, compiled, "b active, a loaded but inactive")
    plain, pipe = fresh(base), fresh(base)
    for each in (plain, pipe):
        each.load_lora_weights(files["detail"], adapter_name="b")
        each.disable_lora()
    compiled = fluxrt.compile(pipe, backend="torch")
    assert_same(plain, compiled, "disabled before compile")
    both((plain, compiled), "enable_lora")
    assert_same(plain, compiled, "enabled after compile")


def test_fuse_then_unload_keeps_the_fused_weights_as_diffusers(base, files):
    plain, compiled = fresh(base), fluxrt.compile(fresh(base), backend="torch")
    for pipe in (plain, compiled):
        pipe.load_lora_weights(files["detail"], adapter_name="d")
        pipe.fuse_lora(lora_scale=0.6)
        pipe.unload_lora_weights()
    assert_same(plain, compiled, "fuse_lora then unload_lora_weights")
    assert compiled.transformer.fast.lora.loaded() == {}
    assert not getattr(compiled.transformer.fast.model, "_fluxrt_fused_loras", []), "the host originals must go"


def test_hotswap_replaces_the_adapter_in_place_as_diffusers(base, files):
    plain, compiled = fresh(base), fluxrt.compile(fresh(base), backend="torch")
    for pipe in (plain, compiled):
        pipe.load_lora_weights(files["detail"], adapter_name="d")
    branches = compiled.transformer.fast.lora
    addresses = {name: t.data_ptr() for name, t in branches.named_buffers()}
    first = run(compiled)
    for pipe in (plain, compiled):
        pipe.load_lora_weights(files["detail2"], adapter_name="d", hotswap=True)
    assert (run(compiled) - first).abs().max() > 0.05, "the swapped-in LoRA must change the image"
    assert_same(plain, compiled, "hotswap")
    assert {name: t.data_ptr() for name, t in branches.named_buffers()} == addresses, "a hotswap reallocated"
    both((plain, compiled), "fuse_lora")
    assert_same(plain, compiled, "the swapped-in LoRA fused")


def test_deleting_active_adapters_activates_as_peft(base, files):
    plain, compiled = fresh(base), fluxrt.compile(fresh(base), backend="torch")
    for pipe in (plain, compiled):
        for name, file in (("a", "detail"), ("b", "detail2"), ("c", "style")):
            pipe.load_lora_weights(files[file], adapter_name=name)
        pipe.set_adapters(["b", "c"], [0.5, 0.8])
    both((plain, compiled), "delete_adapters", "c")
    assert compiled.transformer.active_adapters() == ["b"]
    assert_same(plain, compiled, "c deleted: b stays active")
    both((plain, compiled), "delete_adapters", "b")
    assert compiled.transformer.active_adapters() == ["a"]
    assert_same(plain, compiled, "b deleted: the first adapter left becomes active")


def test_fusing_one_adapter_beside_another_follows_peft(base, files):
    """peft runs a layer holding a merged adapter as its base layer alone: fusing "a" (every layer) while "b" (a
    subset of a's layers) is active leaves b without effect; fusing b alone would leave a running in part of its
    layers only, which fluxrt refuses, changing nothing."""
    plain, compiled = fresh(base), fluxrt.compile(fresh(base), backend="torch")
    for pipe in (plain, compiled):
        pipe.load_lora_weights(files["style"], adapter_name="a")
        pipe.load_lora_weights(files["detail"], adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.7, 0.9])
    expected = run(compiled)
    with pytest.raises(NotImplementedError, match="part of their layers"):
        compiled.fuse_lora(adapter_names=["b"])
    assert torch.equal(run(compiled), expected)
    assert compiled.transformer.fast.lora.loaded() == {"a": pytest.approx(0.7), "b": pytest.approx(0.9)}
    both((plain, compiled), "fuse_lora", adapter_names=["a"])
    assert_same(plain, compiled, "a fused, b active unfused")
    both((plain, compiled), "unfuse_lora")
    assert_same(plain, compiled, "both unfused")


def test_lora_scale_per_call_recompiles_nothing(base, files):
    """The joint_attention_kwargs scale travels as the forward's per-image scales: no buffer is rewritten, so the
    next call without a scale runs the adapters at their own weights."""
    compiled = fluxrt.compile(fresh(base), backend="torch")
    compiled.load_lora_weights(files["detail"], adapter_name="d")
    branches = compiled.transformer.fast.lora
    buffers = {name: (t.data_ptr(), t.clone()) for name, t in branches.named_buffers()}
    plain_scale, scaled = run(compiled), run(compiled, joint_attention_kwargs={"scale": 0.0})
    compiled.disable_lora()
    torch.testing.assert_close(scaled, run(compiled), atol=1e-6, rtol=0, msg="scale 0 must run the base model")
    compiled.enable_lora()
    assert torch.equal(run(compiled), plain_scale)
    assert all(torch.equal(t, buffers[name][1]) and t.data_ptr() == buffers[name][0]
               for name, t in branches.named_buffers() if name != "scales")


def test_loras_on_fp8_weights_run_unfused_and_fusing_is_refused(base, files):
    """quantize='fp8-weight': the LoRA loaded before compile runs as a side branch beside the FP8 weights (close to
    diffusers' fp32 LoRA, much closer than without it); fusing into FP8 weights is refused, changing nothing."""
    plain, pipe = fresh(base), fresh(base)
    for each in (plain, pipe):
        each.load_lora_weights(files["style"], adapter_name="a")
    compiled = fluxrt.compile(pipe, quantize="fp8-weight", backend="torch")
    want, got = run(plain), run(compiled)
    plain.disable_lora()
    without = run(plain)
    assert sqnr_db(got, want) >= 30 and sqnr_db(got, want) > sqnr_db(without, want) + 10
    with pytest.raises(TypeError, match="FP8"):
        compiled.fuse_lora()
    assert compiled.fused_loras == set() and torch.equal(run(compiled), got)


# ---- refusals: the pipeline is left as it was ----


def refused_before_compile(pipe, match):
    transformer, before, expected = pipe.transformer, snapshot(pipe.transformer), run(pipe)
    with pytest.raises(CheckpointError, match=match):
        fluxrt.compile(pipe, backend="torch")
    assert pipe.transformer is transformer
    assert_as_before(transformer, before)
    assert torch.equal(run(pipe), expected)


@pytest.mark.parametrize("extra, match", [(dict(use_dora=True), "DoRA, rsLoRA"), (dict(use_rslora=True), "rsLoRA")])
def test_dora_and_rslora_before_compile_are_refused_untouched(base, extra, match):
    pipe = fresh(base)
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False,
                                            **extra))
    refused_before_compile(pipe, match)


def test_a_lora_fused_with_its_peft_layers_loaded_is_refused_untouched(base, files):
    pipe = fresh(base)
    pipe.load_lora_weights(files["detail"], adapter_name="d")
    pipe.fuse_lora()
    refused_before_compile(pipe, r"fused by fuse_lora\(\).*unfuse_lora\(\) before fluxrt.compile")


def control_lora(base, rank=2) -> dict:
    """FLUX.1 Canny/Depth-dev LoRA naming: x_embedder reads 128 channels (latents + control), norms replaced."""
    hidden = FluxConfig.preset("tiny").hidden_size
    gen = torch.Generator().manual_seed(9)
    return {"transformer.x_embedder.lora_A.weight": torch.randn(rank, 128, generator=gen),
            "transformer.x_embedder.lora_B.weight": torch.randn(hidden, rank, generator=gen),
            "transformer.transformer_blocks.0.attn.norm_q.weight": torch.rand(64, generator=gen)}


def test_control_lora_before_compile_is_refused_untouched(base):
    pipe = fresh(base)
    pipe.load_lora_weights(control_lora(base), adapter_name="canny")
    transformer, before = pipe.transformer, snapshot(pipe.transformer)
    with pytest.raises(CheckpointError, match="Control LoRA"):
        fluxrt.compile(pipe, backend="torch")
    assert pipe.transformer is transformer
    assert_as_before(transformer, before)


def other_size_lora(tmp_path):
    hidden = 2 * FluxConfig.preset("tiny").hidden_size  # a LoRA for a wider FLUX
    down, up = torch.randn(2, hidden), torch.randn(hidden, 2)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": down,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": up}, str(tmp_path / "wide.safetensors"))
    return str(tmp_path / "wide.safetensors")


def dora_file(tmp_path, base):
    return lora_file(tmp_path / "dora", base, 4, ["to_q"], rank=2, alpha=2.0, use_dora=True)


def rslora_file(tmp_path, base):
    return lora_file(tmp_path / "rslora", base, 4, ["to_q"], rank=2, alpha=2.0, use_rslora=True)


@pytest.mark.parametrize("make, match", [
    (lambda tmp_path, base: control_lora(base), "Control LoRA"),
    (lambda tmp_path, base: other_size_lora(tmp_path), "another FLUX model"),
    (dora_file, "DoRA"),
    (rslora_file, "rsLoRA"),
])
def test_loras_fluxrt_cannot_run_after_compile_are_refused_untouched(base, files, tmp_path, make, match):
    compiled = fluxrt.compile(fresh(base), backend="torch")
    compiled.load_lora_weights(files["detail"], adapter_name="d")
    adapters, expected = compiled.get_list_adapters(), run(compiled)
    with pytest.raises(CheckpointError, match=match):
        compiled.load_lora_weights(make(tmp_path, base), adapter_name="x")
    assert compiled.get_list_adapters() == adapters
    assert torch.equal(run(compiled), expected)


def test_block_wise_weights_unknown_adapters_and_set_lora_device_are_refused(base, files):
    compiled = fluxrt.compile(fresh(base), backend="torch")
    compiled.load_lora_weights(files["detail"], adapter_name="d")
    with pytest.raises(NotImplementedError, match="block-wise"):
        compiled.transformer.set_adapters(["d"], [{"transformer_blocks": 0.5}])
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        compiled.set_adapters(["nope"], [1.0])
    with pytest.raises(NotImplementedError, match="side branches on the model's device"):
        compiled.set_lora_device(["d"], "cpu")
    assert compiled.transformer.fast.lora.loaded() == {"d": 1.0}


def test_transformer_level_loads_from_a_path_and_incomplete_or_lokr_files_refused(base, files):
    plain, compiled = fresh(base), fluxrt.compile(fresh(base), backend="torch")
    for pipe in (plain, compiled):
        pipe.transformer.load_lora_adapter(files["detail"], adapter_name="d", prefix="transformer")
    assert_same(plain, compiled, "transformer.load_lora_adapter(path)")
    to_q = "transformer.transformer_blocks.0.attn.to_q"
    for state_dict, match in (({f"{to_q}.lora_A.weight": torch.randn(2, 128)}, "not a complete LoRA.*lora_B.weight"),
                              ({f"{to_q}.lokr_w1": torch.randn(2, 2)}, "LoKr")):
        with pytest.raises(CheckpointError, match=match):
            compiled.transformer.load_lora_adapter(state_dict, adapter_name="x")
    assert compiled.get_list_adapters() == {"transformer": ["d"]}


def test_loading_beside_a_fused_adapter_follows_peft_or_is_refused(base, files):
    """peft unmerges the adapters merged into the layers a new adapter is loaded into: a LoRA with all of a fused
    adapter's layers unfuses it (exactly); one with only some of them is refused, changing nothing."""
    plain, compiled = fresh(base), fluxrt.compile(fresh(base), backend="torch")
    for pipe in (plain, compiled):
        pipe.load_lora_weights(files["detail"], adapter_name="d")
        pipe.fuse_lora(lora_scale=0.5)
        pipe.load_lora_weights(files["detail2"], adapter_name="e")
    assert_same(plain, compiled, "e loaded into fused d's layers")
    both((plain, compiled), "set_adapters", ["d", "e"], [0.3, 1.0])
    assert_same(plain, compiled, "d unfused by the load, then active again")
    compiled = fluxrt.compile(fresh(base), backend="torch")
    compiled.load_lora_weights(files["style"], adapter_name="s")
    compiled.fuse_lora()
    expected, weights = run(compiled), snapshot(compiled.transformer)
    with pytest.raises(NotImplementedError, match="part of their layers"):
        compiled.load_lora_weights(files["detail"], adapter_name="d")
    assert compiled.transformer.active_adapters() == ["s"] and torch.equal(run(compiled), expected)
    assert_as_before(compiled.transformer, weights)


def test_a_load_that_does_not_fit_the_branches_changes_nothing(base, files, tmp_path):
    """Rank 24 on q, k and v needs 72 columns of the fused qkv's 64 reserved: refused with the way to reserve more;
    the adapter fused before (unfused for the load, as peft does) is fused again, bit for bit. Branches reserved
    larger before the first load take it."""
    big = lora_file(tmp_path / "big", base, 7, ATTENTION + ["proj_mlp", "ff.net.2"], rank=24, alpha=24.0)
    compiled = fluxrt.compile(fresh(base), backend="torch")
    compiled.load_lora_weights(files["detail"], adapter_name="d")
    compiled.fuse_lora()
    expected, weights = run(compiled), snapshot(compiled.transformer)
    with pytest.raises(ValueError, match=r"free rank.*enable_lora_branches\(max_rank="):
        compiled.load_lora_weights(big, adapter_name="big")
    assert_as_before(compiled.transformer, weights)
    assert compiled.get_list_adapters() == {"transformer": ["d"]} and torch.equal(run(compiled), expected)
    compiled.unfuse_lora()  # still fused, so it unfuses
    assert compiled.transformer.fast.lora.loaded() == {"d": 1.0}
    reserved = fluxrt.compile(fresh(base), backend="torch")
    reserved.transformer.fast.enable_lora_branches(max_rank=96, max_adapters=2)  # linear1: q, k, v, mlp
    reserved.load_lora_weights(big, adapter_name="big")
    assert reserved.transformer.fast.lora.max_rank == 96 and reserved.get_active_adapters() == ["big"]


def test_a_text_encoder_only_lora_is_diffusers_own(base, files):
    """The text encoders are not compiled: a LoRA for them alone loads, scales and unloads as in diffusers, and the
    compiled transformer is left without adapters."""
    from safetensors.torch import load_file

    text_only = {k: v for k, v in load_file(files["style"]).items() if k.startswith("text_encoder.")}
    plain, compiled = fresh(base), fluxrt.compile(fresh(base), backend="torch")
    before = run(compiled)
    for pipe in (plain, compiled):
        pipe.load_lora_weights(dict(text_only), adapter_name="t")
    assert compiled.get_list_adapters() == plain.get_list_adapters() == {"text_encoder": ["t"]}
    assert (run(compiled) - before).abs().max() > 1e-3, "the text-encoder LoRA must change the image"
    assert_same(plain, compiled, "text-encoder LoRA")
    assert_same(plain, compiled, "text-encoder LoRA at scale 0.3", joint_attention_kwargs={"scale": 0.3})


def test_a_bare_transformer_with_loras_compiles_with_them(base, files):
    from test_compile_atomic import diffusers_inputs

    plain, model = copy.deepcopy(base.transformer), copy.deepcopy(base.transformer)
    for each in (plain, model):
        each.load_lora_adapter(files["style"], adapter_name="a", prefix="transformer")
        each.load_lora_adapter(files["detail"], adapter_name="b", prefix="transformer")
        each.set_adapters(["a", "b"], [0.6, 1.2])
    compiled = fluxrt.compile(model, backend="torch")
    x = diffusers_inputs(height=SIZE, width=SIZE, T=5)
    with torch.no_grad():
        without = base.transformer(**x)[0]
        for scale in (1.0, 0.4):
            kwargs = dict(x, joint_attention_kwargs={"scale": scale})
            expected = plain(**kwargs)[0]
            assert (expected - without).abs().max() > 0.05, "the LoRAs must move the output"
            torch.testing.assert_close(compiled(**kwargs)[0], expected, atol=2e-5, rtol=1e-5)
    assert compiled.peft_config.keys() == plain.peft_config.keys()
