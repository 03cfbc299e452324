"""fluxrt command line.

  fluxrt generate [--model PATH|tiny|tiny-random[-fill|-canny|-kontext]] --prompt TEXT --width W --height H
                  --steps N --guidance G [--negative-prompt TEXT --true-cfg-scale S] [--lora PATH[:SCALE]]
                  [--image IN.png [--mask M.png] [--strength S]] [--control-image C.png] --seed S --out FILE.png
                  [--quantize fp8|fp8-weight] [--no-compile] [--compare-reference] [--cache fbc:0.1|taylorseer:1:5:5]
  torchrun --nproc-per-node N -m fluxrt generate ... --cp ulysses|ring|usp [--ulysses-degree U]
                  the same image from N GPUs (or CPU processes) splitting the sequence: rank 0 encodes, samples,
                  decodes and writes the PNG; the others run their shard of each transformer step (fluxrt.parallel)
  fluxrt bench ...   per-step latency of the transformer, diffusers vs fluxrt (fluxrt.bench)
  fluxrt serve [--model PATH|tiny|tiny-random[...]] [--host 127.0.0.1] [--port 8000] [--max-batch N] [--max-queue N]
               [--api-key KEY] [--timeout S] [--batching step|request|serial] [--warmup 1024x1024,...]
               [--lora PATH[:SCALE]] [--replicas N] [--compile | --no-compile]
               the OpenAI-compatible image server (fluxrt.serve); prints "fluxrt serve: listening on URL" when ready;
               SIGTERM finishes the requests in flight, then exits 0. --replicas N: N pipelines (cuda:0..N-1) behind
               one queue, for throughput
  torchrun --nproc-per-node N -m fluxrt serve ... --cp ulysses|ring|usp [--ulysses-degree U]
               one context-parallel engine, for latency: rank 0 serves HTTP and leads, the others run their shard of
               each transformer call; SIGTERM to torchrun (or rank 0) drains rank 0, then every rank exits 0

The default model, tiny, is the embedded teaching-size FLUX trained on coloured shapes (fluxrt/weights/tiny, 64x64,
nothing to download); tiny-random is built in process with random weights: tiny on a CPU, flux-dev's real widths on
a GPU. Errors print one line, `fluxrt: error: ...`, and exit 2 (--debug adds the
traceback). Ctrl-C exits 130, SIGTERM 143; either way no partial output file is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import secrets
import signal
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from . import devices, validation

TINY = "tiny"  # the embedded trained model (fluxrt/weights/tiny, fluxrt.tiny.TRAINED)
TINY_RANDOM = "tiny-random"  # and one per tools mode, tiny-random-fill, -canny, -kontext: fluxrt.tiny.TINY_RANDOM_MODELS
DEFAULT_PROMPT = "an astronaut riding a horse on the surface of the moon"
TINY_PROMPT = "a large red star at the center on a white background"  # what the tiny model knows: fluxrt.shapes
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's code for a Ctrl-C'd command
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143

# The library names its arguments; the CLI's user knows only the flags (from_pretrained's error messages say e.g.
# "pass autoencoder=").
LIBRARY_ARGUMENTS_AS_FLAGS = {
    "transformer=": "a transformer file as --model (with --ae and --text-encoders)",
    "autoencoder=": "--ae",
    "text_encoders=": "--text-encoders",
    "image=": "--image",
    "mask_image=": "--mask",
    "control_image=": "--control-image",
    "strength=": "--strength",
}


class UsageError(ValueError):
    """A bad command line: reported as one line before any model is loaded."""


class ModelError(ValueError):
    """The --model files could not be loaded."""


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt for SIGINT so that cleanup runs. A BaseException, so that no library
    `except Exception` swallows it."""


def _is_user_error(err: BaseException) -> bool:
    """Whether `err` is the user's to fix (one line, exit 2) rather than a bug in fluxrt (traceback, exit 1).

    The rule: fluxrt and torch report bad input as ValueError (UsageError, CheckpointError, fluxrt.validation's
    limits, malformed JSON), missing or unwritable files as OSError, and missing resources as RuntimeError (no such
    GPU, a GPU without fp8, out of memory, NonFiniteError from bad weights) or MemoryError. Anything else raised
    while the user's model files are read becomes a ModelError (see _load_model): the files are the only input
    there. Any other exception (TypeError, KeyError, AttributeError, ... with valid input) is fluxrt's bug.
    """
    return isinstance(err, (ValueError, OSError, RuntimeError, MemoryError))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"generate": _generate, "bench": _bench, "serve": _serve}[args.command]
    outputs: list[_Output] = []
    with _sigterm_raises(), _library_log_on_stderr():
        try:
            command(args, outputs)
            return 0
        except KeyboardInterrupt:
            return _fail(args, "interrupted", EXIT_INTERRUPTED)
        except Terminated:
            return _fail(args, "terminated", EXIT_TERMINATED)
        except Exception as err:
            if not _is_user_error(err):
                raise
            return _fail(args, f"error: {_one_line(err)}", EXIT_USER_ERROR)
        finally:
            for output in outputs:
                output.discard()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxrt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_debug(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


def _add_debug(parser: argparse.ArgumentParser, default) -> None:
    # On the main parser and on each subcommand (`fluxrt --debug generate` and `fluxrt generate --debug`); the
    # subcommands' default is SUPPRESS so that they do not reset a --debug given before the subcommand.
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, print the Python traceback too")


def _fail(args, message: str, code: int) -> int:
    if args.debug:
        traceback.print_exc()
    print(f"fluxrt: {message}", file=sys.stderr)
    return code


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"fluxrt: {record.levelname.lower()}: {_one_line(record.getMessage())}"


@contextlib.contextmanager
def _library_log_on_stderr():
    """The library's warnings (logger "fluxrt": a prompt cut to the encoders' length, ...) as one line each on
    stderr, like the errors; INFO and below stay quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("fluxrt")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated while the command runs (Python's default kills the process on the spot, leaving
    the temp file behind)."""
    with _signal_handler((signal.SIGTERM,), _raise_terminated):
        yield


@contextlib.contextmanager
def _signal_handler(signals: tuple, handler):
    """`handler` for `signals` while the block runs, the previous handlers after. signal.signal works only in the
    main thread: called from another thread (main() run by a library), the handlers stay as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)


def _raise_terminated(signum, frame) -> None:
    # A repeated SIGTERM (service managers send one, then SIGKILL later) must not cut the cleanup short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


class _Output:
    """A file the CLI writes: reserved as a temp file beside `path` before any work (an unwritable path fails now,
    not after the run; the same filesystem, so the final rename is atomic), renamed over `path` by commit(), else
    removed by discard() together with the folders made for it (only those, and only while empty)."""

    def __init__(self, path: Path, flag: str, suffix: str, what: str):
        if path.suffix.lower() != suffix:
            raise UsageError(f"{flag} must name a {suffix} file{what}, got {str(path)!r}")
        self.path, self.tmp, self.made_folders = path, None, []
        try:
            self._reserve(flag, suffix)
        except OSError as err:  # permissions, a name too long, a full disk, ...
            self.discard()
            raise UsageError(f"cannot write {flag} {str(path)!r}: {err.strerror or err}") from None

    def _reserve(self, flag: str, suffix: str) -> None:
        if self.path.is_dir():
            raise UsageError(f"{flag} {str(self.path)!r} is a folder; name a {suffix} file")
        blocker = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise UsageError(f"cannot write {flag} {str(self.path)!r}: {str(blocker)!r} is a file, not a folder")
        self.made_folders = [p for p in self.path.parents if not p.exists()]  # deepest first
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.open("xb").close()  # not mkstemp: that makes the file 0600, and outputs should get the umask's
        self.tmp = tmp  # only once it exists: discard() removes it

    def commit(self) -> None:
        os.replace(self.tmp, self.path)
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
        for folder in self.made_folders:  # deepest first
            if not os.path.isdir(folder):  # os.path's: False, not OSError, for a name too long
                continue  # mkdir failed before it got this deep
            if any(folder.iterdir()):
                break  # something else wrote into it since: it and the folders above it stay
            folder.rmdir()
        self.made_folders = []


# ---- generate ----


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="prompt -> PNG (default model: tiny, the embedded trained shapes model)")
    g.add_argument("--model", default=TINY,
                   help="a local FLUX folder (diffusers layout, or BFL's flux1-*.safetensors + ae.safetensors beside "
                        "the text-encoder folders), a BFL transformer file (with --ae and --text-encoders), tiny "
                        "(default: the embedded teaching-size FLUX trained on coloured shapes, 64x64) or tiny-random "
                        "(random weights, any size; tiny-random-fill, -canny, -kontext: the tools models)")
    g.add_argument("--ae", type=Path, help="autoencoder (ae.safetensors or a diffusers vae folder) for a file --model")
    g.add_argument("--text-encoders", type=Path,
                   help="folder with tokenizer, text_encoder, tokenizer_2, text_encoder_2 for a file --model")
    g.add_argument("--prompt", help=f"default: {TINY_PROMPT!r} for tiny, else {DEFAULT_PROMPT!r}")
    g.add_argument("--width", type=int, help="pixels, a multiple of 16 (default: the model's; FLUX.1 1024, tiny 64, "
                                             "tiny-random on a CPU 256)")
    g.add_argument("--height", type=int, help="pixels, a multiple of 16 (default: as --width)")
    g.add_argument("--steps", type=int, help="denoising steps (default: the model's; dev 28, schnell 4, tiny 20)")
    g.add_argument("--guidance", type=float, help="distilled guidance (default: dev 3.5; schnell has none)")
    g.add_argument("--negative-prompt", help="true classifier-free guidance's negative prompt (\"\" for the "
                                            "unconditional one; default: the model's, tiny \"\")")
    g.add_argument("--true-cfg-scale", type=float, help="true classifier-free guidance, two passes a step (default: "
                                                        "the model's; 1, off, for FLUX.1; tiny 3)")
    g.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="a FLUX.1 LoRA .safetensors file (diffusers/PEFT, kohya, BFL/ComfyUI or XLabs naming) at SCALE "
                        "(default 1); repeat for several. Fused into the transformer's weights before compiling; beside "
                        "the weights of an FP8 checkpoint (a side branch of the compiled transformer)")
    g.add_argument("--image", type=Path, help="input image: img2img (a text-to-image model; with --mask: inpainting), "
                                              "Fill (with --mask) or Kontext (the image to edit)")
    g.add_argument("--mask", type=Path, help="inpainting mask for --image, its size (white: repaint)")
    g.add_argument("--strength", type=float, help="img2img / inpainting: how far from --image, 0..1 (default 0.6; "
                                                  "Fill 1.0)")
    g.add_argument("--no-auto-resize", action="store_true",
                   help="Kontext: edit --image at its own size (multiples of 16) instead of the nearest preferred "
                        "Kontext resolution (about 1 MP, as diffusers)")
    g.add_argument("--control-image", type=Path, help="a Canny / Depth model's control image (edges or depth map)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", type=Path, default=Path("out.png"), help="PNG path (written whole or not at all)")
    g.add_argument("--quantize", choices=["fp8", "fp8-weight"], help="fp8: W8A8 (sm_89+ GPU); fp8-weight: weights")
    g.add_argument("--no-compile", action="store_true", help="run the plain-PyTorch reference transformer")
    g.add_argument("--cache", metavar="SPEC",
                   help="step caching (fluxrt.cache): fbc:THRESHOLD (First-Block Cache, e.g. fbc:0.08) or "
                        "taylorseer:ORDER:INTERVAL[:WARMUP] (e.g. taylorseer:1:5:5); needs the compiled transformer")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="fluxrt.compile backend")
    g.add_argument("--device", help="default: cuda when there is a GPU, else cpu")
    g.add_argument("--compare-reference", action="store_true",
                   help="first run the uncompiled reference transformer, then print per-step latency side by side")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--cp", choices=["ulysses", "ring", "usp"],
                   help="context parallelism over the ranks of `torchrun --nproc-per-node N -m fluxrt generate ...`: "
                        "ulysses (N divides the 24 heads), ring (any N), usp (both; --ulysses-degree)")
    g.add_argument("--ulysses-degree", type=int, help="--cp usp: ranks per Ulysses group (default: gcd(N, heads))")
    _add_debug(g, default=argparse.SUPPRESS)


def _random_mode(model: str) -> str | None:
    """The tools mode of a tiny-random --model name (None for any other --model)."""
    from .tiny import TINY_RANDOM_MODELS

    return TINY_RANDOM_MODELS.get(model)


def _default_size(args, device: torch.device) -> tuple[int, int]:
    """The model's own image size: a folder's model_index.json may name it (the tiny model's 64x64); tiny-random on a
    CPU 256; FLUX.1 1024."""
    if _random_mode(args.model):
        return (256, 256) if device.type == "cpu" else (1024, 1024)
    defaults = _model_defaults(args)
    return defaults.get("width", 1024), defaults.get("height", 1024)


def _model_defaults(args) -> dict:
    """The sampling defaults a model folder records (model_index.json), read before any weight; {} for the rest."""
    from .pipeline import sampling_defaults

    return sampling_defaults(args.model) if not _random_mode(args.model) and Path(args.model).is_dir() else {}


def _check_request(args, device: torch.device) -> None:
    """The request's numbers by fluxrt.validation's rules and limits, named by their flags; fills in the default size
    (the model's) so that it is checked like a given one."""
    width, height = _default_size(args, device)
    args.width, args.height = validation.check_size(args.width or width, args.height or height,
                                                     names=("--width", "--height"))
    if args.steps is not None:
        validation.check_steps(args.steps, "--steps")
    validation.check_seed(args.seed, "--seed")
    if args.guidance is not None:
        validation.check_guidance(args.guidance, "--guidance")
    if args.true_cfg_scale is not None:
        scale = validation.check_true_cfg_scale(args.true_cfg_scale, "--true-cfg-scale")
        if scale > 1 and args.negative_prompt is None and "negative_prompt" not in _model_defaults(args):
            raise UsageError(f"--true-cfg-scale {scale:g} needs --negative-prompt to guide away from (\"\" for the "
                             "unconditional prompt), or --true-cfg-scale 1 to turn it off")
    args.lora = [_lora_spec(spec) for spec in args.lora or []]
    args.images = _read_images(args)


def _read_images(args) -> dict:
    """--image, --mask, --control-image as PIL images (read whole now: a bad file is a usage error before any model
    is loaded), as the pipeline's image=, mask_image=, control_image=."""
    from .conditioning import check_mask_size

    flags = {"image": ("--image", args.image), "mask_image": ("--mask", args.mask),
             "control_image": ("--control-image", args.control_image)}
    images = {name: _read_image(flag, path) for name, (flag, path) in flags.items() if path is not None}
    if "mask_image" in images and "image" not in images:
        raise UsageError("--mask goes with --image (the image to inpaint)")
    if args.strength is not None and "image" not in images:
        raise UsageError("--strength goes with --image (img2img or inpainting)")
    if args.no_auto_resize and "image" not in images:
        raise UsageError("--no-auto-resize goes with a Kontext model's --image")
    if "mask_image" in images:
        try:
            check_mask_size(images["image"], images["mask_image"])
        except ValueError as err:
            raise UsageError(f"--mask {str(args.mask)!r}: {err}") from None
    return images


def _read_image(flag: str, path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UsageError(f"{flag} {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"{flag} {str(path)!r} is not an image file PIL can read ({err})") from None


def _lora_spec(spec: str) -> tuple[Path, float]:
    """--lora PATH[:SCALE] -> (path, scale) (fluxrt.serve.models.parse_lora_spec), a bad one a usage error."""
    from .serve.models import parse_lora_spec

    try:
        return parse_lora_spec(spec)
    except ValueError as err:
        raise UsageError(str(err)) from None

def _check_model(args) -> None:
    if args.model == TINY or _random_mode(args.model):
        if args.ae is not None or args.text_encoders is not None:
            raise UsageError(f"--ae and --text-encoders go with a transformer file as --model; {args.model} brings "
                             "its own (drop them)")
        if args.model == TINY:
            from .tiny import TRAINED

            args.model = str(TRAINED)  # an ordinary diffusers-layout folder from here on
            args.prompt = TINY_PROMPT if args.prompt is None else args.prompt
        return
    model = Path(args.model)
    if not model.exists():
        raise UsageError(f"--model {args.model!r} does not exist (a local FLUX folder or file, {TINY} or "
                         f"{TINY_RANDOM}[-fill|-canny|-kontext])")
    if model.is_file() and (args.ae is None or args.text_encoders is None):
        raise UsageError(f"--model {args.model!r} is a single transformer file: also pass --ae (ae.safetensors or a "
                         "diffusers vae folder) and --text-encoders (a folder with tokenizer, text_encoder, "
                         "tokenizer_2, text_encoder_2)")
    for flag, path in (("--ae", args.ae), ("--text-encoders", args.text_encoders)):
        if path is not None and not path.exists():
            raise UsageError(f"{flag} {str(path)!r} does not exist")


def _check_args(args) -> None:
    """Every flag, before anything is loaded or written."""
    device = devices.resolve_device(args.device, "--device")
    _check_model(args)
    _check_request(args, device)
    _check_parallel_args(args)
    needs_compiling = [flag for flag, given in (("--quantize", args.quantize), ("--compare-reference",
                                                                               args.compare_reference),
                                                  ("--cache", args.cache)) if given]
    if args.no_compile and needs_compiling:
        raise UsageError(f"{' and '.join(needs_compiling)} need{'s' if len(needs_compiling) == 1 else ''} the compiled "
                         "transformer; drop --no-compile")
    _check_cache_flag(args)
    if args.quantize == "fp8":
        if device.type != "cuda":
            raise UsageError("--quantize fp8 (W8A8) needs an FP8-capable CUDA GPU (sm_89+: Ada, Hopper, Blackwell) "
                             f"and none is in use (device {device}); use --quantize fp8-weight")
        devices.require_fp8_tensor_cores(device, "--quantize fp8 (W8A8)", "use --quantize fp8-weight on this GPU")


def _generate(args, outputs: list[_Output]) -> None:
    _check_args(args)
    if args.cp is not None:
        _generate_parallel(args, outputs)
        return
    out = _Output(args.out, "--out", ".png", "")
    outputs.append(out)
    _run_generate(args, out.tmp)
    out.commit()
    print(f"wrote {args.out}")


def _check_cache_flag(args) -> None:
    from .cache import parse

    try:
        args.cache = parse(args.cache)
    except ValueError as err:
        raise UsageError(f"--cache: {err}") from None
    if args.cache is not None and (args.cp is not None or args.compare_reference):
        raise UsageError("--cache does not combine with --cp or --compare-reference yet; drop one")


def _check_parallel_args(args) -> None:
    if args.cp is None:
        if args.ulysses_degree is not None:
            raise UsageError("--ulysses-degree goes with --cp usp")
        return
    if args.ulysses_degree is not None and args.cp != "usp":
        raise UsageError(f"--ulysses-degree goes with --cp usp (--cp {args.cp} sets it)")
    if args.compare_reference:
        raise UsageError("--compare-reference runs on one device; drop it or --cp")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UsageError(f"--cp {args.cp} runs on several processes: launch with "
                         "`torchrun --nproc-per-node N -m fluxrt generate ... --cp ...`")


def _generate_parallel(args, outputs: list[_Output]) -> None:
    """Every rank builds the same pipeline; rank 0 leads it (fluxrt.parallel_engine) and alone writes --out."""
    from . import parallel

    rank, world = parallel.init()
    try:
        out = None
        if rank == 0:
            out = _Output(args.out, "--out", ".png", "")
            outputs.append(out)
        if parallel.dist.get_backend() == "nccl":  # each rank on its own GPU (init chose cuda:LOCAL_RANK)
            args.device = f"cuda:{torch.cuda.current_device()}"
        pipe = _build_pipeline(args, compile=not args.no_compile)
        with pipe.context_parallel(args.cp, args.ulysses_degree) as leading:
            if leading:
                _run_call(args, pipe, out.tmp)
    except parallel.ParallelError:
        raise  # the process group is broken: tearing it down could block on the dead peer
    else:
        parallel.destroy()
    if out is not None:
        out.commit()
        print(f"wrote {args.out} (context parallel: {args.cp} over {world} ranks)")


def _load_model(args, **pipeline_kwargs):
    """FluxPipeline.from_pretrained, its errors in the CLI's words: flags for argument names, and one ModelError for
    whatever a malformed file makes a loader raise (a TypeError for a config value of the wrong type, ...)."""
    from .pipeline import FluxPipeline

    try:
        return FluxPipeline.from_pretrained(args.model, autoencoder=args.ae, text_encoders=args.text_encoders,
                                            device=args.device, **pipeline_kwargs)
    except Exception as err:  # not BaseException: Ctrl-C and SIGTERM pass through
        if _is_user_error(err):  # fluxrt's and torch's own reports: the message says what is wrong
            raise ModelError(f"cannot load --model {args.model!r}: {_as_flags(str(err))}") from err
        # a loader (often a third-party one: transformers for the text encoders) tripped over a malformed file
        raise ModelError(f"cannot load --model {args.model!r}: {type(err).__name__}: {err} (a file in it is "
                         "malformed; --debug shows where loading failed)") from err


def _as_flags(message: str) -> str:
    pattern = "|".join(re.escape(name) for name in LIBRARY_ARGUMENTS_AS_FLAGS)
    return re.sub(rf"\b({pattern})", lambda m: LIBRARY_ARGUMENTS_AS_FLAGS[m.group(1)], message)


def _build_pipeline(args, compile: bool):
    common = dict(compile=compile, quantize=args.quantize if compile else None, backend=args.backend,
                  progress=not args.no_progress)
    if args.lora:  # fused into the plain weights first: FP8 weights (--quantize) take no fused LoRA
        common.update(compile=False, quantize=None)
    if _random_mode(args.model):
        from .tiny import tiny_random_pipeline

        pipe = tiny_random_pipeline(device=args.device, mode=_random_mode(args.model), **common)
    else:
        pipe = _load_model(args, **common)
    # an FP8 checkpoint takes no fused LoRA (fusing would requantize its weights): compiled first, its LoRAs then
    # run as side branches beside the FP8 weights
    prequantized = bool(args.lora) and pipe.transformer_quantized
    if prequantized and compile:
        pipe.accelerate(quantize=None, backend=args.backend)
    for k, (path, scale) in enumerate(args.lora):
        pipe.load_lora(path, scale=scale, name=f"{k}:{path.name}")  # the same file may be given twice
    if args.lora and compile and not prequantized:
        pipe.accelerate(quantize=args.quantize, backend=args.backend)
    return pipe


def _timed(pipe, call: dict) -> tuple[torch.Tensor, list[float]]:
    """The image ([1, 3, H, W] in [0, 1]) and the seconds each denoising step took."""
    stamps = [time.perf_counter()]

    def tick(step: int, total: int) -> None:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        stamps.append(time.perf_counter())

    image = pipe(**call, output_type="pt", callback=tick)
    return image, [b - a for a, b in zip(stamps[:-1], stamps[1:])]


def _run_generate(args, tmp: Path) -> None:
    pipe = _build_pipeline(args, compile=not args.no_compile and not args.compare_reference)
    _run_call(args, pipe, tmp)


def _run_call(args, pipe, tmp: Path) -> None:
    """The generate call on a built pipeline: the PNG into tmp, the per-step report on stdout."""
    from .pipeline import to_pil

    compile = not args.no_compile
    call = dict(prompt=DEFAULT_PROMPT if args.prompt is None else args.prompt, width=args.width, height=args.height,
                num_steps=args.steps, guidance=args.guidance, seed=args.seed, negative_prompt=args.negative_prompt,
                true_cfg_scale=args.true_cfg_scale, strength=args.strength, **args.images)
    if args.cache is not None:
        call["cache"] = args.cache
    if pipe.mode == "kontext" and "image" in args.images:
        # --width / --height are the output's size (diffusers would rescale them to a 1024² pixel budget)
        call.update(max_area=args.width * args.height, _auto_resize=not args.no_auto_resize)
    elif args.no_auto_resize:
        raise UsageError("--no-auto-resize goes with a Kontext model's --image")
    columns = {}
    if args.compare_reference:
        reference_image, columns["reference"] = _timed(pipe, call)
        pipe.accelerate(quantize=args.quantize, backend=args.backend)
    try:
        image, columns["fluxrt" if compile else "reference"] = _timed(pipe, call)
    except (ValueError, TypeError) as err:  # the call's own checks (a mask for a Kontext model): in flags' words
        raise ValueError(_as_flags(str(err))) from err
    to_pil(image)[0].save(tmp, format="PNG")  # no timestamps or other metadata: same seed, same bytes

    steps = len(next(iter(columns.values())))
    what = f"random weights, {pipe.mode}" if _random_mode(args.model) else args.model
    print(f"fluxrt generate: {call['width']}x{call['height']}, {steps} steps, seed {args.seed}, {pipe.dtype} on "
          f"{pipe.device} ({what}; transformer hidden {pipe.config.hidden_size}, "
          f"{pipe.config.depth}+{pipe.config.depth_single_blocks} blocks)")
    if pipe.plan is not None:
        plan = pipe.plan["transformer"]
        vae = pipe.plan["autoencoder"]
        print(f"fluxrt plan: ops {sorted(set(plan['ops'].values()))}, linears {plan['linears']}, "
              f"cuda graphs {plan['cuda_graphs']}; VAE norms {vae['ops']['group_norm_silu']}, "
              f"{vae['convolutions']} convolutions")
    if args.cache is not None:
        stats = pipe.cache_stats[0]
        print(f"step cache {args.cache.spec()}: the transformer ran {stats['computed']} of "
              f"{stats['computed'] + stats['skipped']} steps in full ({stats['skipped']} reused)")
    print("per-step latency (ms; step 1 includes warm-up and compilation)")
    print("step  " + "".join(f"{name:>12s}" for name in columns))
    for i in range(steps):
        print(f"{i + 1:4d}  " + "".join(f"{times[i] * 1e3:12.2f}" for times in columns.values()))
    medians = {name: statistics.median(times) for name, times in columns.items()}
    line = "median" + "".join(f"{m * 1e3:12.2f}" for m in medians.values())
    if len(medians) == 2:
        line += f"   fluxrt is {medians['reference'] / medians['fluxrt']:.2f}x the reference's speed"
        diff = (image - reference_image).abs().max().item()
        print(line + f"\nfluxrt vs reference image: max |difference| {diff:.2e} (pixel range 0..1)")
    else:
        print(line)


# ---- bench ----


def _add_bench(sub) -> None:
    from .bench import IMPLS, MAX_ITERS, MAX_TXT_LEN

    b = sub.add_parser("bench", help="per-step latency: diffusers vs fluxrt (GPU numbers only count)")
    b.add_argument("--model", default="tiny", choices=["tiny", "flux-dev", "flux-schnell"])
    b.add_argument("--size", nargs="+", default=["64x64"], help="WIDTHxHEIGHT, multiples of 16")
    b.add_argument("--batch", type=int, nargs="+", default=[1],
                   help=f"images per step, 1..{validation.MAX_IMAGES_PER_CALL}")
    b.add_argument("--impl", nargs="+", default=["diffusers-eager", "fluxrt-bf16", "fluxrt-fp8-weight"],
                   choices=IMPLS, metavar="IMPL", help=f"one or more of {', '.join(IMPLS)}")
    b.add_argument("--iters", type=int, default=10, help=f"timed calls per row, 1..{MAX_ITERS} (the median counts)")
    b.add_argument("--txt-len", type=int, default=None,
                   help=f"T5 tokens, 1..{MAX_TXT_LEN} (default: the model's, dev 512, schnell 256)")
    b.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/step_<date>_<gpu>.json; CPU runs: a new file in the "
                        "temp dir); a PNG chart goes beside it when matplotlib is installed")
    _add_debug(b, default=argparse.SUPPRESS)


def _parse_sizes(texts: list[str], flag: str = "--size") -> list[tuple[int, int]]:
    """["WIDTHxHEIGHT", ...] -> [(height, width), ...] (fluxrt.bench's order), by fluxrt.validation's size rules."""
    sizes = []
    for text in texts:
        width, _, height = text.partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise UsageError(f"{flag} {text!r} must be WIDTHxHEIGHT with multiples of 16, e.g. 1024x768")
        try:
            validation.check_size(int(width), int(height))
        except ValueError as err:
            raise UsageError(f"{flag} {text!r}: {err}") from None
        sizes.append((int(height), int(width)))
    return sizes


def _bench(args, outputs: list[_Output]) -> None:
    from . import bench

    sizes = _parse_sizes(args.size)
    for batch in args.batch:
        validation.check_batch_size(batch, "--batch")
    bench.check_iters(args.iters, "--iters")
    bench.check_txt_len(args.txt_len, "--txt-len")
    out_path = args.out or bench.default_output(devices.default_device())
    json_out = _Output(out_path, "--out", ".json", " (the chart goes beside it as .png)")
    outputs.append(json_out)
    chart = bench.chart_path(out_path)  # None without matplotlib
    chart_out = None if chart is None else _Output(chart, "--out's chart", ".png", "")
    if chart_out:
        outputs.append(chart_out)

    result = bench.run(args.model, sizes, args.batch, args.impl, args.iters, txt_len=args.txt_len)
    bench.write_json(result, json_out.tmp)
    if chart_out:
        bench.write_chart(result, chart_out.tmp)
    json_out.commit()
    if chart_out:
        chart_out.commit()
    print(f"wrote {out_path}" + (f" and {chart}" if chart_out else " (no chart: matplotlib is not installed)"))


# ---- serve ----


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="the OpenAI-compatible image server: POST /v1/images/generations, "
                                     "/v1/images/edits")
    s.add_argument("--model", default=TINY,
                   help="as generate's --model: a local FLUX folder, tiny (default) or "
                        "tiny-random[-fill|-canny|-kontext]")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only; 0.0.0.0: all)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one; the ready line names it)")
    s.add_argument("--max-batch", type=int, default=4, help="images per denoising step (the batch), default 4")
    s.add_argument("--max-queue", type=int, default=64, help="images waiting for the batch; more get 429, default 64")
    s.add_argument("--api-key", default=os.environ.get("FLUXRT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $FLUXRT_API_KEY; unset: open)")
    s.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take from arrival to answer (504 after), default 600")
    s.add_argument("--batching", default="step", choices=["step", "request", "serial"],
                   help="step: requests join and leave the running batch at each denoising step (default); request: "
                        "a batch runs start to end; serial: one image at a time")
    s.add_argument("--warmup", default="", metavar="WxH,...",
                   help="sizes to generate once before listening (compilation and caches), e.g. 1024x1024,768x1024")
    s.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="a FLUX.1 LoRA .safetensors file, loaded in hot-swap mode (a side branch: each request picks "
                        "its LoRAs by file stem, \"loras\": {\"STEM\": scale}; without, the loaded scale, default 1); "
                        "repeat for several. Needs the compiled transformer")
    s.add_argument("--device", help="default: cuda when there is a GPU, else cpu")
    compiling = s.add_mutually_exclusive_group()
    compiling.add_argument("--no-compile", action="store_true", help="run the plain-PyTorch reference transformer")
    compiling.add_argument("--compile", action="store_true",
                           help="compile the transformer on a CPU too (the default on a GPU; a request's \"cache\" "
                                "and --lora need it)")
    s.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="fluxrt.compile backend")
    s.add_argument("--replicas", type=int,
                   help="N independent pipelines behind one queue, one per GPU (cuda:0..N-1; on a CPU N copies sharing "
                        "its cores): N times the images/s under load, each image at one GPU's latency (default 1)")
    s.add_argument("--cp", choices=["ulysses", "ring", "usp"],
                   help="one context-parallel engine over the ranks of `torchrun --nproc-per-node N -m fluxrt serve "
                        "... --cp ...`: each image's sequence split over N GPUs (lower latency), rank 0 serves HTTP; "
                        "ulysses (N divides the 24 heads), ring (any N), usp (both; --ulysses-degree)")
    s.add_argument("--ulysses-degree", type=int, help="--cp usp: ranks per Ulysses group (default: gcd(N, heads))")
    s.set_defaults(ae=None, text_encoders=None, prompt=None)
    _add_debug(s, default=argparse.SUPPRESS)


def _check_serve_args(args) -> tuple[list[torch.device], list[tuple[int, int]]]:
    """Every flag, before anything is loaded: the devices of the pipelines (one per replica; the context-parallel
    ranks pick theirs once joined) and the --warmup sizes."""
    device = devices.resolve_device(args.device, "--device")
    _check_model(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535 (0: any free port), got {args.port}")
    validation.check_batch_size(args.max_batch, "--max-batch")
    if args.max_queue < 1:
        raise UsageError(f"--max-queue must be at least 1, got {args.max_queue}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty: give a key, or leave it (and $FLUXRT_API_KEY) unset for an open server")
    args.lora = [_lora_spec(spec) for spec in args.lora or []]
    if args.lora and args.no_compile:
        raise UsageError("--lora runs LoRAs as side branches of the compiled transformer; drop --no-compile")
    warmup = [(w, h) for h, w in _parse_sizes([t.strip() for t in args.warmup.split(",") if t.strip()], "--warmup")]
    return _serve_devices(args, device), warmup


def _serve_devices(args, device: torch.device) -> list[torch.device]:
    """--replicas / --cp / --ulysses-degree checked together: one device per replica (context parallel: the
    process's own, one pipeline per rank)."""
    from .serve.models import replica_devices

    if args.cp is None and args.ulysses_degree is not None:
        raise UsageError("--ulysses-degree goes with --cp usp")
    if args.cp is None:
        try:
            return replica_devices(device, 1 if args.replicas is None else args.replicas)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if args.ulysses_degree is not None and args.cp != "usp":
        raise UsageError(f"--ulysses-degree goes with --cp usp (--cp {args.cp} sets it)")
    if args.replicas is not None:
        raise UsageError("--cp and --replicas are two ways to use N GPUs, pick one: one context-parallel engine "
                         "(`torchrun --nproc-per-node N -m fluxrt serve --cp ...`) or N replicas (--replicas N)")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UsageError(f"--cp {args.cp} runs on several processes: launch with "
                         "`torchrun --nproc-per-node N -m fluxrt serve ... --cp ...`")
    return [device]


def _listen(host: str, port: int):
    """The listening socket, bound before the model loads: a busy port fails at once."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise UsageError(f"--host {host!r}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}; pick another --port (0: any free "
                         "one)") from None
    return sock


def _serve_pipeline(args, device: torch.device):
    """fluxrt.serve.models.load_pipeline on `device`, a folder's loading errors in the CLI's words (_load_model)."""
    from .serve.models import load_pipeline, serve_loras

    # None: compiled on a GPU, the reference on a CPU; hot-swapped LoRAs need the compiled transformer
    compile = False if args.no_compile else True if args.lora or args.compile else None
    if _random_mode(args.model):
        return load_pipeline(args.model, device, compile=compile, backend=args.backend, loras=args.lora)
    on_device = argparse.Namespace(**{**vars(args), "device": str(device)})
    return serve_loras(_load_model(on_device, compile=compile, backend=args.backend, progress=False), args.lora)


def _serve(args, outputs: list[_Output]) -> None:
    requested = args.model
    devices_, warmup = _check_serve_args(args)
    if args.cp is not None:
        _serve_context_parallel(args, requested, warmup)
        return
    sock = _listen(args.host, args.port)
    try:
        pipes = [_serve_pipeline(args, device) for device in devices_]
        signals = _run_server(args, pipes, sock, requested, warmup)
    finally:
        sock.close()
    _stopped(signals)


def _run_server(args, pipes: list, sock, requested: str, warmup, health_check=None) -> list[int]:
    """The engine over `pipes` (one lane each), warmed up, behind the HTTP app on `sock` until SIGTERM or SIGINT;
    the engine drains before this returns the signals received."""
    from .serve.app import create_app
    from .serve.engine import Engine
    from .serve.models import served_model_name

    engine = Engine(pipes, max_batch=args.max_batch, max_queue=args.max_queue, batching=args.batching,
                    timeout_s=args.timeout, health_check=health_check).start()
    try:
        for width, height in warmup:
            _warm_up(engine, width, height)
        app = create_app(engine, served_model_name(requested), api_key=args.api_key,
                         default_size=_default_size(args, pipes[0].device))
        return _run_uvicorn(app, sock)
    finally:
        engine.shutdown(drain=True)


def _stopped(signals: list[int]) -> None:
    print("fluxrt serve: stopped", flush=True)
    if signal.SIGINT in signals:
        raise KeyboardInterrupt


def _serve_context_parallel(args, requested: str, warmup) -> None:
    """Every rank builds the same pipeline (its LoRAs included); rank 0 leads the transformer and runs the server,
    the others follow its calls (fluxrt.parallel_engine) and never listen. Rank 0 stopping (SIGTERM after its
    requests in flight, SIGINT) lets them return; a dead rank fails rank 0's next request and leaves the server
    unhealthy (the engine's health_check) until it is stopped."""
    from . import parallel

    sock = _listen(args.host, args.port) if os.environ["RANK"] == "0" else None  # a busy port fails at once
    try:
        rank, world = parallel.init()
        if parallel.dist.get_backend() == "nccl":  # each rank on its own GPU (init chose cuda:LOCAL_RANK)
            args.device = f"cuda:{torch.cuda.current_device()}"
        pipe = _serve_pipeline(args, devices.resolve_device(args.device, "--device"))
        leader, signals = None, []
        with _signals_ignored(rank != 0), pipe.context_parallel(args.cp, args.ulysses_degree) as leading:
            if leading:
                leader = pipe.transformer
                signals = _run_server(args, [pipe], sock, requested, warmup,
                                      health_check=lambda _: _group_failure(leader))
    finally:
        if sock is not None:
            sock.close()
    if leader is not None and leader.failure is not None:
        print("fluxrt serve: stopped", flush=True)
        raise parallel.ParallelError(_group_failure(leader))  # the group is broken: tearing it down could block
    parallel.destroy()
    if rank != 0:
        print(f"fluxrt serve: rank {rank} of {world} stopped (rank 0 closed the group)", flush=True)
        return
    _stopped(signals)


@contextlib.contextmanager
def _signals_ignored(ignore: bool):
    """A following rank ignores SIGTERM and SIGINT: torchrun sends SIGTERM (a terminal's Ctrl-C, SIGINT) to every
    rank, and a follower gone now would fail rank 0's requests in flight. It ends when rank 0 closes the group
    after draining them, or with a ParallelError within fluxrt.parallel.init's timeout when rank 0 dies."""
    if not ignore:
        yield
        return
    with _signal_handler((signal.SIGINT, signal.SIGTERM), signal.SIG_IGN):
        yield


def _group_failure(leader) -> str | None:
    """The engine's health check on a context-parallel server: why the group can run no more requests, or None."""
    if leader.failure is None:
        return None
    return (f"the context-parallel group failed ({_one_line(leader.failure)}); restart every rank "
            "(`torchrun --nproc-per-node N -m fluxrt serve ... --cp ...`)")


def _warm_up(engine, width: int, height: int) -> None:
    """One image of width x height on every replica (submitted together while all are idle, each takes one)."""
    from .serving import GenerationRequest

    request = GenerationRequest("warm-up", width=width, height=height, num_steps=2, seed=0)
    try:
        jobs = engine.submit_all([request] * len(engine.pipes))
    except (TypeError, ValueError) as err:  # a model that takes no text-only request (Fill, Canny/Depth)
        raise UsageError(f"--warmup {width}x{height}: {err} (--warmup generates from text alone; leave it out for "
                         "this model)") from None
    for job in jobs:
        result = job.future.result()
        if not result.ok:
            raise RuntimeError(f"--warmup {width}x{height} failed: {result.error}")


def _run_uvicorn(app, sock) -> list[int]:
    """Serve until SIGTERM or SIGINT; returns the signals received. Either signal stops uvicorn listening and
    closes idle connections; the requests in flight finish (uvicorn waits for their connections), then the caller
    drains the engine."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    class Server(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            self.received: list[int] = []

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal after a graceful stop, which would end the process by SIGTERM (143)
            # instead of exit 0 once everything in flight is answered
            with _signal_handler((signal.SIGINT, signal.SIGTERM), self.on_signal):
                yield

        def on_signal(self, sig, frame) -> None:
            self.received.append(sig)
            self.handle_exit(sig, frame)  # uvicorn's: stop listening, finish in flight (a second Ctrl-C: don't wait)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                print(f"fluxrt serve: listening on {url}", flush=True)
                print(f"fluxrt serve: the web page is at {url}/ (open it in a browser)", flush=True)

    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    server.run(sockets=[sock])
    return server.received
