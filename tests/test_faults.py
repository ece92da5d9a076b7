"""The faults users report, by kind (issue 15), each as the situation a new user meets on tiny checkpoints:
nothing is lost after the denoise, every input error comes before any model loads, nothing wrong passes
silently, and the command line answers at once, in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from builders import make_checkpoint_root, make_official_model, save_official_expert
from builders_files import official_state, write_gguf
from builders_t2v import add_t2v_components, make_official_t5, save_official_t5

import wan_lite.checkpoint as checkpoint
import wan_lite.t2v as t2v
import wan_lite.text as text
from wan_lite.checks import MAX_SEED, resolve_seed, validate_sampling
from wan_lite.config import ModelConfig
from wan_lite.generate import build_parser, main
from wan_lite.t2v import T2VPipeline
from wan_lite.vae import VAE, check_vae
from wan_lite.video import check_writable, latents_path, read_latents, read_metadata

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig.tiny()


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    out = {}
    for layout in ("official", "diffusers"):
        root = make_checkpoint_root(tmp_path_factory.mktemp(layout), CFG, layout).root
        out[layout] = add_t2v_components(root, layout, CFG.text_dim)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text-cache")


def argv(root, cache, out, *extra) -> list[str]:
    return ["--ckpt", str(root), "--prompt", "a cat walks on the beach", "--size", "48x32", "--frames", "5",
            "--steps", "3", "--device", "cpu", "--dtype", "fp32", "--solver", "euler", "--vae-tile", "0",
            "--cache-dir", str(cache), "--out", str(out), *extra]  # fmt: skip


def run_cli(args) -> int:
    try:
        return main(args)
    except SystemExit as e:  # argparse
        return e.code


def frames_of(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def error_line(capsys) -> str:
    """The one 'error: ...' line on stderr (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any weight load, text encoding or VAE load fails the test: the error must come before them."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(text.TextEncoder, "load", loaded)
    monkeypatch.setattr(text.TextEncoder, "encode", loaded)
    monkeypatch.setattr(checkpoint, "load_source", loaded)
    monkeypatch.setattr(t2v, "load_expert", loaded)
    monkeypatch.setattr(t2v, "host_experts", loaded)
    monkeypatch.setattr(VAE, "from_pretrained", loaded)


# ---------------------------------------------------------------------------------------------
# 1. Work thrown away after the expensive part: the decode fails after the denoise


def test_decode_failure_keeps_latents_and_decode_finishes_later(roots, cache, tmp_path, capsys, monkeypatch):
    # a normal run with --seed -1 (random: printed and stored) and --keep-latents
    a = tmp_path / "a.mp4"
    assert run_cli(argv(roots["official"], cache, a, "--seed", "-1", "--keep-latents")) == 0
    captured = capsys.readouterr()
    seed = int(re.search(r"seed (\d+) \(random\)", captured.err).group(1))
    assert read_metadata(a)["seed"] == seed and f"seed {seed}" in captured.out
    assert latents_path(a).is_file()  # kept, as asked

    # the same run, but the VAE runs out of memory: the denoised latents are on disk, the error names them
    b = tmp_path / "b.mp4"

    def oom(self, latents, tile="auto"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(VAE, "decode", oom)
        assert run_cli(argv(roots["official"], cache, b, "--seed", str(seed))) == 1
    line = error_line(capsys)
    kept = tmp_path / "b.latents.safetensors"
    assert str(kept) in line and f"--decode {kept}" in line and "out of memory" in line
    assert not b.exists() and not list(tmp_path.glob("*.part"))
    latents, params, source = read_latents(kept)
    assert torch.equal(latents, read_latents(latents_path(a))[0])
    assert params["seed"] == seed and params["steps"] == 3 and source["vae"]

    # decoded later (the VAE read from the file's header): the mp4 a normal run writes
    c = tmp_path / "c.mp4"
    assert run_cli(["--decode", str(kept), "--out", str(c), "--device", "cpu", "--vae-tile", "0"]) == 0
    # the same latents through the VAE and the h264 encoder twice: near-identical frames, not bit for bit (a
    # CI run once saw one pixel off by 12 levels, the encoder amplifying a last-bit difference)
    frames_c, frames_a = frames_of(c).astype(np.int16), frames_of(a).astype(np.int16)
    assert frames_c.shape == frames_a.shape and np.abs(frames_c - frames_a).mean() < 0.5
    assert read_metadata(c) == read_metadata(a)

    # without --keep-latents a finished run leaves only the mp4 and its sidecar
    d = tmp_path / "d" / "d.mp4"
    d.parent.mkdir()
    assert run_cli(argv(roots["official"], cache, d, "--seed", str(seed))) == 0
    assert sorted(p.name for p in d.parent.iterdir()) == ["d.json", "d.mp4"]


# ---------------------------------------------------------------------------------------------
# 2. Output problems found up front


@pytest.mark.parametrize("where, message", [
    ("/proc/x.mp4", "/proc/x.mp4.part"),
    ("/sys/x.mp4", "/sys/x.mp4.part"),
    ("FILE/x.mp4", "is a file, not a folder"),
    ("FILE/sub/x.mp4", "is a file, not a folder"),
])  # fmt: skip
def test_output_that_cannot_be_created_fails_before_any_model_loads(roots, cache, tmp_path, capsys, nothing_loads,
                                                                     where, message):
    if where.startswith(("/proc", "/sys")) and not Path(where).parent.is_dir():
        pytest.skip(f"{Path(where).parent} does not exist here")
    (tmp_path / "FILE").write_text("a file, not a folder")
    out = where.replace("FILE", str(tmp_path / "FILE"))
    start = time.perf_counter()
    assert run_cli(argv(roots["official"], cache, out)) == 2
    line = error_line(capsys)
    assert message in line and out in line
    assert time.perf_counter() - start < 30
    with pytest.raises(OSError, match=re.escape(out)):
        check_writable(out)


def test_existing_output_is_not_replaced_silently(roots, cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"an earlier video")
    (tmp_path / "v-1.json").write_text("{}")  # a sidecar alone also holds the name

    seen = []

    def stop(pipe, *args, **kwargs):  # the run would start here, the model opened
        raise KeyboardInterrupt

    monkeypatch.setattr(T2VPipeline, "__call__", stop)
    for extra in ([], ["--overwrite"]):
        assert run_cli(argv(roots["official"], cache, out, *extra)) == 130
        seen.append(capsys.readouterr().err)
    assert f"{out} exists: writing {tmp_path / 'v-2.mp4'} instead (--overwrite replaces it)" in seen[0]
    assert "exists" not in seen[1]
    assert out.read_bytes() == b"an earlier video"
    assert run_cli(argv(tmp_path / "no-such-model", cache, out)) == 2  # a refused model: no word of a new name
    assert "exists" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 3. Errors that used to come after the work had started: checked before any weights load


def copy_root(roots, layout, tmp_path) -> Path:
    root = tmp_path / layout
    shutil.copytree(roots[layout], root, symlinks=True)
    return root


def replace_expert(folder: Path, cfg: ModelConfig) -> None:
    shutil.rmtree(folder)
    save_official_expert(make_official_model(cfg, 5), folder)


def gguf_in_expert_folder(root: Path, tmp_path: Path) -> str:
    folder = root / "low_noise_model"
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    write_gguf(official_state(make_official_model(CFG, 2)), folder / "low.gguf")
    return "low.gguf, a GGUF file"


def unknown_file_in_expert_folder(root: Path, tmp_path: Path) -> str:
    folder = root / "low_noise_model"
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 64)
    return "has no .safetensors files (only pytorch_model.bin"


def i2v_expert(root: Path, tmp_path: Path) -> str:
    replace_expert(root / "low_noise_model", ModelConfig.tiny(in_dim=36))
    return "image-to-video expert (in_dim 36"


def other_width_expert(root: Path, tmp_path: Path) -> str:
    replace_expert(root / "low_noise_model", ModelConfig.tiny(dim=64, ffn_dim=128))
    return "different models (dim 32 vs 64"


def narrow_text_encoder(root: Path, tmp_path: Path) -> str:
    (root / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    save_official_t5(make_official_t5(16), tmp_path / "t5")
    shutil.copy(tmp_path / "t5" / "models_t5_umt5-xxl-enc-bf16.pth", root)
    return "the text encoder is 16 wide, the experts read 24-wide text"


@pytest.mark.parametrize("break_root", [gguf_in_expert_folder, unknown_file_in_expert_folder, i2v_expert,
                                        other_width_expert, narrow_text_encoder])
def test_bad_checkpoint_fails_before_any_weights_load(roots, cache, tmp_path, capsys, nothing_loads, break_root):
    root = copy_root(roots, "official", tmp_path)
    message = break_root(root, tmp_path)
    assert run_cli(argv(root, cache, tmp_path / "v.mp4")) == 2  # the CPU path
    assert message in error_line(capsys)
    with pytest.raises((ValueError, OSError), match=re.escape(message)):  # the one-GPU path opens the same way
        pipe = T2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, cache_dir=cache)
        pipe("a cat", size=(48, 32), frames=5, steps=3, plan=pipe.make_plan((48, 32), 5, vram_gb=24))
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("seed", [str(MAX_SEED + 1), str(2**70)])
def test_seed_the_generator_cannot_take_fails_up_front(roots, cache, tmp_path, capsys, nothing_loads, seed):
    assert run_cli(argv(roots["official"], cache, tmp_path / "v.mp4", "--seed", seed)) == 2
    assert f"seed {seed} is too large: use a whole number from 0 to {MAX_SEED}" in error_line(capsys)


def test_seed_range_is_what_the_generator_takes():
    for seed in (0, 2**63, MAX_SEED):
        assert resolve_seed(seed) == seed
        torch.Generator().manual_seed(seed)  # the whole stated range is accepted
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        torch.Generator().manual_seed(MAX_SEED + 1)
    with pytest.raises(ValueError, match="too large"):
        resolve_seed(MAX_SEED + 1)
    drawn = {resolve_seed(-1) for _ in range(20)} | {resolve_seed(None)}
    assert len(drawn) > 1 and all(0 <= s < 2**31 for s in drawn)
    with pytest.raises(ValueError, match="whole number"):
        resolve_seed(1.5)


# ---------------------------------------------------------------------------------------------
# 4. Wrong or surprising without an error


def test_plain_t5_text_encoder_is_refused_by_name(roots, cache, tmp_path, capsys, nothing_loads):
    from transformers import T5Config, T5EncoderModel

    root = copy_root(roots, "diffusers", tmp_path)
    shutil.rmtree(root / "text_encoder")
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=CFG.text_dim, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu"))  # relative attention bias in block 0 only
    t5.save_pretrained(root / "text_encoder")
    assert run_cli(argv(root, cache, tmp_path / "v.mp4")) == 2
    line = error_line(capsys)
    assert str(root / "text_encoder" / "model.safetensors") in line
    assert "missing encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in line


def test_vae_with_a_missing_key_is_refused_by_name_before_the_run(roots, cache, tmp_path, nothing_loads):
    root = copy_root(roots, "official", tmp_path)
    vae = root / "Wan2.1_VAE.pth"
    names = list(torch.load(vae.resolve(), map_location="cpu", mmap=True, weights_only=True))
    vae.unlink()
    torch.save({n: torch.zeros(0) for n in names if n != "decoder.head.2.weight"}, vae)  # names are all it reads
    with pytest.raises(ValueError, match=re.escape(f"{vae} does not hold the Wan2.1 VAE") + ".*missing"):
        check_vae(vae)
    with pytest.raises(ValueError, match=re.escape(str(vae))):
        T2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, cache_dir=cache)


def test_long_prompt_warns_with_the_count_and_records_the_cut(roots, cache, tmp_path, capsys, monkeypatch):
    prompt = " ".join(["a red cat walks on the beach in snow"] * 80)  # 640 words: well over 512 tokens
    pipe = T2VPipeline.from_pretrained(roots["official"], device="cpu", dtype=torch.float32,
                                       text_dtype=torch.float32, cache_dir=cache)
    tokens = pipe.text.tokens_if_cut(prompt)
    assert tokens > 512 and pipe.text.tokens_if_cut("a cat") is None
    result = pipe(prompt, size=(48, 32), frames=5, steps=1, seed=1, out=tmp_path / "long.mp4")
    assert result.warnings == [f"the prompt is {tokens} tokens; umt5 reads the first 512 (the official limit), "
                               f"the last {tokens - 512} are cut: shorten it to keep them"]
    meta = read_metadata(tmp_path / "long.mp4")
    assert meta["prompt_tokens"] == tokens and meta["prompt_cut_to"] == 512
    assert "prompt_tokens" not in pipe("a cat", size=(48, 32), frames=5, steps=1, seed=1).params

    # the CLI says it in one line before the run
    monkeypatch.setattr(T2VPipeline, "__call__", lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    args = argv(roots["official"], cache, tmp_path / "cli.mp4")
    args[args.index("--prompt") + 1] = prompt
    assert run_cli(args) == 130
    err = capsys.readouterr().err
    assert f"warning: the prompt is {tokens} tokens;" in err


@pytest.mark.parametrize("flag, value, field", [("--guidance-high", "-1", "guidance_high"),
                                                ("--guidance-low", "25", "guidance_low"),
                                                ("--shift", "150", "shift"), ("--steps", "1000", "steps")])
def test_sampling_ranges_are_one_validation(roots, cache, tmp_path, capsys, nothing_loads, flag, value, field):
    """The CLI refuses what t2v.validate_sampling (the app's check) refuses, with its words."""
    settings = dict(steps=40, shift=12.0, guidance_high=4.0, guidance_low=3.0)
    settings[field] = type(settings[field])(value)
    with pytest.raises(ValueError) as info:
        t2v.validate_sampling(**settings)
    assert run_cli(argv(roots["official"], cache, tmp_path / "v.mp4", flag, value)) == 2
    assert error_line(capsys) == f"error: {info.value}"
    with pytest.raises(ValueError, match=re.escape(str(info.value))):  # the pipeline's own call too
        T2VPipeline.from_pretrained(roots["official"], device="cpu", cache_dir=cache)(
            "a cat", size=(48, 32), frames=5, **settings)
    validate_sampling(steps=4, shift=5.0, guidance_high=1.0, guidance_low=1.0)  # Lightning's settings pass


def test_expert_folder_as_root_suggests_the_parent(roots, capsys):
    for layout, expert in (("official", "high_noise_model"), ("diffusers", "transformer_2")):
        root = roots[layout]
        with pytest.raises(ValueError, match=re.escape(f"one expert of a model root: pass its parent folder {root}")):
            checkpoint.open_root(root / expert)


def other_release(tmp_path: Path, name: str) -> Path:
    """The files of a Wan2.1 / TI2V-5B release (official layout), weights left out: only names are read."""
    root = tmp_path / name
    root.mkdir()
    config = {"Wan2.1-T2V-14B": {"model_type": "t2v", "dim": 5120, "in_dim": 16},
              "Wan2.2-TI2V-5B": {"model_type": "ti2v", "dim": 3072, "in_dim": 48}}[name]
    (root / "config.json").write_text(json.dumps({"_class_name": "WanModel", **config}))
    (root / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"")
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    (root / ("Wan2.2_VAE.pth" if "TI2V" in name else "Wan2.1_VAE.pth")).write_bytes(b"")
    return root


@pytest.mark.parametrize("name", ["Wan2.1-T2V-14B", "Wan2.2-TI2V-5B"])
def test_other_wan_releases_are_refused_by_name(tmp_path, name):
    root = other_release(tmp_path, name)
    with pytest.raises(ValueError) as info:
        checkpoint.open_root(root)
    assert f"{root} holds {name}" in str(info.value) and "Wan2.2-T2V-A14B only" in str(info.value)
    assert "into" not in str(info.value)  # not told to download the experts into it
    # the diffusers release of TI2V-5B: one transformer/ with 48 input channels
    diffusers = tmp_path / "diffusers"
    (diffusers / "transformer").mkdir(parents=True)
    (diffusers / "transformer" / "config.json").write_text(json.dumps({"in_channels": 48, "num_attention_heads": 24,
                                                                       "attention_head_dim": 128}))
    (diffusers / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "WanTransformer3DModel"]}))
    with pytest.raises(ValueError, match="holds Wan2.2-TI2V-5B"):
        checkpoint.check_root(diffusers)


# ---------------------------------------------------------------------------------------------
# 5. The command line itself


def test_ctrl_c_is_one_line_and_exit_130(roots, cache, tmp_path, capsys, monkeypatch):
    real = t2v.sample

    def interrupted(*args, callback=None, **kwargs):
        def on_step(step, total, t, expert):
            callback(step, total, t, expert)
            if step == 1:
                raise KeyboardInterrupt

        return real(*args, callback=on_step, **kwargs)

    monkeypatch.setattr(t2v, "sample", interrupted)
    out = tmp_path / "v.mp4"
    assert run_cli(argv(roots["official"], cache, out, "--seed", "1")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == "cancelled at step 2/3; nothing written"
    assert list(tmp_path.iterdir()) == []


def test_argument_errors_answer_without_importing_torch(tmp_path):
    """Through `python -m`, as a user runs it: the answer comes before torch (and transformers, diffusers)
    is imported. The bound is generous for a loaded 2-core machine; typically ~1 s there (torch alone: 5 s)."""
    code = ("import sys, time\nt = time.perf_counter()\nfrom wan_lite.generate import main\n"
            "for args in (['--size', 'big'], ['--size', '50x32'], ['--frames', '8'], ['--guidance-high', '-1'],\n"
            "             ['--seed', str(2**64)], ['--out', '/proc/x.mp4']):\n"
            "    try:\n        main(['--prompt', 'a cat', '--out', sys.argv[1], *args])\n"
            "    except SystemExit:\n        pass\n"
            "print([m for m in ('torch', 'transformers', 'diffusers', 'av') if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "v.mp4")], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert proc.stderr.count("error:") == 6

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "wan_lite.generate", "--size", "big", "--prompt", "a cat",
                           "--out", str(tmp_path / "v.mp4")], capture_output=True, text=True, cwd=REPO, timeout=120)
    wall = time.perf_counter() - start
    assert proc.returncode == 2 and proc.stderr.strip() == ("error: argument --size: size 'big' is not WIDTHxHEIGHT, "
                                                            "e.g. 1280x720 (see --help)")
    assert wall < 5, f"an argument error took {wall:.1f} s"


@pytest.mark.parametrize(("args", "message"), [
    (["--stats", "/nope/s.json"], "error: --stats /nope/s.json: the folder /nope does not exist: create it first"),
    (["--device", "mps"], "error: --device mps: wan-lite runs on cpu or cuda (cuda:N for the N-th GPU)"),
    (["--text-device", "tpu"], "error: --text-device tpu: wan-lite runs on cpu or cuda (cuda:N for the N-th GPU)"),
    (["--vram-gb", "nan"], "error: --vram-gb nan: give a number of GB above 0 (or leave it out: what is free now)"),
    (["--ram-gb", "-3"], "error: --ram-gb -3.0: give a number of GB above 0 (or leave it out: what is free now)"),
])
def test_run_options_are_checked_before_the_run(tmp_path, capsys, args, message):
    """Found by a user trial: a bad --stats folder was reported after the whole run (the video written), a
    bad device name as a traceback, a negative or nan budget not at all. Now each answers at once, exit 2."""
    from wan_lite.generate import main

    assert main(["--ckpt", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "v.mp4"), *args]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert list(tmp_path.iterdir()) == []


def test_help_shows_the_defaults():
    text = " ".join(build_parser().format_help().split())
    for expected in ("4n+1 frames at 16 fps (default: 81; 9 for a test-size model)", "(default: 1280x720; 64x64 for a",
                     "40 official, 4 lightning",
                     "12 official, 5 lightning", "4.0 official, 1.0 lightning", "3.0 official, 1.0 lightning",
                     "unipc official", "(default: bf16)", "(default: official)", "0 to 2**64-1"):
        assert expected in text, expected


def test_summary_time_includes_start_up(roots, cache, tmp_path, capsys, monkeypatch):
    import wan_lite.generate as generate

    monkeypatch.setattr(generate, "_STARTED", time.perf_counter() - 100)  # the process started 100 s ago
    assert run_cli(argv(roots["official"], cache, tmp_path / "v.mp4", "--seed", "2", "--steps", "1")) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("time "))
    total, startup = (float(x) for x in re.match(r"time ([\d.]+)s: start-up and loading ([\d.]+)s", line).groups())
    phases = sum(float(x) for x in re.findall(r"(?:text|denoise|decode|write) ([\d.]+)s", line))
    assert total >= 100 and startup >= 100 - 1
    assert abs(total - startup - phases) < 0.5, line


def test_readme_states_the_promises():
    readme = (REPO / "README.md").read_text()
    for promise in ("--decode", "--overwrite", "--keep-latents", "exit code 130", "2**64-1", "512 tokens"):
        assert promise in readme, promise
    assert os.path.exists(REPO / "wan_lite" / "checks.py")


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, capsys, monkeypatch):
    """Found by a user trial: `--ckpt mymodels/Wan2.2` (a typo under an existing local folder) was sent to the
    hub as owner/name and failed with a network error."""
    from wan_lite.generate import main

    (tmp_path / "mymodels").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["--ckpt", "mymodels/Wan2.2", "--prompt", "a cat", "--out", str(tmp_path / "v.mp4")]) == 2
    assert capsys.readouterr().err.strip().endswith("the model folder (--ckpt) mymodels/Wan2.2 does not exist: "
                                                   "check the path")


def test_ctrl_c_during_the_decode_gives_the_command_that_finishes_this_video(roots, cache, tmp_path, capsys,
                                                                              monkeypatch):
    """Found by a user trial: the line said `--out OUT.mp4`; it now names the run's own output."""
    from wan_lite import vae

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vae.VAE, "decode", interrupted)
    out = tmp_path / "v.mp4"
    assert run_cli(argv(roots["official"], cache, out, "--seed", "1")) == 130
    last = capsys.readouterr().err.rstrip().splitlines()[-1]
    latents = tmp_path / "v.latents.safetensors"
    assert latents.exists()
    assert last.endswith(f"python -m wan_lite.generate --decode {latents} --out {out}"), last
