"""load_transformer: every format round-trips through real safetensors files; every bad input gets one clear error."""

import dataclasses
import json
import logging

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

import fluxrt
from fluxrt import CheckpointError, FluxConfig, sampling
from fluxrt.testing import randomize_parameters_, sqnr_db

TINY = FluxConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    return randomize_parameters_(fluxrt.reference.Flux(TINY), seed=11).eval()


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(5)
    return dict(
        img=sampling.pack(sampling.get_noise(2, 48, 64, seed=9)),
        img_ids=sampling.prepare_img_ids(2, 48, 64),
        txt=torch.randn(2, 9, TINY.context_in_dim, generator=gen),
        txt_ids=sampling.prepare_txt_ids(2, 9),
        timesteps=torch.rand(2, generator=gen),
        y=torch.randn(2, TINY.vec_in_dim, generator=gen),
        guidance=torch.full((2,), 3.5),
    )


def forward(m, inputs):
    with torch.no_grad():
        return m(**inputs)


def assert_loaded_exactly(loaded, model, inputs):
    assert loaded.params == model.params
    assert not any(p.is_meta or p.requires_grad for p in loaded.parameters())
    sd = loaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k
    torch.testing.assert_close(forward(loaded, inputs), forward(model, inputs), atol=0, rtol=0)


def test_bfl_file(tmp_path, model, inputs):
    save_file(model.state_dict(), tmp_path / "flux1-tiny.safetensors")
    loaded = fluxrt.load_transformer(tmp_path / "flux1-tiny.safetensors", dtype=torch.float32)
    assert_loaded_exactly(loaded, model, inputs)


def test_diffusers_sharded_folder(tmp_path, model, inputs):
    dif = FluxTransformer2DModel(**TINY.to_diffusers())
    dif.load_state_dict(fluxrt.bfl_to_diffusers(model.state_dict()), strict=True)
    dif.save_pretrained(tmp_path / "transformer", max_shard_size="300KB", safe_serialization=True)
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    loaded = fluxrt.load_transformer(tmp_path / "transformer", dtype=torch.float32)
    assert_loaded_exactly(loaded, model, inputs)
    # a whole pipeline folder works too: the transformer/ subfolder is found
    assert_loaded_exactly(fluxrt.load_transformer(tmp_path, dtype=torch.float32), model, inputs)


def test_diffusers_single_file(tmp_path, model, inputs):
    save_file(fluxrt.bfl_to_diffusers(model.state_dict()), tmp_path / "diffusers.safetensors")
    loaded = fluxrt.load_transformer(tmp_path / "diffusers.safetensors", dtype=torch.float32)
    assert_loaded_exactly(loaded, model, inputs)


def test_comfy_all_in_one(tmp_path, model, inputs, caplog):
    sd = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3)
    sd["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
    save_file(sd, tmp_path / "comfy.safetensors")
    with caplog.at_level(logging.WARNING, logger="fluxrt"):
        loaded = fluxrt.load_transformer(tmp_path / "comfy.safetensors", dtype=torch.float32)
    assert "ignored 2 non-transformer keys" in caplog.text
    assert_loaded_exactly(loaded, model, inputs)


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_file_upcast_on_request(tmp_path, model, inputs, scaled):
    sd, expected = {}, {}
    for k, v in model.state_dict().items():
        if v.ndim == 2:
            scale = v.abs().amax() / 448 if scaled else torch.tensor(1.0)
            q = (v / scale).to(torch.float8_e4m3fn)
            sd[k] = q
            expected[k] = q.float() * scale
            if scaled:
                sd[k.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
                sd[k.removesuffix(".weight") + ".scale_input"] = torch.ones(1)
        else:
            sd[k] = expected[k] = v
    sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    if scaled:
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, tmp_path / "flux-fp8.safetensors")
    loaded = fluxrt.load_transformer(tmp_path / "flux-fp8.safetensors", dtype=torch.float32, fp8="upcast")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, expected[k], atol=0, rtol=0, msg=k)
    # fp8 weights: the model output stays close to the full-precision one
    assert sqnr_db(forward(loaded, inputs), forward(model, inputs)) > 15


def test_dtype_device_and_config_override(tmp_path, model):
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    loaded = fluxrt.load_transformer(tmp_path / "m.safetensors")  # default bf16 on cpu
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    other_axes = dataclasses.replace(TINY, axes_dim=(16, 24, 24))
    assert fluxrt.load_transformer(tmp_path / "m.safetensors", config=other_axes).params == other_axes


def test_infers_schnell_and_depth(tmp_path):
    cfg = dataclasses.replace(TINY, guidance_embed=False, depth=1, depth_single_blocks=3)
    m = fluxrt.reference.Flux(cfg)
    save_file(m.state_dict(), tmp_path / "schnell.safetensors")
    assert fluxrt.load_transformer(tmp_path / "schnell.safetensors").params == cfg


# ---- errors: each one clear exception, before any model is returned ----


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fluxrt.load_transformer(tmp_path / "nope.safetensors")


def test_pickle_is_refused(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "flux.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        fluxrt.load_transformer(tmp_path / "flux.pt")
    (tmp_path / "folder").mkdir()
    torch.save(model.state_dict(), tmp_path / "folder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no .safetensors files.*pytorch_model.bin"):
        fluxrt.load_transformer(tmp_path / "folder")


def test_not_safetensors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01 definitely not a safetensors header" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fluxrt.load_transformer(tmp_path / "junk.safetensors")


def test_unknown_layout(tmp_path):
    save_file({"model.embed_tokens.weight": torch.randn(4, 3)}, tmp_path / "llm.safetensors")
    with pytest.raises(CheckpointError, match=r"unrecognized checkpoint layout in .*llm\.safetensors.*embed_tokens"):
        fluxrt.load_transformer(tmp_path / "llm.safetensors")


def test_missing_key_is_named(tmp_path, model):
    sd = dict(model.state_dict())
    del sd["double_blocks.1.txt_mlp.2.bias"]
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: double_blocks\.1\.txt_mlp\.2\.bias"):
        fluxrt.load_transformer(tmp_path / "m.safetensors")


def test_unexpected_key_is_named(tmp_path, model):
    sd = dict(model.state_dict())
    sd["single_blocks.0.lora_up.weight"] = torch.randn(4, 4)
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys: single_blocks\.0\.lora_up\.weight"):
        fluxrt.load_transformer(tmp_path / "m.safetensors")
    dif = fluxrt.bfl_to_diffusers(model.state_dict())
    dif["transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.randn(4, 4)
    save_file(dif, tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match=r"unrecognized diffusers .*to_q\.lora_A\.weight"):
        fluxrt.load_transformer(tmp_path / "d.safetensors")


def test_partial_fused_weight_is_named(tmp_path, model):
    dif = fluxrt.bfl_to_diffusers(model.state_dict())
    del dif["single_transformer_blocks.1.attn.to_k.bias"]
    save_file(dif, tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['single_transformer_blocks\.1\.attn\.to_k\.bias'\]"):
        fluxrt.load_transformer(tmp_path / "d.safetensors")


def test_shape_mismatch_names_key_and_shapes(tmp_path, model):
    sd = dict(model.state_dict())
    sd["double_blocks.0.img_mlp.0.bias"] = torch.randn(100)
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"double_blocks\.0\.img_mlp\.0\.bias: checkpoint \(100,\) vs model \(512,\)"):
        fluxrt.load_transformer(tmp_path / "m.safetensors")
    save_file(model.state_dict(), tmp_path / "ok.safetensors")
    wider = dataclasses.replace(TINY, hidden_size=256, num_heads=4)
    with pytest.raises(CheckpointError, match=r"img_in\.weight: checkpoint \(128, 64\) vs model \(256, 64\)"):
        fluxrt.load_transformer(tmp_path / "ok.safetensors", config=wider)


def test_diffusers_folder_errors(tmp_path, model):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    save_file(fluxrt.bfl_to_diffusers(model.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="describes a SD3Transformer2DModel"):
        fluxrt.load_transformer(folder)
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **TINY.to_diffusers()}))
    index = {"weight_map": {"x_embedder.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists shards that are not in"):
        fluxrt.load_transformer(folder)
