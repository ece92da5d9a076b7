"""Write a decoded video as an H.264 mp4 (PyAV) with the run's parameters beside and inside it.

`write_mp4(path, video, params)` encodes [3, F, H, W] frames in [-1, 1] at 16 fps (yuv420p, CRF 18)
and records `params` (prompt, seed, size, steps, ... anything JSON-serializable) twice: as JSON in
the container's `comment` tag, and in a sidecar `<name>.json`. Both files are written under a
temporary name in the destination folder and renamed into place (os.replace) only when complete, the
mp4 last: after any failure neither a partial mp4 nor a `.part` file remains.

`check_writable(path)` proves up front that the mp4 (and its `.part` name) can be created there: it
creates and removes the `.part` file, so `/proc`, `/sys`, a read-only disk or a parent that is a file
fail before any model loads, with the path in the message. `free_name(path)` is the name an output is
written under without replacing an existing one (`v.mp4` -> `v-1.mp4`).

`save_latents` / `read_latents`: the denoised latents with the run's parameters in the safetensors
header, written before the VAE decode so that a failed decode loses nothing (`python -m
wan_lite.generate --decode FILE` decodes them later).

PyAV and torch load on first use, so the output checks cost no import time.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only
    import torch

FPS = 16  # the official sample_fps
METADATA_TAG = "comment"  # mp4 (c)cmt atom; PyAV reads it back as container.metadata["comment"]


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, before any heavy work, if `path` cannot be written as an mp4: the name, every folder above
    it, and the temporary `<name>.part` it is written under, created and removed here. Returns it resolved."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"output {path} must end in .mp4")
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder: give a file name ending in .mp4")
    folder = path.parent if str(path.parent) else Path(".")
    above = folder
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        raise NotADirectoryError(f"output {path}: {above} is a file, not a folder: choose another path")
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"output {path} is not writable: choose another path")
    _probe(path.with_name(f"{path.name}.part"), path)
    return path.resolve()


def _probe(tmp: Path, path: Path) -> None:
    """Create and remove `tmp` (a file this module writes later): PermissionError naming `path` if it can't."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # a stale temporary file of a failed run: replaced when writing
        if not os.access(tmp, os.W_OK):
            raise PermissionError(f"output {path} is not writable: {tmp} exists and cannot be replaced; "
                                  "remove it") from None
        return
    except OSError as e:  # /proc, /sys, a read-only disk, a name too long
        raise PermissionError(f"output {path} is not writable: creating {tmp} failed "
                              f"({e.strerror or errno.errorcode.get(e.errno, e)}): choose another path") from e
    os.close(fd)
    os.unlink(tmp)


def free_name(path: str | os.PathLike) -> Path:
    """`path`, or the first of `<stem>-1.mp4`, `<stem>-2.mp4`, ... where neither the mp4 nor its `.json`
    sidecar exists: an existing output is never replaced unless asked."""
    path = Path(path).expanduser()
    candidate, n = path, 0
    while candidate.exists() or candidate.with_suffix(".json").exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def latents_path(out: str | os.PathLike) -> Path:
    """Where the denoised latents of the mp4 `out` are kept until it is written: `<stem>.latents.safetensors`."""
    out = Path(out).expanduser()
    return out.with_name(f"{out.stem}.latents.safetensors")


LATENTS_KEY, PARAMS_KEY, SOURCE_KEY = "latents", "wan_lite_params", "wan_lite_source"


def save_latents(path: str | os.PathLike, latents: torch.Tensor, params: dict, source: dict | None = None) -> Path:
    """Write latents (1, 16, F', H/8, W/8) fp32 with `params` (what the mp4's metadata will hold) and `source`
    (where the VAE is, the model) as JSON in the safetensors header, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f"{path.name}.part")
    try:
        save_file({LATENTS_KEY: latents.detach().float().cpu().contiguous()}, tmp,
                  metadata={PARAMS_KEY: json.dumps(params, ensure_ascii=False, sort_keys=True, default=str),
                            SOURCE_KEY: json.dumps(source or {}, ensure_ascii=False)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_latents(path: str | os.PathLike) -> tuple[torch.Tensor, dict, dict]:
    """(latents (1, 16, F', H/8, W/8) fp32, params, source) from a `save_latents` file; ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"latents file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if LATENTS_KEY not in f.keys() or PARAMS_KEY not in meta:
                raise ValueError(f"{path} holds no wan-lite latents (a '{LATENTS_KEY}' tensor and "
                                 f"'{PARAMS_KEY}' metadata): pass the .latents.safetensors file a run left")
            latents, params = f.get_tensor(LATENTS_KEY), json.loads(meta[PARAMS_KEY])
            source = json.loads(meta.get(SOURCE_KEY, "{}"))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file ({e}): pass the .latents.safetensors file a run "
                         "left") from e
    if latents.ndim != 5 or latents.shape[:2] != (1, 16):
        raise ValueError(f"{path}: latents of shape {tuple(latents.shape)}, expected (1, 16, F', H/8, W/8)")
    return latents, params, source


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8 on the CPU."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, F, H, W], got {tuple(video.shape)}")
    import torch

    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous()  # (F, H, W, 3)


def _encode(path: Path, frames: torch.Tensor, comment: str, fps: int, crf: int) -> None:
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        container.metadata[METADATA_TAG] = comment
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


def write_mp4(path: str | os.PathLike, video: torch.Tensor, params: dict, *, fps: int = FPS, crf: int = 18) -> Path:
    """Encode `video` [3, F, H, W] in [-1, 1] to `path` (.mp4) with `params` in its metadata and `<name>.json`."""
    path = check_writable(path)
    frames = to_uint8_frames(video)
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even width and height, got {frames.shape[2]}x{frames.shape[1]}")
    record = {**params, "fps": fps, "frames": frames.shape[0], "width": frames.shape[2], "height": frames.shape[1]}
    text = json.dumps(record, ensure_ascii=False, sort_keys=True, default=str)
    sidecar = path.with_suffix(".json")
    tmp_mp4 = path.with_name(f"{path.name}.part")
    tmp_json = sidecar.with_name(f"{sidecar.name}.part")
    try:
        _encode(tmp_mp4, frames, text, fps, crf)
        tmp_json.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp_json, sidecar)
        os.replace(tmp_mp4, path)  # last: an mp4 at `path` is always complete
    except BaseException:
        tmp_mp4.unlink(missing_ok=True)
        tmp_json.unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The parameters `write_mp4` stored in an mp4's container metadata."""
    import av

    with av.open(str(path)) as container:
        return json.loads(container.metadata[METADATA_TAG])
