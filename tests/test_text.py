"""The umt5 text encoder against the official T5Encoder + HuggingfaceTokenizer, its cache, both layouts."""

from __future__ import annotations

import ast
import copy

import pytest
import torch
from builders_t2v import make_official_t5, save_diffusers_t5, save_official_t5
from reference import official

from wan_lite.checkpoint import TOKENIZER as OFFICIAL_TOKENIZER
from wan_lite.checkpoint import find_text_encoder as find_text_files
from wan_lite.text import DEFAULT_NEGATIVE_PROMPT, TEXT_LEN, TextEncoder, clean_text

TEXT_DIM = 24  # ModelConfig.tiny().text_dim
PROMPTS = [
    "A cat walks on the beach at sunset",
    "  a   dog\n\truns in   snow &amp;amp; red\u00a0 ",  # whitespace runs, double-escaped HTML, nbsp
    "cafÃ© video of a small blue dog",  # mojibake that ftfy repairs
    "dog " * 600,  # longer than 512 tokens: truncated, </s> kept
    DEFAULT_NEGATIVE_PROMPT,
]


@pytest.fixture(scope="module")
def t5():
    return make_official_t5(TEXT_DIM, seed=0)


@pytest.fixture(scope="module")
def roots(tmp_path_factory, t5):
    base = tmp_path_factory.mktemp("text")
    return {"official": save_official_t5(t5, base / "official"), "diffusers": save_diffusers_t5(t5, base / "diffusers")}


def official_encode(t5, tokenizer_dir, prompts):
    """What the official T5EncoderModel.__call__ does: clean, pad to 512, masked encoder, trim."""
    tok = official().tokenizers.HuggingfaceTokenizer(str(tokenizer_dir), seq_len=TEXT_LEN, clean="whitespace")
    ids, mask = tok(prompts, return_mask=True, add_special_tokens=True)
    seq_lens = mask.gt(0).sum(dim=1).long()
    with torch.no_grad():
        context = t5(ids, mask)
    return [u[:v] for u, v in zip(context, seq_lens)]


def test_default_negative_prompt_is_the_official_one():
    tree = ast.parse((official().root / "configs" / "shared_config.py").read_text(encoding="utf-8"))
    values = [
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "wan_shared_cfg.sample_neg_prompt"
    ]
    assert values == [DEFAULT_NEGATIVE_PROMPT]


def test_cleaning_matches_official():
    tok = official().tokenizers.HuggingfaceTokenizer.__new__(official().tokenizers.HuggingfaceTokenizer)
    tok.clean = "whitespace"
    for prompt in PROMPTS:
        assert clean_text(prompt) == tok._clean(prompt)
    assert clean_text(PROMPTS[1]) == "a dog runs in snow & red"
    assert clean_text(PROMPTS[2]).startswith("café")


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_parity_with_official_t5(t5, roots, layout, tmp_path):
    """fp32, same random weights: every prompt's trimmed embedding within rel 1e-5 (measured ~4e-7)."""
    expected = official_encode(t5, roots["official"] / OFFICIAL_TOKENIZER, PROMPTS)
    enc = TextEncoder.from_pretrained(roots[layout], device="cpu", dtype=torch.float32, cache_dir=tmp_path)
    assert enc.layout == layout
    got = enc.encode(PROMPTS)
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert got[3].shape[0] == TEXT_LEN  # truncated to 512 tokens
    assert got[0].shape[0] < 20  # trimmed to the real length, not padded
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        assert ((g - e).norm() / e.norm()).item() < 1e-5


def test_cache_hit_runs_no_encoder(roots, tmp_path):
    prompts = ["a cat", "a   cat ", "a dog"]  # the first two clean to the same text
    enc = TextEncoder.from_pretrained(roots["official"], device="cpu", dtype=torch.float32, cache_dir=tmp_path)
    first = enc.encode(prompts)
    assert enc.encoder_calls == 2  # one forward per distinct cleaned text
    assert torch.equal(first[0], first[1])
    enc.unload()

    again = TextEncoder.from_pretrained(roots["official"], device="cpu", dtype=torch.float32, cache_dir=tmp_path)
    second = again.encode(["a dog", "a cat"])
    assert again.encoder_calls == 0 and again.model is None  # the weights were never loaded
    assert torch.equal(second[0], first[2]) and torch.equal(second[1], first[0])
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_cache_key_follows_weights_and_dtype(roots, tmp_path):
    other_root = save_official_t5(make_official_t5(TEXT_DIM, seed=1), tmp_path / "other")
    variants = [(roots["official"], torch.float32), (other_root, torch.float32), (roots["official"], torch.bfloat16)]
    fps = {TextEncoder.from_pretrained(r, device="cpu", dtype=d, cache_dir=tmp_path).fingerprint for r, d in variants}
    assert len(fps) == 3
    enc = TextEncoder.from_pretrained(other_root, device="cpu", dtype=torch.float32, cache_dir=tmp_path / "c")
    enc.encode(["a cat"])
    assert enc.encoder_calls == 1


def test_bf16_checkpoint_loads(t5, tmp_path):
    """The released .pth is bf16: it loads (and runs) in bf16 and in fp32."""
    root = save_official_t5(copy.deepcopy(t5).to(torch.bfloat16), tmp_path)
    ref = TextEncoder.from_pretrained(root, device="cpu", dtype=torch.float32, use_cache=False).encode(["a cat"])[0]
    got = TextEncoder.from_pretrained(root, device="cpu", dtype=torch.bfloat16, use_cache=False).encode(["a cat"])[0]
    assert got.dtype == torch.bfloat16
    assert ((got.float() - ref).norm() / ref.norm()).item() < 0.05


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder/"):
        find_text_files(tmp_path)
    (tmp_path / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        find_text_files(tmp_path)
