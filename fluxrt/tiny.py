"""Tiny, randomly initialised FLUX.1 components built offline: the `--model tiny-random` default of the CLI (and one
model per tool mode: tiny-random-fill, -canny, -kontext, TINY_RANDOM_MODELS) and the building blocks of the tests'
diffusers pipeline (tests/tiny_pipeline.py).

Every text component is the genuine class FLUX.1 uses (``CLIPTokenizer`` + ``CLIPTextModel``, ``T5TokenizerFast`` +
``T5EncoderModel``), only tiny:

* the T5 tokenizer is a SentencePiece unigram model trained on the spot on ``CORPUS`` below;
* the CLIP tokenizer is a byte-level BPE whose ``vocab.json``/``merges.txt`` are written on the spot, laid out like the
  real one (256 byte symbols, the same 256 with ``</w>``, a few merges, then ``<|startoftext|>``, ``<|endoftext|>``);
* the encoders have two layers; their widths are the transformer's ``vec_in_dim`` (CLIP) and ``context_in_dim`` (T5).

Weights are deterministic in ``seed``; nothing touches the network.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import string
import tempfile

import sentencepiece as spm
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from .config import FluxConfig
from .devices import resolve_device, resolve_dtype
from .loading import MODE_IN_CHANNELS, MODES
from .reference import AutoEncoder, AutoEncoderParams, Flux
from .testing import randomize_parameters_
from .validation import check_flag, check_pipeline_options

# Image-caption-like sentences: the SentencePiece training text. Fixed, so the tokenizer is the same every run.
CORPUS = (
    "a red apple on a wooden table",
    "a photo of a cat sitting on a windowsill in the morning light",
    "a dog running across a green field under a blue sky",
    "an astronaut riding a horse on the surface of the moon",
    "a bowl of fresh fruit with oranges, bananas and grapes",
    "a portrait of an old man with a long white beard",
    "a small house by the lake surrounded by tall pine trees",
    "a city street at night with neon signs and wet pavement",
    "a cup of hot coffee next to an open book",
    "a mountain covered in snow at sunset",
    "two children playing with a ball on the beach",
    "a vintage car parked in front of a brick wall",
    "a watercolor painting of flowers in a glass vase",
    "a close up of a butterfly resting on a yellow flower",
    "a sailing boat on a calm sea at dawn",
    "a bicycle leaning against a fence in the countryside",
    "a plate of pasta with tomato sauce and basil",
    "a black and white photograph of a train station",
    "a robot reading a newspaper in a cafe",
    "a forest path covered with autumn leaves",
    "a lighthouse on a rocky coast during a storm",
    "a group of people walking through a busy market",
    "a sign that says hello world in bold letters",
    "a digital illustration of a dragon flying over a castle",
    "an owl perched on a branch under the full moon",
    "a modern kitchen with white cabinets and a marble counter",
    "a girl holding a red umbrella in the rain",
    "a bridge over a river in an old european town",
    "a desert landscape with cactus plants and a clear sky",
    "a plate of sushi on a dark slate board",
    "a fox sleeping in the snow",
    "a colorful hot air balloon floating above the hills",
    "a pair of running shoes on a gray floor",
    "a cozy living room with a fireplace and a sofa",
    "a teddy bear sitting on a bed next to a pillow",
    "a waterfall in a tropical jungle with green ferns",
    "a chess board with wooden pieces in the middle of a game",
    "an oil painting of a ship in a harbor at sunset",
    "a loaf of bread and a knife on a cutting board",
    "a horse standing in a meadow with wild flowers",
    "a skyscraper reflecting the clouds on its glass windows",
    "a young woman smiling at the camera, studio lighting",
    "a tiger walking through tall grass, highly detailed",
    "a snowy village with warm lights in the windows",
    "a bird eye view of a farm with square fields",
    "a glass of orange juice on a breakfast table",
    "a cartoon of a happy frog wearing a tiny hat",
    "a blue door in a white stone wall with a potted plant",
)

# Characters the SentencePiece model must have pieces for even though CORPUS (lowercase) lacks most of them.
REQUIRED_CHARS = string.ascii_letters + string.digits + string.punctuation

# CLIP-style BPE merges over the 26 lowercase letters; every merged symbol is built from symbols already present.
CLIP_MERGES = (
    "t h", "th e</w>", "a n", "i n", "o n</w>", "e r", "r e", "o f</w>", "h e</w>", "in g</w>",
    "a t</w>", "e n", "o r", "e s</w>", "a r", "e d</w>", "t o</w>", "i s</w>", "l e", "s t",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_t5_tokenizer(folder: pathlib.Path, vocab_size: int = 256) -> T5TokenizerFast:
    """Train a tiny unigram SentencePiece model on ``CORPUS`` (T5 special-token ids) and wrap it as T5TokenizerFast."""
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        required_chars=REQUIRED_CHARS,  # so capitals, digits and punctuation outside CORPUS are not <unk>
        hard_vocab_limit=False,  # the corpus is tiny: let the trainer stop short of vocab_size if it must
        num_threads=1,  # deterministic
        shuffle_input_sentence=False,
        minloglevel=2,  # quiet
    )
    spm_file = folder / "spiece.model"
    spm_file.write_bytes(model.getvalue())
    # from_pretrained on a folder holding only spiece.model converts it to the fast (tokenizers) backend; in
    # transformers 5 calling T5TokenizerFast(vocab_file=...) directly ignores the file and builds an empty vocab.
    tokenizer = T5TokenizerFast.from_pretrained(str(folder), model_max_length=512)
    assert len(tokenizer) > 100 + 50, f"SentencePiece conversion failed: only {len(tokenizer)} tokens"
    return tokenizer


def build_clip_tokenizer(folder: pathlib.Path) -> CLIPTokenizer:
    """Write a tiny CLIP byte-level BPE vocabulary (vocab.json, merges.txt) and wrap it as CLIPTokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]  # any byte, inside or at the end of a word: nothing is unknown
    for merge in CLIP_MERGES:
        a, b = merge.split()
        assert a in tokens and b in tokens, merge
        tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last two ids, as in the real CLIP vocabulary (49406, 49407)
    assert len(set(tokens)) == len(tokens)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(CLIP_MERGES) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    assert len(tokenizer) == len(tokens), (len(tokenizer), len(tokens))
    return tokenizer


def build_clip_encoder(tokenizer: CLIPTokenizer, width: int = 32, seed: int = 0) -> CLIPTextModel:
    """A two-layer CLIPTextModel whose pooler_output has `width` features (the transformer's vec_in_dim)."""
    torch.manual_seed(seed)
    model = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=width,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            projection_dim=32,
            # pooler_output is read at the first eos_token_id in input_ids (eos_token_id == 2 would select the
            # legacy argmax path instead, which is also right here since <|endoftext|> is the highest id).
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return model.eval().requires_grad_(False)


def build_t5_encoder(tokenizer: T5TokenizerFast, width: int = 64, seed: int = 1) -> T5EncoderModel:
    """A two-layer T5 v1.1-style encoder whose last_hidden_state has `width` features (the transformer's
    context_in_dim)."""
    torch.manual_seed(seed)
    model = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_ff=96,
            d_kv=16,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",  # T5 v1.1 / the FLUX T5-XXL
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    return model.eval().requires_grad_(False)


# The embedded trained model (python -m fluxrt.train_tiny): a diffusers-layout folder shipped in the package.
TRAINED = pathlib.Path(__file__).resolve().parent / "weights" / "tiny"

# FLUX's autoencoder structure (4 levels so 8x down, z 16, one mid attention, GroupNorm(32)) at small widths: the
# smallest channel count GroupNorm(32) allows is 32.
TINY_AUTOENCODER = AutoEncoderParams(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


# The CLI's offline models: --model NAME -> the mode of its tiny random transformer (fluxrt.loading.MODES).
TINY_RANDOM_MODELS = {"tiny-random": "text-to-image", "tiny-random-fill": "fill", "tiny-random-canny": "control",
                      "tiny-random-kontext": "kontext"}


def tiny_config(mode: str = "text-to-image", full_width: bool = False) -> FluxConfig:
    """The transformer config of a random model of `mode`: the "tiny" preset (flux-dev's with full_width) with the
    mode's input channels (Fill 384, Canny/Depth 128, text-to-image and Kontext 64; 64 output channels always)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    cfg = FluxConfig.preset("flux-dev" if full_width else "tiny")
    return dataclasses.replace(cfg, in_channels=MODE_IN_CHANNELS[mode], out_channels=64)


def tiny_random_components(mode: str = "text-to-image", device: torch.device | str | None = None,
                           full_width: bool | None = None, seed: int = 0) -> dict:
    """FluxPipeline's components for a random model of `mode`: transformer (tiny_config(mode)), autoencoder, the
    two tokenizers and text encoders, as FluxPipeline's keyword arguments. Widths and seeds: tiny_random_pipeline."""
    device = resolve_device(device)
    full_width = device.type == "cuda" if full_width is None else check_flag(full_width, "full_width")
    dtype = resolve_dtype(None, device)
    cfg = tiny_config(mode, full_width)
    ae_params = AutoEncoderParams() if full_width else TINY_AUTOENCODER
    with tempfile.TemporaryDirectory(prefix="fluxrt-tiny-") as folder:  # tokenizers load into memory
        clip_tokenizer = build_clip_tokenizer(pathlib.Path(folder) / "clip")
        t5_tokenizer = build_t5_tokenizer(pathlib.Path(folder) / "t5")
    clip = build_clip_encoder(clip_tokenizer, width=cfg.vec_in_dim, seed=seed).to(device, dtype)
    t5 = build_t5_encoder(t5_tokenizer, width=cfg.context_in_dim, seed=seed + 1).to(device, dtype)
    with torch.device("meta"):  # no fp32 init of 12B weights: allocate in place on the device, then fill
        transformer = Flux(cfg)
    transformer = randomize_parameters_(transformer.to(dtype).to_empty(device=device), seed + 3)
    # PyTorch's default init (fan-in scaled for the 3x3 convs, unlike randomize_parameters_): images with a range
    # of pixel values rather than mostly saturated ones. 84M parameters at full width: a second on the CPU.
    torch.manual_seed(seed + 2)
    autoencoder = AutoEncoder(ae_params).to(device, dtype)
    return dict(transformer=transformer.eval().requires_grad_(False),
                autoencoder=autoencoder.eval().requires_grad_(False), clip_tokenizer=clip_tokenizer, clip_encoder=clip,
                t5_tokenizer=t5_tokenizer, t5_encoder=t5)


def tiny_random_pipeline(device: torch.device | str | None = None, full_width: bool | None = None, seed: int = 0, *,
                         mode: str = "text-to-image", compile: bool | None = None, quantize: str | None = None,
                         backend: str = "auto", offload_text_encoders: bool = False, progress: bool = True):
    """The `--model tiny-random` pipeline (tiny-random-fill, -canny, -kontext: TINY_RANDOM_MODELS): real tokenizer
    and encoder classes, random weights, built in process.

    mode: the model's kind (fluxrt.loading.MODES); Fill and Canny/Depth are told by their input channels, Kontext
    (dev's shapes) is named to the pipeline. full_width (default: on a CUDA device) gives the transformer and
    autoencoder flux-dev's real widths (12B parameters, 24 GB in bf16, filled in place on the device) so the latency
    it shows is FLUX's; otherwise the "tiny" preset and TINY_AUTOENCODER (milliseconds per step on a CPU). The text
    encoders stay tiny either way. compile, quantize, backend, offload_text_encoders, progress: as FluxPipeline's,
    checked before anything is built.
    """
    from .pipeline import FluxPipeline

    tiny_config(mode)  # an unknown mode is refused before anything is built
    check_pipeline_options(resolve_device(device), compile, quantize, backend, offload_text_encoders, progress)
    components = tiny_random_components(mode, device, full_width, seed)
    told = {"mode": mode} if mode == "kontext" else {}  # the one mode the transformer's shapes do not tell
    return FluxPipeline(**components, compile=compile, quantize=quantize, backend=backend,
                        offload_text_encoders=offload_text_encoders, progress=progress, **told)
