"""load_transformer / load_autoencoder refuse every bad input with one clear error: bad arguments before any file is
opened, bad files (headers, config.json, index, fp8 scales, dtypes, ranks) before any weight is read, NaN/inf
weights before a model is returned. Every case replays the input with a real safetensors file."""

import dataclasses
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fluxrt
from fluxrt import CheckpointError, FluxConfig
from fluxrt.quantize import quantize, save_transformer
from fluxrt.reference import AutoEncoder, AutoEncoderParams
from fluxrt.testing import randomize_parameters_

TINY = FluxConfig.preset("tiny")
SMALL_AE = AutoEncoderParams(ch=32, ch_mult=(1, 2), num_res_blocks=1)


@pytest.fixture(scope="module")
def state():
    """A tiny random FLUX transformer's BFL state dict (do not mutate: copy with dict(state))."""
    return randomize_parameters_(fluxrt.reference.Flux(TINY), seed=3).state_dict()


@pytest.fixture(scope="module")
def ae_state():
    return randomize_parameters_(AutoEncoder(SMALL_AE), seed=4, bias_std=0.02).state_dict()


@pytest.fixture()
def no_weight_reads(monkeypatch):
    """Fails the test if the loader reads tensor data: the check under test must be done from the headers."""

    def read(self, key):
        raise AssertionError(f"the loader read {key!r} before refusing the checkpoint")

    monkeypatch.setattr(fluxrt.loading._Source, "read", read)


def save(tensors, path):
    save_file(dict(tensors), path)
    return path


def fp8_file(state, path):
    """A fluxrt fp8 file (e4m3fn weights + per-channel `scale_weight`, config in the metadata)."""
    model = fluxrt.reference.Flux(TINY)
    model.load_state_dict(state)
    quantize(model)
    save_transformer(model, path)
    return path


def without_scales(path, keep=lambda key: False):
    """The file at `path` rewritten without its fp8 scales (except those `keep` names): a scaled file that lost them."""
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith(".scale_weight") or keep(k)}
    return save(tensors, path.with_name("lost-scales.safetensors"))


# ---- 1. arguments: checked before any file is opened ----


@pytest.mark.parametrize("loader", [fluxrt.load_transformer, fluxrt.load_autoencoder])
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dtype="bf17"), ValueError, "dtype 'bf17' is not a dtype name"),
    (dict(dtype=torch.int8), ValueError, "dtype must be a floating dtype"),
    (dict(device="gpu0"), ValueError, "device 'gpu0' is not a device"),
    (dict(device="cuda:99"), RuntimeError, "cuda:99"),
    (dict(device="meta"), ValueError, "'meta' holds no data"),
])
def test_bad_argument_comes_before_the_files(tmp_path, loader, kwargs, error, message):
    # the path does not exist: an argument error must win, so it is found before any file is touched
    with pytest.raises(error, match=message):
        loader(tmp_path / "missing.safetensors", **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(fp8="yes"), "fp8 must be 'keep' or 'upcast', got 'yes'"),
    (dict(config={"hidden_size": 128}), "config must be a fluxrt.FluxConfig or None, got dict"),
])
def test_bad_transformer_argument_comes_before_the_files(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fluxrt.load_transformer(tmp_path / "missing.safetensors", **kwargs)


def test_dtype_given_where_config_goes(tmp_path, state):
    path = save(state, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="config must be a fluxrt.FluxConfig.*pass dtype= by keyword"):
        fluxrt.load_transformer(path, torch.bfloat16)


def test_path_of_the_wrong_type():
    with pytest.raises(ValueError, match="path must be a file or folder path.*got int 123"):
        fluxrt.load_transformer(123)
    with pytest.raises(ValueError, match="path must be a file or folder path.*got NoneType"):
        fluxrt.load_autoencoder(None)


def test_dtype_and_device_names_are_accepted(tmp_path, state, ae_state):
    model = fluxrt.load_transformer(save(state, tmp_path / "m.safetensors"), dtype="fp16", device=torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    ae = fluxrt.load_autoencoder(save(ae_state, tmp_path / "ae.safetensors"), dtype="float32", device="cpu")
    assert {p.dtype for p in ae.parameters()} == {torch.float32}
    # None: the device's default dtype (fp32 on the CPU)
    assert {p.dtype for p in fluxrt.load_transformer(tmp_path / "m.safetensors", dtype=None).parameters()} == {
        fluxrt.devices.resolve_dtype(None, torch.device("cpu"))}


# ---- 2. fp8 scales ----


def test_fp8_file_that_lost_its_scales_is_refused(tmp_path, state, no_weight_reads):
    path = without_scales(fp8_file(state, tmp_path / "fp8.safetensors"))
    with pytest.raises(CheckpointError, match=r"fp8 weights have no scale.*double_blocks\.0\..*fp8=\"upcast\""):
        fluxrt.load_transformer(path)


def test_plain_cast_fp8_file_loads_with_upcast(tmp_path, state, caplog):
    plain = {k: (v.clamp(-448, 448).to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in state.items()}
    path = save(plain, tmp_path / "plain-fp8.safetensors")
    with caplog.at_level(logging.WARNING, logger="fluxrt"):
        loaded = fluxrt.load_transformer(path, dtype=torch.float32, fp8="upcast")
    assert "plain cast" in caplog.text
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, plain[k].float(), atol=0, rtol=0, msg=k)


def test_fp8_file_with_some_scales_lost_is_refused_in_both_modes(tmp_path, state, no_weight_reads):
    full = fp8_file(state, tmp_path / "fp8.safetensors")
    path = without_scales(full, keep=lambda key: key.startswith("double_blocks."))
    for mode in ("keep", "upcast"):
        with pytest.raises(CheckpointError, match=r"fp8 weights \['single_blocks\..*lost some of its scales"):
            fluxrt.load_transformer(path, fp8=mode)


def test_fp8_scale_of_the_wrong_size_is_refused(tmp_path, state, no_weight_reads):
    tensors = load_file(fp8_file(state, tmp_path / "fp8.safetensors"))
    tensors["double_blocks.1.img_mlp.2.scale_weight"] = torch.ones(7)
    path = save(tensors, tmp_path / "bad-scale.safetensors")
    with pytest.raises(CheckpointError, match=r"img_mlp\.2\.scale_weight' has shape \[7\].*128 rows"):
        fluxrt.load_transformer(path)


def test_two_scales_for_one_weight_are_refused(tmp_path, state, no_weight_reads):
    tensors = load_file(fp8_file(state, tmp_path / "fp8.safetensors"))
    tensors["single_blocks.0.linear2.weight_scale"] = tensors["single_blocks.0.linear2.scale_weight"].clone()
    path = save(tensors, tmp_path / "two-scales.safetensors")
    with pytest.raises(CheckpointError, match=r"'single_blocks\.0\.linear2\.weight' has two fp8 scales"):
        fluxrt.load_transformer(path)


# ---- 3. NaN / inf weights: one error naming the first bad tensor, no model ----


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_transformer_weight_is_named(tmp_path, state, bad):
    tensors = dict(state)
    tensors["double_blocks.1.txt_mlp.0.weight"] = tensors["double_blocks.1.txt_mlp.0.weight"].clone()
    tensors["double_blocks.1.txt_mlp.0.weight"][3, 5] = bad
    path = save(tensors, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"'double_blocks\.1\.txt_mlp\.0\.weight' in .*nan\.safetensors has NaN"):
        fluxrt.load_transformer(path)


def test_non_finite_diffusers_weight_is_named_by_its_file_key(tmp_path, state):
    tensors = fluxrt.bfl_to_diffusers(state)
    tensors["single_transformer_blocks.1.attn.to_k.weight"][0, 0] = float("nan")
    path = save(tensors, tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match=r"'single_transformer_blocks\.1\.attn\.to_k\.weight' .* has NaN"):
        fluxrt.load_transformer(path)


def test_non_finite_kept_fp8_weight_is_named(tmp_path, state):
    tensors = load_file(fp8_file(state, tmp_path / "fp8.safetensors"))
    tensors["single_blocks.1.linear1.weight"].view(torch.uint8)[2, 2] = 0x7F  # e4m3fn's NaN
    path = save(tensors, tmp_path / "nan-fp8.safetensors")
    with pytest.raises(CheckpointError, match=r"'single_blocks\.1\.linear1\.weight' .* has NaN"):
        fluxrt.load_transformer(path)


def test_non_finite_fp8_scale_is_named(tmp_path, state):
    tensors = load_file(fp8_file(state, tmp_path / "fp8.safetensors"))
    tensors["double_blocks.0.txt_attn.proj.scale_weight"][1] = float("inf")
    path = save(tensors, tmp_path / "inf-scale.safetensors")
    with pytest.raises(CheckpointError, match=r"'double_blocks\.0\.txt_attn\.proj\.scale_weight' .* has NaN"):
        fluxrt.load_transformer(path)


def test_float16_overflow_is_named_with_the_fix(tmp_path, state):
    tensors = dict(state)
    tensors["img_in.bias"] = tensors["img_in.bias"] + 1e6  # fine in fp32 and bf16, inf in fp16
    path = save(tensors, tmp_path / "big.safetensors")
    with pytest.raises(CheckpointError, match=r"'img_in\.bias' .*overflow float16: load with dtype=torch\.bfloat16"):
        fluxrt.load_transformer(path, dtype=torch.float16)
    assert fluxrt.load_transformer(path, dtype=torch.bfloat16).img_in.bias.isfinite().all()


def test_non_finite_autoencoder_weight_is_named(tmp_path, ae_state):
    tensors = dict(ae_state)
    tensors["decoder.mid.attn_1.q.weight"] = torch.full_like(tensors["decoder.mid.attn_1.q.weight"], float("nan"))
    path = save(tensors, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"'decoder\.mid\.attn_1\.q\.weight' .* has NaN"):
        fluxrt.load_autoencoder(path)


# ---- 4. dtypes, from the header ----


@pytest.mark.parametrize("bad_dtype, name", [(torch.int64, "I64"), (torch.int32, "I32"), (torch.bool, "BOOL")])
def test_non_float_transformer_tensor_is_refused(tmp_path, state, no_weight_reads, bad_dtype, name):
    tensors = dict(state)
    tensors["double_blocks.0.img_mod.lin.weight"] = tensors["double_blocks.0.img_mod.lin.weight"].to(bad_dtype)
    path = save(tensors, tmp_path / "int.safetensors")
    with pytest.raises(CheckpointError, match=rf"must be floating point .*double_blocks\.0\.img_mod\.lin\.weight "
                                              rf"\({name}\)") as err:
        fluxrt.load_transformer(path)
    assert len(str(err.value)) < 600  # one clear line, not torch's load_state_dict wall of text


def test_non_float_fp8_scale_is_refused(tmp_path, state, no_weight_reads):
    tensors = load_file(fp8_file(state, tmp_path / "fp8.safetensors"))
    tensors["img_in.scale_weight"] = torch.ones(TINY.hidden_size, dtype=torch.int32)
    tensors["img_in.weight"] = state["img_in.weight"].to(torch.float8_e4m3fn)
    path = save(tensors, tmp_path / "int-scale.safetensors")
    with pytest.raises(CheckpointError, match=r"fp8 scale tensors must be floating point.*img_in\.scale_weight \(I32\)"):
        fluxrt.load_transformer(path)


def test_fp8_autoencoder_tensor_is_refused(tmp_path, ae_state, no_weight_reads):
    tensors = {k: v.to(torch.float8_e4m3fn) if v.ndim == 4 else v for k, v in ae_state.items()}
    path = save(tensors, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"autoencoder tensors must be floating point .*\(F8_E4M3\)"):
        fluxrt.load_autoencoder(path)


# ---- 5. ranks and shapes the config is inferred from ----


@pytest.mark.parametrize("key, shape", [
    ("img_in.weight", (128 * 64,)),
    ("img_in.weight", (128, 0)),
    ("txt_in.weight", (128,)),
    ("vector_in.in_layer.weight", (128, 32, 1)),
    ("final_layer.linear.weight", (64,)),
    ("double_blocks.0.img_attn.norm.query_norm.scale", (8, 8)),
    ("double_blocks.0.img_mlp.0.weight", (512 * 128,)),
])
def test_wrong_rank_is_named(tmp_path, state, no_weight_reads, key, shape):
    tensors = {**state, key: torch.zeros(shape)}
    path = save(tensors, tmp_path / "rank.safetensors")
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \({shape[0]},"):
        fluxrt.load_transformer(path)


def test_wrong_rank_in_single_block_only_model(tmp_path, no_weight_reads):
    cfg = dataclasses.replace(TINY, depth=0)
    tensors = {**fluxrt.reference.Flux(cfg).state_dict(), "single_blocks.0.linear1.weight": torch.zeros(4)}
    with pytest.raises(CheckpointError, match=r"'single_blocks\.0\.linear1\.weight' has shape \(4,\)"):
        fluxrt.load_transformer(save(tensors, tmp_path / "s.safetensors"))


@pytest.mark.parametrize("key, shape, message", [
    ("transformer_blocks.0.attn.to_k.weight", (128,), r"fused weight do not fit together.*to_k\.weight \(128,\)"),
    ("single_transformer_blocks.0.proj_mlp.weight", (512, 64), r"do not fit together.*proj_mlp\.weight \(512, 64\)"),
    ("norm_out.linear.weight", (255, 128), r"norm_out\.linear\.weight has shape \(255, 128\); .*even number of rows"),
])
def test_diffusers_parts_that_do_not_fuse_are_named(tmp_path, state, no_weight_reads, key, shape, message):
    tensors = {**fluxrt.bfl_to_diffusers(state), key: torch.zeros(shape)}
    with pytest.raises(CheckpointError, match=message):
        fluxrt.load_transformer(save(tensors, tmp_path / "d.safetensors"))


@pytest.mark.parametrize("key, shape", [
    ("encoder.conv_in.weight", (32, 27)),
    ("encoder.conv_in.weight", (0, 3, 3, 3)),
    ("decoder.conv_in.weight", (64 * 16,)),
    ("encoder.down.1.block.0.conv1.weight", (64, 32, 3)),
])
def test_wrong_autoencoder_rank_is_named(tmp_path, ae_state, no_weight_reads, key, shape):
    tensors = {**ae_state, key: torch.zeros(shape)}
    with pytest.raises(CheckpointError, match=rf"autoencoder config: '{key}' has shape \({shape[0]},"):
        fluxrt.load_autoencoder(save(tensors, tmp_path / "ae.safetensors"))


# ---- 6. config.json ----


def diffusers_folder(tmp_path, state, config):
    folder = tmp_path / "transformer"
    folder.mkdir()
    save(fluxrt.bfl_to_diffusers(state), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return folder


def test_broken_config_json_is_named(tmp_path, state):
    folder = diffusers_folder(tmp_path, state, '{"_class_name": "FluxTransformer2DModel",\n')
    with pytest.raises(CheckpointError, match=r"transformer/config\.json is not valid JSON \(Expecting"):
        fluxrt.load_transformer(folder)


@pytest.mark.parametrize("change, message", [
    (dict(axes_dims_rope=5), r"field 'axes_dims_rope' must be a list of positive even ints .*got 5"),
    (dict(attention_head_dim=None), r"field 'attention_head_dim' must be a positive int, got None"),
    (dict(num_attention_heads="2"), r"field 'num_attention_heads' must be a positive int, got '2'"),
    (dict(num_layers=-1), r"field 'num_layers' must be an int >= 0, got -1"),
    (dict(guidance_embeds="yes"), r"field 'guidance_embeds' must be true or false"),
])
def test_wrong_config_json_field_is_named(tmp_path, state, no_weight_reads, change, message):
    folder = diffusers_folder(tmp_path, state, {"_class_name": "FluxTransformer2DModel", **TINY.to_diffusers(),
                                                **change})
    with pytest.raises(CheckpointError, match=r"transformer/config\.json: " + message + ".*pass config="):
        fluxrt.load_transformer(folder)


def test_config_json_that_is_a_list_is_named(tmp_path, state):
    folder = diffusers_folder(tmp_path, state, [TINY.to_diffusers()])
    with pytest.raises(CheckpointError, match=r"config\.json must hold a JSON object of config fields, got a JSON list"):
        fluxrt.load_transformer(folder)


def test_unknown_config_json_field_is_ignored_with_a_warning(tmp_path, state, caplog):
    folder = diffusers_folder(tmp_path, state, {**TINY.to_diffusers(), "rope_scaling": 2})
    with caplog.at_level(logging.WARNING, logger="fluxrt"):
        assert fluxrt.load_transformer(folder).params == TINY
    assert "ignoring config fields fluxrt does not know: ['rope_scaling']" in caplog.text


@pytest.mark.parametrize("config, message", [
    ('{"scaling_factor": 0.3611,', r"config\.json is not valid JSON"),
    ('[1, 2]', r"config\.json must hold a JSON object"),
    ('{"scaling_factor": "0.3611"}', r"config\.json: field 'scaling_factor' must be a number > 0, got '0\.3611'"),
    ('{"scaling_factor": -1}', r"field 'scaling_factor' must be a number > 0"),
    ('{"shift_factor": true}', r"field 'shift_factor' must be a finite number or null"),
    ('{"norm_num_groups": 0}', r"field 'norm_num_groups' must be a positive int, got 0"),
    ('{"_class_name": "FluxTransformer2DModel"}', r"describes a FluxTransformer2DModel, not a AutoencoderKL"),
])
def test_wrong_vae_config_json_is_named(tmp_path, ae_state, no_weight_reads, config, message):
    folder = tmp_path / "vae"
    folder.mkdir()
    save(fluxrt.vae_bfl_to_diffusers(ae_state), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=message):
        fluxrt.load_autoencoder(folder)


def test_vae_config_whose_groups_do_not_divide_the_channels(tmp_path, ae_state, no_weight_reads):
    folder = tmp_path / "vae"
    folder.mkdir()
    save(fluxrt.vae_bfl_to_diffusers(ae_state), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text('{"norm_num_groups": 5}')
    with pytest.raises(CheckpointError, match=r"autoencoder config .* does not build .*divisible"):
        fluxrt.load_autoencoder(folder)


# ---- 7. the transformer and the autoencoder, each where the other is expected; BFL folders ----


def test_bfl_folder_gives_each_loader_its_own_file(tmp_path, state, ae_state):
    save(state, tmp_path / "flux1-tiny.safetensors")
    save(ae_state, tmp_path / "ae.safetensors")
    assert fluxrt.load_transformer(tmp_path, dtype=torch.float32).params == TINY
    ae = fluxrt.load_autoencoder(tmp_path, dtype=torch.float32)
    assert ae.params.ch_mult == SMALL_AE.ch_mult
    assert all(torch.equal(ae.state_dict()[k], v) for k, v in ae_state.items())


def test_bfl_repo_folder_prefers_the_diffusers_subfolders(tmp_path, state, ae_state):
    # BFL's Hugging Face repos hold both: flux1-dev.safetensors + ae.safetensors and transformer/ + vae/
    save(state, tmp_path / "flux1-tiny.safetensors")
    save(ae_state, tmp_path / "ae.safetensors")
    other = dataclasses.replace(TINY, depth=1)
    (tmp_path / "transformer").mkdir()
    save(fluxrt.reference.Flux(other).state_dict(), tmp_path / "transformer" / "model.safetensors")
    assert fluxrt.load_transformer(tmp_path).params == other


def test_transformer_file_given_to_load_autoencoder(tmp_path, state, no_weight_reads):
    for name, tensors in (("flux1-tiny", state), ("diffusers", fluxrt.bfl_to_diffusers(state)),
                          ("comfy", {f"model.diffusion_model.{k}": v for k, v in state.items()})):
        path = save(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointError, match="is a FLUX transformer checkpoint, not an autoencoder; pass "
                                                  "ae.safetensors or the vae/ folder"):
            fluxrt.load_autoencoder(path)


def test_autoencoder_file_given_to_load_transformer(tmp_path, ae_state, no_weight_reads):
    for name, tensors in (("ae", ae_state), ("vae", fluxrt.vae_bfl_to_diffusers(ae_state))):
        path = save(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(CheckpointError, match="is a FLUX autoencoder \\(VAE\\) checkpoint, not a transformer"):
            fluxrt.load_transformer(path)
    (tmp_path / "only-ae").mkdir()
    save(ae_state, tmp_path / "only-ae" / "ae.safetensors")
    with pytest.raises(CheckpointError, match="is a FLUX autoencoder"):
        fluxrt.load_transformer(tmp_path / "only-ae")


# ---- 8. the shard index ----


def sharded_folder(tmp_path, state):
    folder = tmp_path / "t"
    folder.mkdir()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"a.safetensors": keys[:half], "b.safetensors": keys[half:]}
    for name, part in shards.items():
        save({k: state[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    return folder, weight_map


def write_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("outside", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_index_naming_files_outside_the_folder_is_refused(tmp_path, state, outside):
    folder, weight_map = sharded_folder(tmp_path, state)
    save({k: state[k] for k in weight_map if weight_map[k] == "b.safetensors"}, tmp_path / "outside.safetensors")
    outside = str(tmp_path / "outside.safetensors") if outside == "ABSOLUTE" else outside
    write_index(folder, {"weight_map": {k: (outside if v == "b.safetensors" else v) for k, v in weight_map.items()}})
    with pytest.raises(CheckpointError, match="may only name shard files in its own folder"):
        fluxrt.load_transformer(folder)


@pytest.mark.parametrize("index, message", [
    ({"metadata": {}}, 'has no "weight_map" object'),
    ({"weight_map": ["a.safetensors"]}, 'has no "weight_map" object'),
    ([1, 2], 'has no "weight_map" object'),
    ({"weight_map": {"img_in.weight": 3}}, r"maps 'img_in\.weight' to 3, which is not the name of a \.safetensors"),
    ({"weight_map": {"img_in.weight": "a.bin"}}, r"maps 'img_in\.weight' to 'a\.bin'"),
])
def test_malformed_index_is_refused(tmp_path, state, index, message):
    folder, _ = sharded_folder(tmp_path, state)
    write_index(folder, index)
    with pytest.raises(CheckpointError, match=message):
        fluxrt.load_transformer(folder)


def test_index_that_does_not_match_its_shards(tmp_path, state, no_weight_reads):
    folder, weight_map = sharded_folder(tmp_path, state)
    key = next(k for k, v in weight_map.items() if v == "a.safetensors")
    write_index(folder, {"weight_map": {**weight_map, key: "b.safetensors"}})
    with pytest.raises(CheckpointError, match=rf"puts '{key}' in b\.safetensors, but it is in a\.safetensors"):
        fluxrt.load_transformer(folder)
    write_index(folder, {"weight_map": {**weight_map, "double_blocks.7.img_mod.lin.weight": "a.safetensors"}})
    with pytest.raises(CheckpointError, match=r"'double_blocks\.7\.img_mod\.lin\.weight' in a\.safetensors, but no "
                                              r"shard has it"):
        fluxrt.load_transformer(folder)


def test_sharded_folder_with_an_index_and_shards_of_different_dtypes(tmp_path, state):
    folder, weight_map = sharded_folder(tmp_path, state)
    save({k: state[k].to(torch.float64) for k in weight_map if weight_map[k] == "b.safetensors"},
         folder / "b.safetensors")
    write_index(folder, {"weight_map": weight_map})
    loaded = fluxrt.load_transformer(folder, dtype=torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_duplicate_key_across_shards(tmp_path, state):
    folder, _ = sharded_folder(tmp_path, state)
    save({"img_in.weight": state["img_in.weight"]}, folder / "c.safetensors")
    with pytest.raises(CheckpointError, match=r"key 'img_in\.weight' appears in both .*c\.safetensors"):
        fluxrt.load_transformer(folder)


# ---- 9. files that are not checkpoints ----


@pytest.mark.parametrize("loader", [fluxrt.load_transformer, fluxrt.load_autoencoder])
def test_truncated_and_empty_files(tmp_path, state, loader):
    data = save(state, tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors is not a readable safetensors file .*cut short"):
        loader(tmp_path / "cut.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.safetensors is not a readable safetensors file"):
        loader(tmp_path / "empty.safetensors")


@pytest.mark.parametrize("loader", [fluxrt.load_transformer, fluxrt.load_autoencoder])
def test_folder_without_weights(tmp_path, loader):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no weights here")
    with pytest.raises(CheckpointError, match=r"no \.safetensors files in folder .*empty"):
        loader(tmp_path / "empty")


def test_fluxrt_metadata_config_that_is_wrong_is_named(tmp_path, state):
    path = tmp_path / "m.safetensors"
    save_file(dict(state), path, metadata={"fluxrt_config": json.dumps({**dataclasses.asdict(TINY), "qkv_bias": "no"})})
    with pytest.raises(CheckpointError, match=r"fluxrt_config metadata of .*m\.safetensors .*qkv_bias must be True or "
                                              r"False.*pass config="):
        fluxrt.load_transformer(path)
    with safe_open(str(path), "pt") as f:  # the file itself is fine: config= overrides the metadata
        assert f.metadata()["fluxrt_config"]
    assert fluxrt.load_transformer(path, config=TINY).params == TINY
