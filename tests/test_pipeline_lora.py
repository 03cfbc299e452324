"""fluxrt.FluxPipeline's LoRA API (load_lora / set_lora_scales / unload_lora) and the CLI's --lora, on the tiny
random-weight pipeline with real LoRA safetensors files (BFL/ComfyUI naming; every format is tests/test_lora.py's)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fluxrt
from fluxrt.tiny import tiny_random_pipeline

CALL = dict(width=32, height=32, num_steps=2, seed=1, output_type="pt")
PROMPT = "a red circle"


def write_lora(path, seed: int, rank: int = 4) -> str:
    """A LoRA on the first double block's image qkv and the first single block's linear2, in BFL/ComfyUI naming."""
    gen = torch.Generator().manual_seed(seed)
    hidden = fluxrt.FluxConfig.preset("tiny").hidden_size
    mlp = 4 * hidden
    shapes = {"double_blocks.0.img_attn.qkv": (3 * hidden, hidden), "single_blocks.0.linear2": (hidden, hidden + mlp)}
    tensors = {}
    for module, (rows, cols) in shapes.items():
        tensors[f"diffusion_model.{module}.lora_A.weight"] = torch.randn(rank, cols, generator=gen) * 0.3
        tensors[f"diffusion_model.{module}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * 0.3
    save_file(tensors, path)
    return str(path)


@pytest.fixture
def pipe():
    return tiny_random_pipeline(device="cpu", compile=False, progress=False)


def weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def assert_weights_equal(pipe, expected):
    got = pipe.transformer.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


@torch.no_grad()
def test_a_lora_changes_the_image_and_unloading_restores_it_bit_for_bit(pipe, tmp_path):
    base_weights, base = weights(pipe), pipe(PROMPT, **CALL)
    name = pipe.load_lora(write_lora(tmp_path / "style.safetensors", seed=0), scale=0.8)
    assert name == "style" and pipe.loras == {"style": 0.8}
    styled = pipe(PROMPT, **CALL)
    assert (styled - base).abs().max() > 1e-3
    pipe.unload_lora("style")
    assert pipe.loras == {}
    assert_weights_equal(pipe, base_weights)
    torch.testing.assert_close(pipe(PROMPT, **CALL), base, rtol=0, atol=0)


@torch.no_grad()
def test_a_new_scale_gives_what_loading_at_that_scale_gives(pipe, tmp_path):
    first, second = write_lora(tmp_path / "a.safetensors", seed=0), write_lora(tmp_path / "b.safetensors", seed=1)
    pipe.load_lora(first, scale=0.3)
    pipe.load_lora(second, scale=1.0)
    pipe.set_lora_scales({"a": 0.9})
    assert pipe.loras == {"a": 0.9, "b": 1.0}
    rescaled = weights(pipe)
    pipe.unload_lora()
    pipe.load_lora(first, scale=0.9)
    pipe.load_lora(second, scale=1.0)
    assert_weights_equal(pipe, rescaled)


@torch.no_grad()
def test_the_compiled_transformer_runs_the_lora(tmp_path):
    plain = tiny_random_pipeline(device="cpu", compile=False, progress=False)
    compiled = tiny_random_pipeline(device="cpu", compile=True, backend="torch", progress=False)
    path = write_lora(tmp_path / "style.safetensors", seed=0)
    for pipe in (plain, compiled):
        pipe.load_lora(path, scale=0.8)
    torch.testing.assert_close(compiled(PROMPT, **CALL), plain(PROMPT, **CALL), rtol=0, atol=1e-5)


@pytest.mark.parametrize("call, error, message", [
    (lambda p, f: p.load_lora(f, scale=float("nan")), ValueError, "scale must be a finite number"),
    (lambda p, f: p.load_lora(f, name=""), TypeError, "name must be a non-empty string"),
    (lambda p, f: (p.load_lora(f), p.load_lora(f)), ValueError, "a LoRA named 'style' is loaded already"),
    (lambda p, f: p.set_lora_scales({"other": 1.0}), KeyError, "no LoRA named 'other' is loaded"),
    (lambda p, f: p.unload_lora("other"), KeyError, "no LoRA named 'other' is loaded"),
    (lambda p, f: p.load_lora(f.replace("style", "missing")), fluxrt.CheckpointError, "missing"),
])
def test_bad_lora_calls_change_no_weight(pipe, tmp_path, call, error, message):
    path = write_lora(tmp_path / "style.safetensors", seed=0)
    before = weights(pipe)
    with pytest.raises(error, match=message):
        call(pipe, path)
    if pipe.loras:  # the duplicate case: the first load stands, the second changed nothing
        pipe.unload_lora()
    assert_weights_equal(pipe, before)


def test_a_lora_that_does_not_fit_the_model_is_refused_before_any_weight_changes(pipe, tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.ones(2, 7),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.ones(5, 2)}, path)
    before = weights(pipe)
    with pytest.raises(fluxrt.CheckpointError):
        pipe.load_lora(path)
    assert pipe.loras == {}
    assert_weights_equal(pipe, before)


def test_cli_lora_flag_applies_the_lora_and_checks_its_argument(tmp_path, capsys):
    from PIL import Image

    from fluxrt.cli import main

    path = write_lora(tmp_path / "style.safetensors", seed=0)
    small = ["generate", "--model", "tiny-random", "--device", "cpu", "--width", "32", "--height", "32", "--steps",
             "2", "--no-progress", "--no-compile"]
    outputs = {}
    for label, extra in (("plain", []), ("lora", ["--lora", f"{path}:0.8"]), ("twice", ["--lora", f"{path}:0.4",
                                                                                      "--lora", f"{path}:0.4"])):
        out = tmp_path / f"{label}.png"
        assert main(small + extra + ["--out", str(out)]) == 0, capsys.readouterr().err
        outputs[label] = torch.from_numpy(np.asarray(Image.open(out).convert("RGB"))).to(torch.int16)
    assert (outputs["lora"] - outputs["plain"]).abs().max() > 2  # the LoRA changed the picture
    assert (outputs["twice"] - outputs["lora"]).abs().max() <= 1  # 0.4 + 0.4 is 0.8, up to rounding
    capsys.readouterr()
    assert main(small + ["--lora", f"{path}:nan", "--out", str(tmp_path / "x.png")]) == 2
    assert "the scale after ':' must be a finite number" in capsys.readouterr().err
    assert main(small + ["--lora", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ---- hot-swap mode: LoRAs as side branches of the compiled transformer ----


def compiled_pipe(**kwargs):
    return tiny_random_pipeline(device="cpu", compile=True, backend="torch", progress=False, **kwargs)


@pytest.fixture
def hot():
    pipe = compiled_pipe()
    pipe.enable_lora_hotswap(max_rank=16, max_adapters=3)
    return pipe


@torch.no_grad()
def test_hot_swapped_loras_draw_what_fused_loras_draw(hot, tmp_path):
    a, b = write_lora(tmp_path / "a.safetensors", seed=0), write_lora(tmp_path / "b.safetensors", seed=1, rank=2)
    fused = compiled_pipe()
    base = hot(PROMPT, **CALL)
    for pipe in (hot, fused):
        pipe.load_lora(a, scale=0.8)
        pipe.load_lora(b, scale=-0.5)
    assert hot.lora_hotswap and not fused.lora_hotswap
    assert (hot(PROMPT, **CALL) - base).abs().max() > 0.02, "the LoRAs must change the image"
    torch.testing.assert_close(hot(PROMPT, **CALL), fused(PROMPT, **CALL), rtol=0, atol=1e-5)
    for pipe in (hot, fused):
        pipe.set_lora_scales({"a": 0.3})
        pipe.unload_lora("b")
    torch.testing.assert_close(hot(PROMPT, **CALL), fused(PROMPT, **CALL), rtol=0, atol=1e-5)
    assert hot.loras == fused.loras == {"a": 0.3}
    hot.unload_lora()
    assert torch.equal(hot(PROMPT, **CALL), base), "unloading every LoRA must give back the image without them"


@torch.no_grad()
def test_each_prompt_may_run_its_own_loras_in_one_call(hot, tmp_path):
    hot.load_lora(write_lora(tmp_path / "a.safetensors", seed=0))
    hot.load_lora(write_lora(tmp_path / "b.safetensors", seed=1))
    prompts = ["a red circle", "a blue star", "a green square"]
    choices = [{"a": 0.7}, {"b": 1.2}, None]  # None: the loaded scales (a 1.0, b 1.0)
    together = hot(prompts, **CALL, loras=choices)
    for k, (prompt, choice) in enumerate(zip(prompts, choices)):
        seed = CALL["seed"] + k
        alone = hot(prompt, **{**CALL, "seed": seed}, loras=choice)
        torch.testing.assert_close(together[k : k + 1], alone, rtol=0, atol=1e-5)
    off = hot(prompts[0], **CALL, loras={})
    assert (together[0:1] - off).abs().max() > 0.02, "loras={} must turn the LoRAs off for that call"
    assert hot.loras == {"a": 1.0, "b": 1.0}, "a call's choice must not change the loaded scales"


@torch.no_grad()
def test_an_fp8_pipeline_runs_loras_as_side_branches(tmp_path):
    pipe = compiled_pipe(quantize="fp8-weight")
    base = pipe(PROMPT, **CALL)
    pipe.load_lora(write_lora(tmp_path / "style.safetensors", seed=0), scale=0.8)
    assert pipe.lora_hotswap, "FP8 weights take no fused LoRA: the pipeline must switch to side branches"
    assert (pipe(PROMPT, **CALL) - base).abs().max() > 0.02
    pipe.unload_lora()
    assert torch.equal(pipe(PROMPT, **CALL), base)


def test_hot_swap_misuse_gets_one_clear_error(pipe, hot, tmp_path):
    path = write_lora(tmp_path / "style.safetensors", seed=0)
    with pytest.raises(RuntimeError, match="compile=True"):
        pipe.enable_lora_hotswap()
    pipe.load_lora(path)
    with pytest.raises(ValueError, match="needs hot-swap mode"):
        pipe(PROMPT, **CALL, loras={"style": 1.0})
    fused = compiled_pipe()
    fused.load_lora(path)
    with pytest.raises(RuntimeError, match="fused into the weights already"):
        fused.enable_lora_hotswap()
    hot.load_lora(path)
    for loras, error, message in (({"other": 1.0}, KeyError, "no LoRA named 'other'"),
                                  ({"style": float("inf")}, ValueError, "must be a finite number"),
                                  ([{"style": 1.0}] * 2, TypeError, "a list of 1 of them"),
                                  ("style", TypeError, "loras must be a dict")):
        with pytest.raises(error, match=message):
            hot(PROMPT, **CALL, loras=loras)


@torch.no_grad()
def test_serving_batches_requests_with_different_loras_together(hot, tmp_path):
    from fluxrt import GenerationRequest

    hot.load_lora(write_lora(tmp_path / "a.safetensors", seed=0))
    hot.load_lora(write_lora(tmp_path / "b.safetensors", seed=1))
    small = dict(width=32, height=32, num_steps=2)
    requests = [GenerationRequest("a red circle", seed=1, loras={"a": 0.9}, **small),
                GenerationRequest("a blue star", seed=2, loras={"b": 1.0, "a": 0.2}, **small),
                GenerationRequest("a cat", seed=3, **small),
                GenerationRequest("a dog", seed=4, loras={"c": 1.0}, **small)]
    sizes = []
    hook = hot.transformer.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["img"].shape[0]),
                                                     with_kwargs=True)
    try:
        results = hot.generate(requests)
    finally:
        hook.remove()
    assert sizes == [3, 3], "requests with different LoRAs must share one batch"
    for result in results[:3]:
        r = result.request
        alone = hot(r.prompt, width=32, height=32, num_steps=2, seed=r.seed, loras=r.loras)[0]
        assert result.ok, result.error
        # batched vs alone differs only in summation order: at most one level at a rounding edge
        assert np.abs(np.asarray(result.image, dtype=int) - np.asarray(alone, dtype=int)).max() <= 1
    assert "no LoRA named 'c'" in results[3].error


def test_cli_lora_on_an_fp8_checkpoint_runs_beside_its_weights(tmp_path, capsys):
    """An FP8 transformer file (fluxrt.quantize.save_transformer) takes --lora as a side branch of the compiled
    transformer: the image changes, and it is what the Python API draws with the same LoRA."""
    from PIL import Image

    from fluxrt.cli import main
    from fluxrt.quantize import quantize, save_transformer

    tiny = fluxrt.tiny.TRAINED
    model = fluxrt.load_transformer(tiny / "transformer", dtype=torch.float32)
    quantize(model)
    save_transformer(model, tmp_path / "fp8.safetensors")
    lora = write_lora(tmp_path / "style.safetensors", seed=0)
    files = ["--model", str(tmp_path / "fp8.safetensors"), "--ae", str(tiny / "vae"), "--text-encoders", str(tiny)]
    small = ["generate", *files, "--device", "cpu", "--backend", "torch", "--width", "32", "--height", "32",
             "--steps", "2", "--no-progress", "--prompt", PROMPT]
    images = {}
    for label, extra in (("plain", []), ("lora", ["--lora", f"{lora}:0.8"])):
        out = tmp_path / f"{label}.png"
        assert main(small + extra + ["--out", str(out)]) == 0, capsys.readouterr().err
        images[label] = np.asarray(Image.open(out).convert("RGB"), dtype=int)
    assert np.abs(images["lora"] - images["plain"]).max() > 2, "the LoRA must change the picture"
    pipe = fluxrt.FluxPipeline.from_pretrained(tmp_path / "fp8.safetensors", autoencoder=tiny / "vae",
                                               text_encoders=tiny, device="cpu", compile=True, backend="torch",
                                               progress=False)
    pipe.load_lora(lora, scale=0.8)
    assert pipe.lora_hotswap
    expected = np.asarray(pipe(PROMPT, width=32, height=32, num_steps=2, seed=0)[0], dtype=int)
    assert np.abs(images["lora"] - expected).max() <= 1
