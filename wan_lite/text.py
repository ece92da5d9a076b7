"""The umt5-xxl text encoder: prompt -> cleaned text -> tokens -> [L, 4096] embeddings, cached on disk.

The encoder is transformers' `UMT5EncoderModel` with its tokenizer (`AutoTokenizer`); this module only
finds the weights in either checkpoint layout, renames the official keys, cleans the text the way the
official code does and caches the results:

- official: `models_t5_umt5-xxl-enc-bf16.pth` (keys of `wan/modules/t5.py` `T5Encoder`) and the
  tokenizer folder `google/umt5-xxl/`. The .pth carries no config: the dimensions are read from the
  tensors' shapes, so small test encoders load the same way.
- diffusers: `text_encoder/` (a saved `UMT5EncoderModel`) and `tokenizer/`.

As in the references, a prompt is cleaned (ftfy, HTML unescape, whitespace collapse), truncated to
512 tokens with the closing `</s>` included, and its embedding is trimmed to the real token count
(the official `[u[:v] for u, v in zip(context, seq_lens)]`). Each prompt is encoded at its own length
rather than padded to 512: padded keys are masked, so the real positions come out the same.

Embeddings are cached as safetensors under `~/.cache/wan-lite/text` (or `cache_dir`), keyed by the
encoder's fingerprint and the cleaned text: the negative prompt and a repeated prompt are read back
without loading the 11 GB encoder at all. The weights load only on a cache miss and stay until
`unload()`; the pipeline unloads right after encoding so the DiT gets the GPU.

Deliberately unsupported: 8-bit loading of the encoder (run it on the CPU instead when VRAM is short).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

import regex as re
import torch
from safetensors.torch import load_file, save_file

from .checkpoint import TEXT_WEIGHTS as OFFICIAL_WEIGHTS
from .checkpoint import find_text_encoder
from .checks import clean_text
from .formats import check_keys, read_header, read_text_encoder_file, refuse, umt5_config
from .formats.components import SKIPPED
from .formats.expert import _fp8_layers, _is_marker
from .formats.identify import scan
from .keys import CheckpointError

if TYPE_CHECKING:  # annotations only: transformers loads when an encoder does
    from transformers import UMT5Config, UMT5EncoderModel

TEXT_LEN = 512  # prompts are truncated to this many tokens (the official text_len)
DEFAULT_CACHE_DIR = Path("~/.cache/wan-lite/text")
CACHE_FORMAT = "wan-lite-text-v1"  # bump when cleaning or encoding changes: old cache entries stop matching

# The official default negative prompt (`sample_neg_prompt` in wan/configs/shared_config.py).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


def write_small_tokenizer(folder, words: tuple[str, ...] | list[str] = ()):
    """A small umt5-like Unigram `T5Tokenizer` (pad 0, </s> 1, <unk> 2, as umt5's), trained on nothing, saved
    in `folder` for `AutoTokenizer.from_pretrained`: for random-weight roots (the app's demo, the benchmarks,
    the tests). It knows ASCII, the default negative prompt's characters and `words`; returns the tokenizer."""
    import string

    from transformers import T5Tokenizer

    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + DEFAULT_NEGATIVE_PROMPT))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.5)]
    pieces += [("▁" + w, -1.0) for w in words] + [("▁" + c, -2.0) for c in chars] + [(c, -3.0) for c in chars]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(folder)
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# Official .pth -> transformers UMT5EncoderModel


def official_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official `T5Encoder` keys to `UMT5EncoderModel` keys (a plain renaming, no reshapes)."""
    fixed = {
        "token_embedding.weight": "shared.weight",
        "norm.weight": "encoder.final_layer_norm.weight",
    }
    per_block = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU branch
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    out = {}
    for key, value in sd.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m is None or m.group(2) not in per_block:
            raise KeyError(f"unexpected key {key!r} in the official umt5 checkpoint ({OFFICIAL_WEIGHTS})")
        out[f"encoder.block.{m.group(1)}.{per_block[m.group(2)]}"] = value
    out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def config_from_official(sd: dict[str, torch.Tensor]) -> UMT5Config:
    """Read the encoder's dimensions from the official tensors' shapes (the .pth has no config)."""
    from transformers import UMT5Config

    vocab, dim = sd["token_embedding.weight"].shape
    dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
    dim_ffn = sd["blocks.0.ffn.fc1.weight"].shape[0]
    num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return UMT5Config(
        vocab_size=vocab,
        d_model=dim,
        d_kv=dim_attn // num_heads,
        d_ff=dim_ffn,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,  # fixed in the official T5RelativeEmbedding
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",  # GELU(tanh) gate, as the official T5FeedForward
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def open_official(path: Path) -> dict[str, torch.Tensor]:
    """The official .pth's tensors, memory-mapped (the file's index and pickle are read, no weight)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def load_official_encoder(path: Path, dtype: torch.dtype,
                          sd: dict[str, torch.Tensor] | None = None) -> UMT5EncoderModel:
    """Build `UMT5EncoderModel` on the meta device and assign the official .pth tensors (mmap, no copy);
    `sd`: the file already opened (`open_official`)."""
    from transformers import UMT5EncoderModel

    sd = open_official(path) if sd is None else sd
    config = config_from_official(sd)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    sd = {k: v.to(dtype) for k, v in official_to_transformers(sd).items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    return model


def _fingerprint(weights: Path, tokenizer: Path, dtype: torch.dtype) -> str:
    """A cheap content digest: size + first/last MiB of each weight file, all tokenizer files, dtype.

    The tail of a .pth (a zip) holds every record's CRC32 and the tail of a safetensors file holds
    weights, so two different checkpoints differ here without reading 11 GB.
    """
    h = hashlib.sha256(f"{CACHE_FORMAT}|{TEXT_LEN}|{dtype}".encode())
    files = sorted(weights.rglob("*")) if weights.is_dir() else [weights]
    for f in (f for f in files if f.is_file() and f.suffix in (".pth", ".safetensors", ".bin", ".json")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    if Path(tokenizer).is_dir():
        for f in sorted(p for p in Path(tokenizer).rglob("*") if p.is_file()):
            h.update(f.name.encode() + f.read_bytes())
    else:  # a hub id (google/umt5-xxl): its name
        h.update(str(tokenizer).encode())
    return h.hexdigest()[:32]


def text_layout(weights: Path) -> str:
    """How the encoder's weights are stored: "official" (.pth), "diffusers" (a folder) or "file" (one
    .safetensors file with transformers' UMT5 key names, fp16 or fp8 scaled: ComfyUI's umt5_xxl_*)."""
    weights = Path(weights)
    return "diffusers" if weights.is_dir() else "official" if weights.suffix == ".pth" else "file"


def _expected_keys(config) -> set[str]:
    """The UMT5EncoderModel state_dict names for `config`, built on the meta device (no memory)."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        return set(UMT5EncoderModel(config).state_dict())


def _check_width(path: Path, d_model: int, width: int) -> None:
    if d_model != width:
        raise CheckpointError(f"{path}: the text encoder is {d_model} wide, the experts read {width}-wide text "
                              f"(umt5-xxl: 4096): use the umt5-xxl encoder that came with the experts")


def check_text_encoder(layout: str, weights: Path, width: int, sd: dict[str, torch.Tensor] | None = None) -> None:
    """Check the umt5 encoder from its config, header or .pth index only (no weight is read): its width is
    the experts' text_dim, and its tensor names are exactly a UMT5 encoder's (a plain T5, whose blocks
    after the first have no relative attention bias, is refused). The pipeline calls this before any model
    loads; `sd`: the official .pth already opened (`open_official`). Raises CheckpointError naming the file."""
    weights = Path(weights)
    if layout == "official":
        sd = open_official(weights) if sd is None else sd  # names and shapes only
        try:
            config = config_from_official(sd)
            names = official_to_transformers(sd)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{weights} is not the official umt5-xxl encoder ({e}): download "
                                  f"{OFFICIAL_WEIGHTS} again") from e
        _check_width(weights, config.d_model, width)
        found = set(names)
    elif layout == "file":
        info, header, stored = scan(weights)
        refuse(info, "text_encoder")  # a T5 that is not UMT5, an expert, a VAE: named
        fp8 = _fp8_layers(header, stored)
        shapes = {n: header.tensors[st].shape for n, st in stored.items()
                  if not _is_marker(n, fp8) and n not in SKIPPED}
        shapes.setdefault("encoder.embed_tokens.weight", shapes.get("shared.weight"))  # tied to shared
        _check_width(weights, info.facts.get("d_model", width), width)
        config, found = umt5_config(shapes), set(shapes)
    else:  # a diffusers text_encoder/ folder: config.json + safetensors
        from transformers import UMT5Config

        config_file = weights / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{weights} has no config.json: download the text_encoder/ folder again")
        config = UMT5Config.from_dict(json.loads(config_file.read_text()))
        _check_width(config_file, config.d_model, width)
        files = sorted(weights.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{weights} has no .safetensors weights: download the text_encoder/ folder again")
        found = {name for f in files for name in read_header(f).tensors}
        found.add("encoder.embed_tokens.weight")  # tied to shared.weight: save_pretrained leaves it out
        weights = files[0] if len(files) == 1 else weights
    check_keys(_expected_keys(config), found, weights, f"a {config.num_layers}-layer UMT5 encoder (umt5-xxl)")


def load_encoder_file(path: Path, dtype: torch.dtype, width: int = 4096) -> UMT5EncoderModel:
    """A UMT5 encoder single file (checked: UMT5, `width` wide (the experts' text_dim), every key) built
    on the meta device."""
    from transformers import UMT5EncoderModel

    sd = read_text_encoder_file(path, width=width)  # CheckpointError naming the file: a T5, another width, bad keys
    config = umt5_config({k: tuple(v.shape) for k, v in sd.items()})
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    model.tie_weights()
    return model


# ---------------------------------------------------------------------------------------------------
# The encoder



def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT, default huggingface.co) answers a TCP connection within
    `timeout` seconds; False at once with HF_HUB_OFFLINE=1. huggingface_hub retries a failed name lookup
    for about a minute before it gives up, which is how an offline run without --tokenizer used to end."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False

# what --tokenizer wants, in both refusals of _load_tokenizer
TOKENIZER_FOLDER = ("a folder with google/umt5-xxl's tokenizer files (tokenizer.json or spiece.model, with "
                    "tokenizer_config.json), e.g. `hf download google/umt5-xxl --include '*token*' 'spiece.model' "
                    "--local-dir DIR`")


class TextEncoder:
    """Prompts -> list of [L_i, dim] embeddings (L_i = real token count, at most 512), cached on disk."""

    def __init__(
        self,
        layout: str,
        weights: Path,
        tokenizer: Path | str,
        *,
        device: str | torch.device | None,
        dtype: torch.dtype,
        cache_dir: str | os.PathLike | None,
        use_cache: bool,
        width: int = 4096,
    ):
        self.layout, self.weights, self.tokenizer_path = layout, weights, tokenizer
        self.width = width  # d_model the experts read (their text_dim): a single file is checked against it
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
        self.use_cache = use_cache
        self.fingerprint = _fingerprint(weights, tokenizer, dtype)
        self.model: UMT5EncoderModel | None = None
        self.tokenizer = None
        self.encoder_calls = 0  # forward passes run (a cache hit runs none)
        self._official: dict[str, torch.Tensor] | None = None  # the .pth opened once (check, dtype, load)

    @classmethod
    def from_pretrained(
        cls,
        root: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.bfloat16,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
    ) -> TextEncoder:
        """Find the encoder in a model root of either layout; the weights load on the first cache miss.
        `device` None: CUDA when present, else the CPU."""
        layout, weights, tokenizer = find_text_encoder(root)
        return cls(layout, weights, tokenizer, device=device, dtype=dtype, cache_dir=cache_dir, use_cache=use_cache)

    def load(self) -> None:
        """Load tokenizer and weights onto `device` (done on demand by `encode`)."""
        if self.model is not None:
            return
        from transformers import UMT5EncoderModel

        self._load_tokenizer()
        if self.layout == "official":  # the opened .pth is dropped here: its mapping goes with the weights
            model = load_official_encoder(self.weights, self.dtype, self._opened())
            self._official = None
        elif self.layout == "file":
            model = load_encoder_file(self.weights, self.dtype, self.width)
        else:
            model = without_progress_bar(UMT5EncoderModel.from_pretrained, self.weights, dtype=self.dtype)
        self.model = model.to(self.device).eval().requires_grad_(False)

    def check_tokenizer(self) -> None:
        """Load the tokenizer now (a local folder, or the hub id from the cache, downloading it when not
        cached), so a missing one is reported before any weights load. Raises FileNotFoundError."""
        self._load_tokenizer()

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        if self.tokenizer is not None:
            return self.tokenizer
        if Path(self.tokenizer_path).is_dir():
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            except (OSError, ValueError) as e:  # a folder without the files: transformers asks for sentencepiece
                raise FileNotFoundError(
                    f"{self.tokenizer_path} is not a umt5 tokenizer folder (transformers cannot load a tokenizer "
                    f"from it: {type(e).__name__}): pass --tokenizer DIR, {TOKENIZER_FOLDER}") from e
            return self.tokenizer
        try:  # a hub id: the local cache first, without network retries
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
            return self.tokenizer
        except OSError:
            pass
        try:
            if not _hub_reachable():  # offline: no minute of retries, and no "downloading" line before the error
                raise OSError("the Hugging Face hub cannot be reached")
            print(f"the {self.tokenizer_path} tokenizer is not cached: downloading it (offline, pass "
                  "--tokenizer DIR)", file=sys.stderr)
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        except OSError as e:  # a hub id offline
            raise FileNotFoundError(
                f"cannot load the umt5 tokenizer from {self.tokenizer_path} (not a tokenizer folder, not "
                f"cached, and the download failed: {type(e).__name__}): "
                f"a single-file text encoder holds no tokenizer; pass --tokenizer DIR ({TOKENIZER_FOLDER}), "
                "or go online once so google/umt5-xxl is cached") from e
        return self.tokenizer

    @functools.cached_property
    def stored_dtype(self) -> torch.dtype | None:
        """The dtype of the official .pth's embedding (read once through mmap, no weights loaded); None for
        the other layouts."""
        if self.layout != "official":
            return None
        return self._opened()["token_embedding.weight"].dtype

    def _opened(self) -> dict[str, torch.Tensor]:
        """The official .pth, memory-mapped, opened once for the check, `stored_dtype` and the load (each
        torch.load reads the zip's index and a header per tensor: scattered reads of an 11.4 GB file)."""
        if self._official is None:
            self._official = open_official(self.weights)
        return self._official

    def check(self) -> None:
        """The encoder's width and tensor names, from its config / header only (`check_text_encoder`)."""
        check_text_encoder(self.layout, self.weights, self.width,
                           self._opened() if self.layout == "official" else None)

    def missing(self, prompts: list[str]) -> list[str]:
        """The cleaned prompts not in the embedding cache: those the encoder's weights load for."""
        texts = {clean_text(p) for p in prompts}
        return sorted(t for t in texts if not (self.use_cache and self._cache_path(t).is_file()))

    def tokens_if_cut(self, prompt: str) -> int | None:
        """The cleaned prompt's token count (the closing </s> included) when it is over TEXT_LEN and will be
        cut; None when it fits. Loads only the tokenizer, and not even that for a text too short to reach
        TEXT_LEN (a token covers at least one byte, plus the leading word marker and </s>)."""
        text = clean_text(prompt)
        if len(text.encode("utf-8")) + 2 <= TEXT_LEN:
            return None
        count = len(self._load_tokenizer()(text, truncation=False).input_ids)
        return count if count > TEXT_LEN else None

    def unload(self) -> None:
        """Free the weights (and their VRAM); the next cache miss loads them again."""
        self.model = None
        self.tokenizer = None
        self._official = None
        if self.device.type == "cuda":
            # transformers' modules hold reference cycles: without a collection the 11.4 GB of weights stay
            # allocated until the next automatic one, under the expert that loads next (seen on the H200:
            # 25.8 GiB allocated in a 720p run planned for 24 GB, 2026-11-29)
            gc.collect()
            torch.cuda.empty_cache()

    def _cache_path(self, text: str) -> Path:
        return self.cache_dir / self.fingerprint / f"{hashlib.sha256(text.encode()).hexdigest()}.safetensors"

    @torch.no_grad()
    def _run(self, texts: list[str]) -> list[torch.Tensor]:
        """Encode cleaned texts, one forward pass each at its own length -> list of [L_i, dim] on CPU."""
        self.load()
        out = []
        for text in texts:
            tok = self.tokenizer(text, truncation=True, max_length=TEXT_LEN, return_tensors="pt")
            ids = tok.input_ids.to(self.device)  # (1, L) with the closing </s>
            mask = tok.attention_mask.to(self.device)  # (1, L), all ones
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (1, L, dim)
            out.append(hidden[0].cpu())
            self.encoder_calls += 1
        return out

    def encode(self, prompts: list[str] | str) -> list[torch.Tensor]:
        """Prompts -> list of [L_i, dim] tensors in `dtype` on the CPU. Cached prompts load no weights."""
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = [clean_text(p) for p in prompts]
        result: dict[str, torch.Tensor] = {}
        if self.use_cache:
            for text in set(texts):
                path = self._cache_path(text)
                if path.is_file():
                    result[text] = load_file(path)["context"]
        missing = sorted({t for t in texts if t not in result})
        for text, emb in zip(missing, self._run(missing) if missing else []):
            result[text] = emb
            if self.use_cache:
                self._store(text, emb)
        return [result[t] for t in texts]

    def _store(self, text: str, emb: torch.Tensor) -> None:
        path = self._cache_path(text)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        meta = {"text": text, "format": CACHE_FORMAT, "weights": str(self.weights), "layout": self.layout}
        try:
            save_file({"context": emb.contiguous()}, tmp, metadata={"wan_lite": json.dumps(meta, ensure_ascii=False)})
            os.replace(tmp, path)
        except BaseException:  # a full disk or an interrupt leaves no stray file in the cache
            tmp.unlink(missing_ok=True)
            raise


def without_progress_bar(call, *args, **kwargs):
    """call(*args, **kwargs) with transformers' progress bars off, then their previous setting back: the
    encoder's `from_pretrained` ("Loading weights") runs inside a generate run whose denoise bar is already on
    the terminal, and two bars on one line garble both (the text phase is timed in the run's summary); the
    app's demo build calls `save_pretrained` ("Writing model shards") at start-up."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return call(*args, **kwargs)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
