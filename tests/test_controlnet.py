"""ControlNets under fluxrt.compile: the compiled FluxControlNetModel (InstantX, Union modes, XLabs' hint block) and
FluxMultiControlNetModel match diffusers' outputs; the compiled transformer adds their residuals with diffusers'
rule (interval, controlnet_blocks_repeat, single blocks on the image tokens); bad residuals and ControlNets that
cannot convert are refused, the latter with nothing moved. Tiny fp32 models, plain diffusers against compiled."""

import dataclasses

import pytest
import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel
from diffusers.models.controlnets.controlnet_flux import FluxControlNetOutput, FluxMultiControlNetModel
from test_compile_atomic import assert_as_before, diffusers_inputs, snapshot

import fluxrt
from fluxrt import FluxConfig
from fluxrt.testing import randomize_parameters_, rel_error, sqnr_db

TINY = FluxConfig.preset("tiny")
B, HEIGHT, WIDTH, T = 2, 32, 48, 5
TOKENS = (HEIGHT // 16) * (WIDTH // 16)  # packed latent tokens per image


def transformer(seed=0, depth=TINY.depth, single=TINY.depth_single_blocks) -> FluxTransformer2DModel:
    config = dataclasses.replace(TINY, depth=depth, depth_single_blocks=single).to_diffusers()
    return randomize_parameters_(FluxTransformer2DModel(**config), seed=seed).eval().requires_grad_(False)


def controlnet(seed=1, num_layers=1, num_single_layers=1, **extra) -> FluxControlNetModel:
    """A tiny FluxControlNetModel, every weight random (diffusers zero-initialises the residual layers, which would
    hide any error on their path)."""
    config = {k: v for k, v in TINY.to_diffusers().items() if k != "out_channels"}  # a ControlNet has no output layer
    config.update(num_layers=num_layers, num_single_layers=num_single_layers, **extra)
    model = FluxControlNetModel(**config)
    return randomize_parameters_(model, seed=seed).eval().requires_grad_(False)


def inputs(seed=2) -> dict:
    """diffusers' transformer inputs, as a ControlNet takes them too (without return_dict: tests set it)."""
    x = diffusers_inputs(B, HEIGHT, WIDTH, T, seed)
    del x["return_dict"]
    return x


def control_latents(seed=3) -> torch.Tensor:
    return torch.randn(B, TOKENS, TINY.in_channels, generator=torch.Generator().manual_seed(seed))


def assert_samples_close(got, expected, what):
    assert len(got) == len(expected), f"{what}: {len(got)} samples, diffusers gives {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert rel_error(g, e) <= 1e-5, f"{what}[{i}]: rel error {rel_error(g, e):.2e}"


def random_samples(count, seed, hidden=TINY.hidden_size):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, TOKENS, hidden, generator=gen) for _ in range(count)]


# ---- the compiled ControlNet against diffusers' ----


CONTROLNETS = {
    "instantx": dict(num_layers=2, num_single_layers=1),
    "union": dict(num_layers=1, num_single_layers=2, num_mode=3),
    "double blocks only": dict(num_layers=2, num_single_layers=0),
}


@pytest.mark.parametrize("kind", list(CONTROLNETS))
@torch.no_grad()
def test_controlnet_matches_diffusers(kind):
    model, x = controlnet(**CONTROLNETS[kind]), inputs()
    call = dict(x, controlnet_cond=control_latents(), conditioning_scale=0.7)
    if "num_mode" in CONTROLNETS[kind]:
        call["controlnet_mode"] = torch.tensor([[2], [0]])
    expected = model(**call, return_dict=False)
    fast = fluxrt.compile(model, backend="torch")
    assert isinstance(fast, FluxControlNetModel) and fast.config == model.config  # the pipelines test both
    assert all(p.is_meta for name, p in model.named_parameters() if not name.startswith("controlnet_"))
    got = fast(**call, return_dict=False)
    assert_samples_close(got[0], expected[0], "controlnet_block_samples")
    if expected[1] is None:  # no single blocks: diffusers says None, not an empty list
        assert got[1] is None
    else:
        assert_samples_close(got[1], expected[1], "controlnet_single_block_samples")
    output = fast(**call)  # return_dict=True
    assert isinstance(output, FluxControlNetOutput)
    assert all(torch.equal(a, b) for a, b in zip(output.controlnet_block_samples, got[0]))
    assert fast.plan["last_call"]["joint_attention"] == ["torch"]  # the trunk ran on fluxrt's ops


@torch.no_grad()
def test_union_modes_select_different_residuals_as_in_diffusers():
    model, x = controlnet(num_mode=4), inputs()
    calls = [dict(x, controlnet_cond=control_latents(), controlnet_mode=torch.full((B, 1), mode)) for mode in (0, 3)]
    expected = [model(**call, return_dict=False)[0] for call in calls]
    fast = fluxrt.compile(model, backend="torch")
    got = [fast(**call, return_dict=False)[0] for call in calls]
    for mode, g, e in zip((0, 3), got, expected):
        assert_samples_close(g, e, f"mode {mode}")
    assert rel_error(got[0][0], got[1][0]) > 1e-2  # the mode is really read
    with pytest.raises(ValueError, match="controlnet_mode.*cannot be `None`"):
        fast(**x, controlnet_cond=control_latents())


@torch.no_grad()
def test_xlabs_controlnet_with_a_hint_block_matches_diffusers():
    """XLabs' ControlNets read the control image in pixels through input_hint_block (8x down): an image 8x the
    latent token grid gives one feature per image token."""
    model, x = controlnet(num_layers=2, num_single_layers=0, conditioning_embedding_channels=TINY.in_channels), inputs()
    image = torch.rand(B, 3, 8 * HEIGHT // 16, 8 * WIDTH // 16, generator=torch.Generator().manual_seed(4))
    call = dict(x, controlnet_cond=image, return_dict=False)
    expected = model(**call)
    fast = fluxrt.compile(model, backend="torch")
    assert fast.input_hint_block is model.input_hint_block  # kept as it is: the pipelines test it for XLabs
    got = fast(**call)
    assert_samples_close(got[0], expected[0], "controlnet_block_samples")
    assert got[1] is None and expected[1] is None


@torch.no_grad()
def test_multi_controlnet_matches_diffusers():
    nets = [controlnet(seed=5, num_mode=2), controlnet(seed=6, num_mode=2, num_layers=1, num_single_layers=1)]
    multi, x = FluxMultiControlNetModel(nets), inputs()
    call = dict(x, controlnet_cond=[control_latents(7), control_latents(8)],
                controlnet_mode=[torch.tensor([0, 1]), torch.tensor([1, 1])], conditioning_scale=[0.6, 1.2])
    expected = multi(**call, return_dict=False)
    fast = fluxrt.compile(multi, backend="torch")
    assert fast is multi and isinstance(multi.nets[0], FluxControlNetModel)
    assert all(type(net).__name__ == "FastFluxControlNetModel" for net in multi.nets)
    got = fast(**call, return_dict=False)
    assert_samples_close(got[0], expected[0], "controlnet_block_samples")
    assert_samples_close(got[1], expected[1], "controlnet_single_block_samples")


@torch.no_grad()
def test_a_net_listed_twice_is_compiled_once():
    """Compiling it twice would read the weights the first compile moved out (meta tensors)."""
    net, x = controlnet(seed=23), inputs()
    multi = FluxMultiControlNetModel([net, controlnet(seed=24), net])
    call = dict(x, controlnet_cond=[control_latents(7), control_latents(8), control_latents(9)],
                controlnet_mode=[torch.tensor([0, 0])] * 3, conditioning_scale=[1.0, 0.5, 2.0])
    expected = multi(**call, return_dict=False)
    fluxrt.compile(multi, backend="torch")
    assert multi.nets[0] is multi.nets[2] and multi.nets[0] is not multi.nets[1]
    got = multi(**call, return_dict=False)
    assert_samples_close(got[0], expected[0], "controlnet_block_samples")


@torch.no_grad()
def test_one_union_net_with_several_conditions_matches_diffusers():
    """A FluxMultiControlNetModel of one Union net runs it once per condition and sums (diffusers' memory saver)."""
    multi, x = FluxMultiControlNetModel([controlnet(seed=9, num_mode=3)]), inputs()
    call = dict(x, controlnet_cond=[control_latents(10), control_latents(11)],
                controlnet_mode=[torch.tensor([0, 0]), torch.tensor([2, 2])], conditioning_scale=[1.0, 0.5])
    expected = multi(**call, return_dict=False)
    got = fluxrt.compile(multi, backend="torch")(**call, return_dict=False)
    assert_samples_close(got[0], expected[0], "controlnet_block_samples")
    assert_samples_close(got[1], expected[1], "controlnet_single_block_samples")


# ---- the compiled transformer adds the residuals as diffusers does ----


RESIDUALS = {  # (double samples, single samples, controlnet_blocks_repeat) over 3 double and 3 single blocks
    "interval 2: samples 0, 0, 1": (2, 2, False),
    "repeat: samples 0, 1, 0": (2, None, True),
    "one per block": (3, 3, False),
    "more samples than blocks": (4, 5, False),
    "single blocks only": (None, 1, False),
}


@pytest.mark.parametrize("case", list(RESIDUALS))
@torch.no_grad()
def test_transformer_adds_controlnet_residuals_as_diffusers(case):
    doubles, singles, repeat = RESIDUALS[case]
    model, x = transformer(depth=3, single=3), inputs()
    call = dict(x, controlnet_block_samples=random_samples(doubles, 20) if doubles else None,
                controlnet_single_block_samples=random_samples(singles, 21) if singles else None,
                controlnet_blocks_repeat=repeat, return_dict=False)
    expected = model(**call)[0]
    without = model(**x, return_dict=False)[0]
    keys = ("controlnet_block_samples", "controlnet_single_block_samples")
    given = [s.clone() for key in keys for s in call[key] or ()]
    fast = fluxrt.compile(model, backend="torch")
    got = fast(**call)[0]
    assert rel_error(got, expected) <= 1e-5, f"rel error {rel_error(got, expected):.2e}"
    assert rel_error(without, expected) > 1e-2  # the residuals matter
    after = [s for key in keys for s in call[key] or ()]
    assert all(torch.equal(a, b) for a, b in zip(after, given))  # added to the stream, the samples left as given


@torch.no_grad()
def test_compiled_controlnet_drives_the_compiled_transformer_as_in_diffusers():
    net, model, x = controlnet(num_layers=2, num_single_layers=1, num_mode=2), transformer(), inputs()
    call = dict(x, controlnet_cond=control_latents(), controlnet_mode=torch.tensor([[1], [1]]), return_dict=False)
    samples = net(**call)
    expected = model(**x, controlnet_block_samples=samples[0], controlnet_single_block_samples=samples[1],
                     return_dict=False)[0]
    fast_net, fast = fluxrt.compile(net, backend="torch"), fluxrt.compile(model, backend="torch")
    samples = fast_net(**call)
    got = fast(**x, controlnet_block_samples=samples[0], controlnet_single_block_samples=samples[1]).sample
    assert rel_error(got, expected) <= 1e-5


HIDDEN = TINY.hidden_size
BAD_RESIDUALS = [
    (dict(controlnet_block_samples=[]), r"controlnet_block_samples must be a non-empty list.*\(empty\)"),
    (dict(controlnet_single_block_samples=torch.zeros(B, TOKENS, HIDDEN)),
     "controlnet_single_block_samples must be a non-empty list of tensors.*got Tensor"),
    (dict(controlnet_block_samples=[torch.zeros(B, TOKENS + 1, HIDDEN)]),
     rf"controlnet_block_samples\[0\] must be the image tokens' shape \[B, L, hidden\] = \[{B}, {TOKENS}, {HIDDEN}\], "
     rf"got \({B}, {TOKENS + 1}, {HIDDEN}\)"),
    (dict(controlnet_single_block_samples=[torch.zeros(B, TOKENS, HIDDEN), "x"]),
     r"controlnet_single_block_samples\[1\] must be .*got str"),
    (dict(controlnet_block_samples=[torch.zeros(B, TOKENS, HIDDEN, dtype=torch.float64)]),
     r"controlnet_block_samples\[0\] is torch.float64 on cpu; the transformer runs torch.float32"),
    (dict(controlnet_block_samples=[torch.zeros(B, TOKENS, HIDDEN)], controlnet_blocks_repeat=1),
     "controlnet_blocks_repeat must be True or False"),
]


@pytest.mark.parametrize("bad, match", BAD_RESIDUALS)
@torch.no_grad()
def test_bad_residuals_are_refused_clearly(bad, match):
    fast, x = fluxrt.compile(transformer(), backend="torch"), inputs()
    with pytest.raises(ValueError, match=match):
        fast(**x, **bad)


# ---- refusals: nothing moves ----


@torch.no_grad()
def test_controlnet_with_an_extra_parameter_is_refused_untouched():
    model, x = controlnet(), inputs()
    model.transformer_blocks[0].attn.register_parameter("extra", torch.nn.Parameter(torch.randn(8)))
    call = dict(x, controlnet_cond=control_latents(), return_dict=False)
    before, expected = snapshot(model), model(**call)
    with pytest.raises(fluxrt.CheckpointError, match=r"FluxControlNetModel.*transformer_blocks\.0\.attn\.extra"):
        fluxrt.compile(model, backend="torch")
    assert_as_before(model, before)
    assert all(torch.equal(a, b) for a, b in zip(model(**call)[0], expected[0]))


@torch.no_grad()
def test_multi_controlnet_whose_second_net_fails_keeps_the_first():
    first, second = controlnet(seed=12), controlnet(seed=13)
    second.controlnet_blocks[0].double()  # mixed dtypes
    multi = FluxMultiControlNetModel([first, second])
    before = snapshot(multi)
    with pytest.raises(fluxrt.CheckpointError, match="FluxControlNetModel mixes parameter dtypes"):
        fluxrt.compile(multi, backend="torch")
    assert_as_before(multi, before)
    assert multi.nets[0] is first and multi.nets[1] is second


def test_compiled_and_consumed_controlnets_and_graph_requests_are_refused():
    model = controlnet(seed=14)
    before = snapshot(model)
    with pytest.raises(ValueError, match="cuda_graphs=True applies to the transformer"):
        fluxrt.compile(model, cuda_graphs=True)
    assert_as_before(model, before)
    fast = fluxrt.compile(model, backend="torch")
    with pytest.raises(TypeError, match="the ControlNet is already compiled by fluxrt"):
        fluxrt.compile(fast)
    with pytest.raises(TypeError, match="the ControlNet is already compiled by fluxrt"):
        fluxrt.compile(FluxMultiControlNetModel([fast]))
    with pytest.raises(fluxrt.CheckpointError, match="an earlier fluxrt.compile consumed it"):
        fluxrt.compile(model)


def test_a_controlnet_config_that_is_not_flux_is_refused():
    model = controlnet(seed=15)
    model.register_to_config(patch_size=2)
    before = snapshot(model)
    with pytest.raises(fluxrt.CheckpointError, match="not a FLUX.1 ControlNet's: field 'patch_size' is 2"):
        fluxrt.compile(model)
    assert_as_before(model, before)


@torch.no_grad()
def test_a_compiled_controlnet_under_per_layer_offload_is_refused_at_the_call_never_nan():
    """accelerate's per-layer offload (enable_sequential_cpu_offload) leaves weights on the meta device outside each
    layer's own forward; the compiled ControlNet reads its blocks' weights directly, so it must refuse."""
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    fast, x = fluxrt.compile(controlnet(seed=16), backend="torch"), inputs()
    call = dict(x, controlnet_cond=control_latents(), return_dict=False)
    expected = fast(**call)
    cpu_offload(fast, execution_device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="weights are on the meta device.*sequential CPU offload"):
        fast(**call)
    remove_hook_from_module(fast, recurse=True)
    assert all(torch.equal(a, b) for a, b in zip(fast(**call)[0], expected[0]))


# ---- compile's options reach the ControlNet ----


OPTIONS = {  # compile option -> what the plan says and the op the call must run
    "quantize": (dict(quantize="fp8-weight"), "linears", "fp8 weight-only", "fp8_linear"),
    "attention": (dict(attention="fp8"), "attention", "fp8 (e4m3 q, k, v", "joint_attention_fp8"),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@torch.no_grad()
def test_quantize_and_fp8_attention_apply_to_the_controlnet_trunk(option):
    options, plan_key, planned, op = OPTIONS[option]
    model, x = controlnet(seed=17, num_layers=2, num_single_layers=1), inputs()
    call = dict(x, controlnet_cond=control_latents(), return_dict=False)
    expected = model(**call)
    fast = fluxrt.compile(model, backend="torch", **options)
    assert planned in fast.plan[plan_key]
    got = fast(**call)
    assert fast.plan["last_call"][op] == ["torch"]
    for g, e in zip(got[0] + got[1], expected[0] + expected[1]):
        assert sqnr_db(g, e) >= 20, f"SQNR {sqnr_db(g, e):.1f} dB"


@pytest.mark.gpu
@torch.no_grad()
def test_residual_calls_bypass_cuda_graphs_and_match_diffusers():
    """A call with ControlNet residuals runs eagerly (graphs are keyed on tensor inputs only); calls without them
    still replay graphs."""
    model, x = transformer(seed=19, depth=3, single=3).cuda(), {k: v.cuda() for k, v in inputs().items()}
    samples = [s.cuda() for s in random_samples(2, 22)]
    call = dict(x, controlnet_block_samples=samples, controlnet_single_block_samples=samples, return_dict=False)
    expected, plain = model(**call)[0], model(**x, return_dict=False)[0]
    fast = fluxrt.compile(model, backend="torch", cuda_graphs=True)
    for _ in range(2):
        torch.testing.assert_close(fast(**call)[0], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast(**x, return_dict=False)[0], plain, rtol=1e-4, atol=1e-4)
    assert len(fast.fast.graphs.graphs) == 1  # only the call without residuals was captured
