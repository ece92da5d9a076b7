"""Write a decoded video as an H.264 mp4 (PyAV) with the run's parameters beside and inside it.

`write_mp4(path, video, params)` encodes [3, F, H, W] frames in [-1, 1] at 16 fps (yuv420p, CRF 18)
and records `params` (prompt, seed, size, steps, ... anything JSON-serializable) twice: as JSON in
the container's `comment` tag, and in a sidecar `<name>.json`. Both files are written under a
temporary name in the destination folder and renamed into place (os.replace) only when complete, the
mp4 last: after any failure neither a partial mp4 nor a `.part` file remains.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import torch

FPS = 16  # the official sample_fps
METADATA_TAG = "comment"  # mp4 (c)cmt atom; PyAV reads it back as container.metadata["comment"]


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, before any heavy work, if `path` cannot be written as an mp4. Returns it resolved."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"output {path} must end in .mp4")
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder: give a file name ending in .mp4")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"output {path} is not writable: choose another path")
    return path.resolve()


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8 on the CPU."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, F, H, W], got {tuple(video.shape)}")
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous()  # (F, H, W, 3)


def _encode(path: Path, frames: torch.Tensor, comment: str, fps: int, crf: int) -> None:
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
    with av.open(str(path)) as container:
        return json.loads(container.metadata[METADATA_TAG])
