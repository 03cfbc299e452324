"""`python -m fluxrt generate` and `bench` on bad input: malformed model files, missing parts, signals. Every error a
user can cause is one line on stderr and exit 2 (--debug adds the traceback); Ctrl-C exits 130 and SIGTERM 143; none
of them leaves a temp file or a folder the CLI made behind."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

SMALL = ("--width", "64", "--height", "48", "--steps", "2", "--no-progress")


def run(*args):
    """`python -m fluxrt ...` in a new process: what a user runs."""
    return subprocess.run([sys.executable, "-m", "fluxrt", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli(capsys):
    """fluxrt.cli.main in this process (no interpreter start-up: for errors raised before sampling), as a
    CompletedProcess."""
    from fluxrt.cli import main

    def call(*args):
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return call


def assert_one_line_error(result, *fragments):
    """rc 2, exactly one line on stderr (`fluxrt: error: ...`) holding every fragment, no traceback."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("fluxrt: error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny FLUX pipeline saved in the diffusers layout (fluxrt-loadable VAE)."""
    from tiny_pipeline import build_tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("saved")
    build_tiny_flux_pipeline(folder, fluxrt_vae=True, save=True)
    return folder / "pipeline"


@pytest.fixture
def model(saved_model, tmp_path):
    """A private copy of saved_model, to break."""
    return shutil.copytree(saved_model, tmp_path / "model")


def edit_config(model, part, edit):
    path = model / part / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


# ---- flags ----


@pytest.mark.parametrize("args, message", [
    (("--width", "100"), "--width must be a multiple of 16 between 16 and 4096, got 100"),
    (("--height", "40"), "--height must be a multiple of 16 between 16 and 4096, got 40"),
    (("--width", "4096", "--height", "4096"), "--width x --height = 4096 x 4096 is 16,777,216 pixels; the limit is "
                                              "4,194,304 (2048 x 2048, fluxrt.validation.MAX_PIXELS): ask for a "
                                              "smaller image"),
    (("--steps", "0"), "--steps must be between 1 and 1000 (fluxrt.validation.MAX_STEPS), got 0"),
    (("--steps", "1000000000"), "--steps must be between 1 and 1000 (fluxrt.validation.MAX_STEPS), got 1000000000"),
    (("--seed", "-1"), "--seed must be an int in [0, 2**63), got -1"),
    (("--guidance", "nan"), "--guidance must be a number in [0, 100], got nan"),
    (("--true-cfg-scale", "0.5"), "--true-cfg-scale must be >= 1 (1 turns true classifier-free guidance off), got 0.5"),
    (("--model", "tiny-random", "--true-cfg-scale", "3"), '--true-cfg-scale 3 needs --negative-prompt to guide away '
                                                         'from ("" for the unconditional prompt), or --true-cfg-scale '
                                                         '1 to turn it off'),
    (("--model", "no/such/folder"), "--model 'no/such/folder' does not exist (a local FLUX folder or file, tiny or tiny-random[-fill|-canny|-kontext])"),
    (("--quantize", "fp8"), "--quantize fp8 (W8A8) needs an FP8-capable CUDA GPU (sm_89+: Ada, Hopper, Blackwell) and "
                            "none is in use (device cpu); use --quantize fp8-weight"),
    (("--quantize", "fp8-weight", "--no-compile"), "--quantize needs the compiled transformer; "
                                                   "drop --no-compile"),
    (("--device", "gpu"), "--device 'gpu' is not a device; use e.g. 'cpu', 'cuda', 'cuda:1'"),
])
def test_bad_arguments_give_one_line(cli, tmp_path, args, message):
    result = cli("generate", *SMALL, "--device", "cpu", *args, "--out", str(tmp_path / "x.png"))
    assert (result.returncode, result.stderr, result.stdout) == (2, f"fluxrt: error: {message}\n", "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out, message", [
    ("blocker/x.png", "cannot write --out '{tmp}/blocker/x.png': '{tmp}/blocker' is a file, not a folder"),
    ("x.jpg", "--out must name a .png file, got '{tmp}/x.jpg'"),
    ("folder.png", "--out '{tmp}/folder.png' is a folder; name a .png file"),
    ("new/" + "x" * 300 + ".png", "cannot write --out '{tmp}/new/" + "x" * 300 + ".png': File name too long"),
    # mkdir makes new/, then fails on the next folder: new/ is removed all the same
    ("new/" + "x" * 300 + "/x.png", "cannot write --out '{tmp}/new/" + "x" * 300 + "/x.png': File name too long"),
])
def test_unwritable_output_gives_one_line(cli, tmp_path, out, message):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    (tmp_path / "folder.png").mkdir()
    result = cli("generate", *SMALL, "--out", str(tmp_path / out))
    assert (result.returncode, result.stderr) == (2, f"fluxrt: error: {message.format(tmp=tmp_path)}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "folder.png"]  # "new" made, then removed


def test_a_folder_without_flux_leaves_no_file(cli, tmp_path):
    (tmp_path / "model").mkdir()  # exists, but holds no FLUX
    result = cli("generate", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "x.png"))
    assert_one_line_error(result, "no transformer/ folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_bad_flag_value_exits_2(cli, capsys):
    with pytest.raises(SystemExit) as exit:  # argparse's own usage error
        cli("generate", "--steps", "many")
    assert exit.value.code == 2 and "invalid int value: 'many'" in capsys.readouterr().err


# ---- malformed files, missing parts ----


@pytest.mark.parametrize("part, edit, fragment", [
    ("transformer", lambda config: [1, 2], "config"),  # valid JSON, not an object
    ("transformer", lambda config: {**config, "axes_dims_rope": 5}, "config"),
    ("transformer", lambda config: {**config, "attention_head_dim": None}, "config"),
    # transformers' CLIPTextConfig(**config) raises a TypeError: a third-party loader, no diagnosis of its own
    ("text_encoder", lambda config: [1, 2], "TypeError"),
], ids=["list", "axes_dims_rope-5", "attention_head_dim-null", "text-encoder-list"])
def test_a_malformed_config_is_one_line_and_leaves_nothing(cli, model, tmp_path, part, edit, fragment):
    edit_config(model, part, edit)
    result = cli("generate", "--model", str(model), *SMALL, "--out", str(tmp_path / "new" / "deeper" / "x.png"))
    assert_one_line_error(result, f"fluxrt: error: cannot load --model '{model}': ", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp file, no folder made for --out


def test_debug_adds_the_traceback(cli, model, tmp_path):
    edit_config(model, "transformer", lambda config: [1, 2])
    for args in (("--debug", "generate"), ("generate", "--debug")):  # before or after the subcommand
        result = cli(*args, "--model", str(model), *SMALL, "--out", str(tmp_path / "x.png"))
        assert result.returncode == 2
        assert "Traceback (most recent call last)" in result.stderr
        assert result.stderr.splitlines()[-1].startswith("fluxrt: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_non_finite_latents_are_one_line(cli, model, tmp_path):
    """Finite weights (the loader accepts them) whose output overflows fp32: the sampler's NonFiniteError."""
    weights_file = model / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights["proj_out.weight"].fill_(3e38)  # the transformer's last layer: its sums overflow to inf in step 1
    save_file(weights, weights_file)
    result = cli("generate", "--model", str(model), *SMALL, "--out", str(tmp_path / "x.png"))
    assert_one_line_error(result, "fluxrt: error: the latents hold NaN or inf after denoising step 1 of 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("remove, flag, argument", [
    ("vae", "--ae", "autoencoder="),
    ("text_encoder_2", "--text-encoders", "text_encoders="),
    ("transformer", "--model", "transformer="),
])
def test_missing_parts_are_named_by_their_flags(cli, model, tmp_path, remove, flag, argument):
    shutil.rmtree(model / remove)
    result = cli("generate", "--model", str(model), *SMALL, "--out", str(tmp_path / "x.png"))
    assert_one_line_error(result, flag)
    assert argument not in result.stderr  # a Python argument name means nothing on the command line


def test_a_transformer_file_needs_ae_and_text_encoders(cli, model, tmp_path):
    file = model / "transformer" / "diffusion_pytorch_model.safetensors"
    result = cli("generate", "--model", str(file), "--ae", str(model / "vae"), *SMALL, "--out", str(tmp_path / "x.png"))
    assert_one_line_error(result, f"--model '{file}' is a single transformer file: also pass --ae", "--text-encoders")


@pytest.mark.parametrize("model", ["tiny", "tiny-random"])
@pytest.mark.parametrize("flag", ["--ae", "--text-encoders"])
def test_the_builtin_models_refuse_files_they_would_ignore(cli, tmp_path, flag, model):
    result = cli("generate", "--model", model, flag, str(tmp_path), *SMALL, "--out", str(tmp_path / "x.png"))
    assert_one_line_error(result, f"--ae and --text-encoders go with a transformer file as --model; {model} brings")


def test_no_progress_means_no_bars_at_all(model, tmp_path):
    """Nothing on stderr: neither fluxrt's sampling bar nor the text encoders' loading bars."""
    out = tmp_path / "x.png"
    result = run("generate", "--model", str(model), *SMALL, "--out", str(out))
    assert (result.returncode, result.stderr) == (0, "")
    assert out.is_file()


def test_a_prompt_past_the_encoders_limit_warns_in_one_line(cli, tmp_path):
    result = cli("generate", *SMALL, "--prompt", " ".join(["apple"] * 600), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("fluxrt: warning: ")
    assert "T5 keeps" in result.stderr and "dropped" in result.stderr


# ---- signals ----


def start(*args, stderr):
    # The child gets the default SIGINT action even when pytest runs where SIGINT is ignored (a background job of a
    # non-interactive shell): Python then installs its KeyboardInterrupt handler, as it does for a user's shell.
    return subprocess.Popen([sys.executable, "-m", "fluxrt", *args], stdout=subprocess.DEVNULL, stderr=stderr,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the command ended or stalled before it got going (rc {process.wait()})")
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code, message", [
    (signal.SIGINT, 130, "fluxrt: interrupted"),
    (signal.SIGTERM, 143, "fluxrt: terminated"),
])
def test_a_signal_while_sampling_exits_cleanly(tmp_path, sig, code, message):
    """Sent once a denoising step has finished (the progress bar shows n/1000 with n >= 1): the exit code, one line
    besides the bar, and neither the temp file nor the folders made for --out remain."""
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        process = start("generate", "--model", "tiny-random", "--width", "64", "--height", "48", "--steps", "1000",
                        "--out", str(tmp_path / "new" / "deeper" / "x.png"), stderr=stderr)
        try:
            wait_for(lambda: re.search(r"\b[1-9]\d*/1000\b", log.read_text()), process)
            process.send_signal(sig)
            assert process.wait(timeout=60) == code
        finally:
            process.kill()
    text = log.read_text()
    assert "Traceback" not in text
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    assert [line for line in lines if "/1000" not in line] == [message]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt"]


def test_bench_interrupted_leaves_no_json(tmp_path):
    out_folder = tmp_path / "results"
    with (tmp_path / "stderr.txt").open("w") as stderr:
        process = start("bench", "--iters", "1000", "--impl", "diffusers-eager", "--out", str(out_folder / "b.json"),
                        stderr=stderr)
        try:
            wait_for(lambda: out_folder.is_dir() and any(out_folder.iterdir()), process)  # the reserved temp file
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 130
        finally:
            process.kill()
    assert (tmp_path / "stderr.txt").read_text() == "fluxrt: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt"]
