"""LoRAs (wan_lite.lora): tiny LoRA files in the four public key formats, made from random factors, merged
by `LoRASource` over the tiny official expert, against (1) a reference merge on the official modules,
(2) diffusers' own LoRA loading (PEFT) on the diffusers layout, (3) the float merged model for 8-bit
experts; and the errors for files that do not fit.

The files are written here from official module names with maps of our own (Kohya: "." -> "_";
diffusers: builders.official_to_diffusers), so the runtime's key parsing is checked, not repeated.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from builders import diffusers_forward, official_forward, official_to_diffusers
from safetensors.torch import load_file, save_file
from tolerance import assert_close_fp32, rel_error

from wan_lite import checkpoint
from wan_lite.checkpoint import CheckpointError, open_expert
from wan_lite.config import ModelConfig
from wan_lite.lora import LoRASource, PartialLoRAWarning, delta, read_lora
from wan_lite.model import WanModel
from wan_lite.quantized.linear import quantize_linear_weight

BLOCK_LINEARS = [f"blocks.{i}.{m}" for i in range(2) for m in
                 ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                  "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")]
OTHER_LINEARS = ["text_embedding.0", "text_embedding.2", "time_embedding.2", "time_projection.1", "head.head"]


# ---------------------------------------------------------------------------------------------
# expert sources (the contract of wan_lite.checkpoint) and a loader, local to the tests


FloatSource = open_expert  # a folder's expert source carries scheme "none" and no 8-bit Linears


class EightBitSource:
    """A float source with every block Linear quantized per output channel (our W8A8 layout), in memory."""

    def __init__(self, base, scheme: str):
        self.base, self.scheme, self.path, self.config = base, scheme, base.path, base.config
        self.linears = {m: {"scheme": scheme, "smooth": False} for m in BLOCK_LINEARS}
        self.reads: list[str] = []

    def names(self):
        return self.base.names() + [f"{m}.weight_scale" for m in self.linears]

    def shapes(self):
        out = self.base.shapes()
        return {**out, **{f"{m}.weight_scale": out[f"{m}.weight"][:1] for m in self.linears}}

    def tensor(self, name):
        self.reads.append(name)
        module, _, leaf = name.rpartition(".")
        if module in self.linears and leaf in ("weight", "weight_scale"):
            q, scale = quantize_linear_weight(self.base.tensor(f"{module}.weight"), self.scheme)
            return q if leaf == "weight" else scale
        return self.base.tensor(name)

    def fingerprint(self):
        return f"{self.base.fingerprint()}-{self.scheme}"


def load_source(source, dtype=torch.float32) -> WanModel:
    """The project's generic loader of an expert source, in fp32 by default."""
    return checkpoint.load_source(source, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# random LoRAs and their files


def _shapes(cfg):
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in WanModel(cfg).state_dict().items()}


def random_factors(cfg, modules, rank: int, alpha: float | None, seed: int) -> dict:
    """official module -> (down (r, in), up (out, r), alpha); delta = alpha / r * up @ down, O(0.1) of W."""
    g = torch.Generator().manual_seed(seed)
    shapes = _shapes(cfg)
    out = {}
    for m in modules:
        n_out, n_in = shapes[f"{m}.weight"]
        down = torch.randn(rank, n_in, generator=g) / math.sqrt(n_in)
        up = 0.3 * torch.randn(n_out, rank, generator=g) / math.sqrt(rank)
        out[m] = (down, up, alpha)
    return out


def random_diffs(cfg, seed: int) -> dict:
    """LightX2V full deltas: our tensor name -> delta (weights, biases, a norm gain, modulation tables)."""
    g = torch.Generator().manual_seed(seed)
    shapes = _shapes(cfg)
    names = ["blocks.0.self_attn.q.weight", "blocks.1.ffn.2.weight", "blocks.0.cross_attn.o.bias",
             "blocks.1.self_attn.norm_k.weight", "blocks.0.modulation", "blocks.1.modulation", "head.head.bias",
             "time_embedding.0.weight"]
    return {n: 0.05 * torch.randn(shapes[n], generator=g) for n in names}


def _pair_keys(prefix: str, spelling: str) -> tuple[str, str]:
    return (f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight") if spelling == "down_up" else \
        (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")


def write_comfyui(path, factors, spelling="down_up", dtype=torch.float32):
    sd = {}
    for m, (down, up, alpha) in factors.items():
        kd, ku = _pair_keys(f"diffusion_model.{m}", spelling)
        sd[kd], sd[ku] = down.to(dtype), up.to(dtype)
        if alpha is not None:
            sd[f"diffusion_model.{m}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(sd, path)
    return path


def write_kohya(path, factors):
    sd = {}
    for m, (down, up, alpha) in factors.items():
        name = "lora_unet_" + m.replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, path)
    return path


def write_diffusers(path, factors):
    """PEFT keys, no alpha keys. An alpha goes into the header's lora_adapter_metadata as diffusers'
    save_lora_weights writes it (PEFT LoraConfig fields prefixed "transformer."); none: scale 1."""
    sd, alphas, modules = {}, set(), []
    for m, (down, up, alpha) in factors.items():
        modules.append(official_to_diffusers(f"{m}.weight").removesuffix(".weight"))
        sd[f"transformer.{modules[-1]}.lora_A.weight"], sd[f"transformer.{modules[-1]}.lora_B.weight"] = down, up
        alphas.add(alpha)
    (alpha,) = alphas
    rank = next(iter(factors.values()))[0].shape[0]
    meta = None if alpha is None else {"lora_adapter_metadata": json.dumps(
        {"transformer.lora_alpha": alpha, "transformer.r": rank, "transformer.alpha_pattern": {},
         "transformer.rank_pattern": {}, "transformer.use_rslora": False, "transformer.use_dora": False,
         "transformer.target_modules": modules, "transformer.peft_type": "LORA"})}
    save_file(sd, path, metadata=meta)
    return path


def write_lightx2v(path, diffs):
    suffix = {"weight": "diff", "bias": "diff_b", "modulation": "diff_m"}
    sd = {}
    for name, d in diffs.items():
        module, _, leaf = name.rpartition(".")
        sd[f"diffusion_model.{module}.{suffix[leaf]}"] = d
    save_file(sd, path)
    return path


def reference_merge(model, loras):
    """The official model with W += s * alpha/r * up @ down (float64 products) and full deltas added.
    `loras`: [(factors or diffs, strength)]."""
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for data, strength in loras:
            for key, value in data.items():
                if isinstance(value, tuple):
                    down, up, alpha = value
                    scale = (alpha / down.shape[0]) if alpha is not None else 1.0
                    d = (up.double() @ down.double()) * (strength * scale)
                    params[f"{key}.weight"] += d.float()
                else:
                    params[key] += strength * value
    return model


def _inputs(cfg):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(2, cfg.in_dim, 2, 4, 4, generator=g), torch.tensor([937.5, 300.0]),
            torch.randn(2, 7, cfg.text_dim, generator=g))


def _ours(source, cfg):
    with torch.no_grad():
        return load_source(source)(*_inputs(cfg))


def _official(model, cfg):
    with torch.no_grad():
        return official_forward(model, *_inputs(cfg))


# ---------------------------------------------------------------------------------------------
# formats


FORMATS = {  # name -> (writer, rank, alpha, modules); alpha != rank everywhere a format stores one
    "comfyui": (write_comfyui, 4, 3.0, BLOCK_LINEARS + OTHER_LINEARS),
    "comfyui-lora_A": (lambda p, f: write_comfyui(p, f, "A_B"), 8, 16.0, BLOCK_LINEARS),
    "kohya": (write_kohya, 8, 2.0, BLOCK_LINEARS + OTHER_LINEARS),
    "diffusers": (write_diffusers, 4, None, BLOCK_LINEARS + OTHER_LINEARS),
    "diffusers-metadata-alpha": (write_diffusers, 4, 6.0, BLOCK_LINEARS + OTHER_LINEARS),
}


def make_lora(tmp_path, tiny_cfg, fmt, seed=0):
    writer, rank, alpha, modules = FORMATS[fmt]
    factors = random_factors(tiny_cfg, modules, rank, alpha, seed)
    return writer(tmp_path / f"{fmt}-{seed}.safetensors", factors), factors


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_read_detects_format_rank_alpha_and_maps_every_key(tmp_path, tiny_cfg, fmt):
    path, factors = make_lora(tmp_path, tiny_cfg, fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fully matching file must not warn
        lora = read_lora(path, tiny_cfg)
    _, rank, alpha, modules = FORMATS[fmt]
    assert lora.format == fmt.split("-")[0]
    assert (lora.rank, lora.alpha) == (rank, alpha)
    assert set(lora.terms) == {f"{m}.weight" for m in modules}
    assert lora.used == (3 if alpha is not None and fmt != "diffusers-metadata-alpha" else 2) * len(modules)
    assert lora.ignored == ()
    term = lora.terms["blocks.1.ffn.2.weight"][0]
    assert term.scale == (alpha / rank if alpha is not None else 1.0) and term.shape == (tiny_cfg.dim, tiny_cfg.ffn_dim)


def test_lightx2v_full_deltas_map_to_weight_bias_and_modulation(tmp_path, tiny_cfg):
    diffs = random_diffs(tiny_cfg, 3)
    lora = read_lora(write_lightx2v(tmp_path / "diff.safetensors", diffs), tiny_cfg)
    assert lora.format == "comfyui" and lora.rank is None and lora.alpha is None
    assert set(lora.terms) == set(diffs)
    for name, d in diffs.items():
        torch.testing.assert_close(delta(name, lora, -0.5), -0.5 * d, rtol=0, atol=0)


def test_delta_is_strength_alpha_over_rank_up_down(tmp_path, tiny_cfg):
    path, factors = make_lora(tmp_path, tiny_cfg, "comfyui")
    lora = read_lora(path, tiny_cfg)
    down, up, alpha = factors["blocks.0.cross_attn.v"]
    want = 0.7 * (alpha / 4) * (up.double() @ down.double())
    got = delta("blocks.0.cross_attn.v.weight", lora, 0.7)
    assert got.dtype == torch.float32 and got.shape == (tiny_cfg.dim, tiny_cfg.dim)
    assert rel_error(got, want) < 1e-6
    assert delta("blocks.0.cross_attn.v.bias", lora, 0.7) is None
    assert delta("blocks.0.norm3.weight", lora, 0.7) is None


def test_bf16_factors_are_read(tmp_path, tiny_cfg):
    """Lightning files are bf16: the delta is computed in float32 from the bf16 factors."""
    factors = random_factors(tiny_cfg, BLOCK_LINEARS, 4, 4.0, 5)
    lora = read_lora(write_comfyui(tmp_path / "bf16.safetensors", factors, dtype=torch.bfloat16), tiny_cfg)
    down, up, _ = factors["blocks.1.self_attn.k"]
    want = up.bfloat16().float() @ down.bfloat16().float()
    assert rel_error(delta("blocks.1.self_attn.k.weight", lora), want) < 1e-6


# ---------------------------------------------------------------------------------------------
# merged forward against the reference merge on the official modules


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_merged_forward_matches_official_reference_merge(tmp_path, tiny_cfg, official_root, reference_experts, fmt):
    path, factors = make_lora(tmp_path, tiny_cfg, fmt)
    source = LoRASource(FloatSource(official_root.high), [(read_lora(path, tiny_cfg), 0.8)])
    ref = reference_merge(reference_experts[0], [(factors, 0.8)])
    got, want = _ours(source, tiny_cfg), _official(ref, tiny_cfg)
    assert_close_fp32(got, want)
    assert rel_error(want, _official(reference_experts[0], tiny_cfg)) > 1e-2  # the LoRA changes the output


def test_stacked_loras_with_negative_strength(tmp_path, tiny_cfg, official_root, reference_experts):
    """Three LoRAs (two formats of factors and full deltas), one at a negative strength, on the low expert."""
    a_path, a = make_lora(tmp_path, tiny_cfg, "comfyui", seed=1)
    b_path, b = make_lora(tmp_path, tiny_cfg, "kohya", seed=2)
    diffs = random_diffs(tiny_cfg, 4)
    c_path = write_lightx2v(tmp_path / "diff.safetensors", diffs)
    loras = [(read_lora(a_path, tiny_cfg), 1.0), (read_lora(b_path, tiny_cfg), -0.6),
             (read_lora(c_path, tiny_cfg), 0.5)]
    source = LoRASource(FloatSource(official_root.low), loras)
    ref = reference_merge(reference_experts[1], [(a, 1.0), (b, -0.6), (diffs, 0.5)])
    assert_close_fp32(_ours(source, tiny_cfg), _official(ref, tiny_cfg))


def test_lora_read_for_another_config_is_rechecked(tmp_path, tiny_cfg, official_root):
    """LoRASource rereads a LoRA checked against another config (here 3 layers) against the source's own,
    so a LoRA checked for the wrong model cannot slip through; the default config is one A14B expert."""
    path, _ = make_lora(tmp_path, tiny_cfg, "comfyui")
    with pytest.raises(CheckpointError, match="do not fit this expert"):
        read_lora(path)  # A14B: width 5120
    three = read_lora(path, ModelConfig.tiny(num_layers=3))
    source = LoRASource(FloatSource(official_root.high), [(three, 1.0)])
    assert source.loras[0][0].config == tiny_cfg and source.loras[0][0].fingerprint() == three.fingerprint()


def test_source_contract_and_fingerprint(tmp_path, tiny_cfg, official_root):
    base = FloatSource(official_root.high)
    path, _ = make_lora(tmp_path, tiny_cfg, "comfyui")
    lora = read_lora(path, tiny_cfg)
    src = LoRASource(base, [(lora, 1.0)])
    assert (src.path, src.config, src.scheme, src.linears, src.names()) == \
        (base.path, base.config, "none", {}, base.names())
    fps = {src.fingerprint(), LoRASource(base, [(lora, 0.5)]).fingerprint(), base.fingerprint(),
           LoRASource(base, [(read_lora(make_lora(tmp_path, tiny_cfg, "kohya")[0], tiny_cfg), 1.0)]).fingerprint()}
    assert len(fps) == 4
    assert src.fingerprint() == LoRASource(base, [(read_lora(path, tiny_cfg), 1.0)]).fingerprint()
    untouched = "blocks.0.norm3.weight"
    assert torch.equal(src.tensor(untouched), base.tensor(untouched))
    assert src.tensor("blocks.0.ffn.0.weight").dtype == base.tensor("blocks.0.ffn.0.weight").dtype


# ---------------------------------------------------------------------------------------------
# against diffusers' own LoRA loading


def test_matches_diffusers_lora_loading(tmp_path, tiny_cfg, diffusers_root):
    """WanPipeline.load_lora_weights: a PEFT file (lora_alpha 6 in its metadata, rank 4) into transformer
    (high), a Lightning-style ComfyUI file (alpha 5, rank 8) into transformer_2 (low,
    load_into_transformer_2=True). Ours: LoRASource over the same diffusers-layout experts."""
    from diffusers import WanPipeline, WanTransformer3DModel

    high_path, _ = make_lora(tmp_path, tiny_cfg, "diffusers-metadata-alpha", seed=5)  # alpha 6, rank 4
    low_factors = random_factors(tiny_cfg, BLOCK_LINEARS, 8, 5.0, 6)  # diffusers converts only block Linears
    low_path = write_comfyui(tmp_path / "low.safetensors", low_factors)
    transformers = [WanTransformer3DModel.from_pretrained(p).float().eval() for p in (diffusers_root.high,
                                                                                       diffusers_root.low)]
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=transformers[0],
                       transformer_2=transformers[1], boundary_ratio=0.875)
    pipe.load_lora_weights(str(high_path), adapter_name="high")
    pipe.load_lora_weights(str(low_path), adapter_name="low", load_into_transformer_2=True)
    x, t, ctx = _inputs(tiny_cfg)
    for root_path, lora_path, transformer in ((diffusers_root.high, high_path, pipe.transformer),
                                              (diffusers_root.low, low_path, pipe.transformer_2)):
        source = LoRASource(FloatSource(root_path), [(read_lora(lora_path, tiny_cfg), 1.0)])
        with torch.no_grad():
            want = diffusers_forward(transformer, x, t, ctx)
            base = diffusers_forward(WanTransformer3DModel.from_pretrained(root_path).float().eval(), x, t, ctx)
        assert_close_fp32(_ours(source, tiny_cfg), want)
        assert rel_error(want, base) > 1e-2  # diffusers applied the LoRA


# ---------------------------------------------------------------------------------------------
# 8-bit experts: merged before requantizing


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_8bit_source_with_lora_within_the_schemes_usual_error(tmp_path, tiny_cfg, official_root, scheme):
    """The 8-bit expert with a LoRA merged against the float merged model. Its error is two roundings: the
    8-bit file's (`usual`: 8-bit vs float, no LoRA) and the requantization's (`direct`: the float merged
    model quantized once), so about their root-sum-square. Measured on the tiny expert over 3 seeds and 2
    formats: int8 usual 3.2e-3, direct 2.8-4.3e-3, ours 4.3-5.5e-3; fp8 1.6e-2, 1.5-1.8e-2, 2.0-2.6e-2."""
    path, _ = make_lora(tmp_path, tiny_cfg, "comfyui", seed=8)
    lora = read_lora(path, tiny_cfg)
    float_base = FloatSource(official_root.high)
    float_lora = LoRASource(float_base, [(lora, 1.0)])
    float_merged = _ours(float_lora, tiny_cfg)
    quant = EightBitSource(float_base, scheme)
    usual = rel_error(_ours(quant, tiny_cfg), _ours(float_base, tiny_cfg))
    direct = rel_error(_ours(EightBitSource(float_lora, scheme), tiny_cfg), float_merged)
    merged = LoRASource(quant, [(lora, 1.0)])
    err = rel_error(_ours(merged, tiny_cfg), float_merged)
    assert 0 < err < 1.25 * math.hypot(usual, direct) and err < 2 * usual, (err, usual, direct)
    assert merged._pending == {}  # nothing held after the load


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_8bit_weight_and_scale_come_from_one_requantization(tmp_path, tiny_cfg, official_root, scheme):
    path, _ = make_lora(tmp_path, tiny_cfg, "comfyui-lora_A", seed=9)
    lora = read_lora(path, tiny_cfg)
    base = EightBitSource(FloatSource(official_root.high), scheme)
    module = "blocks.1.cross_attn.q"
    w = base.tensor(f"{module}.weight").float() * base.tensor(f"{module}.weight_scale")[:, None]
    want_q, want_s = quantize_linear_weight(w + delta(f"{module}.weight", lora, 0.9), scheme)
    # this test's merge (a matmul of the factors) and LoRASource's are two code paths: a value on a rounding
    # boundary may land one 8-bit step away, the scales a float rounding away
    step = want_s[:, None] * (1.0 if scheme == "int8" else 32.0)  # e4m3's widest step, at 256..448

    def requantized(q: torch.Tensor) -> None:
        assert q.dtype == want_q.dtype and ((q.float() - want_q.float()).abs() * want_s[:, None] <= step).all()
        assert (q.float() == want_q.float()).float().mean() > 0.99

    for order in (("weight", "weight_scale"), ("weight_scale", "weight")):
        src = LoRASource(base, [(lora, 0.9)])
        base.reads.clear()
        got = {leaf: src.tensor(f"{module}.{leaf}") for leaf in order}
        requantized(got["weight"])
        torch.testing.assert_close(got["weight_scale"], want_s, rtol=1e-6, atol=0)
        assert base.reads == [f"{module}.weight", f"{module}.weight_scale"]  # dequantized once for both
        assert src._pending == {}
    src = LoRASource(base, [(lora, 0.9)])
    first = src.tensor(f"{module}.weight")
    requantized(first)
    assert torch.equal(src.tensor(f"{module}.weight").float(), first.float())  # a second read recomputes the same
    only_a = LoRASource(base, [(read_lora(write_lightx2v(tmp_path / "d.safetensors",
                                                         {"blocks.0.ffn.0.bias": torch.ones(64)}), tiny_cfg), 1.0)])
    for name in ("blocks.0.ffn.0.weight", "blocks.0.ffn.0.weight_scale"):  # the base's, not requantized
        assert torch.equal(only_a.tensor(name).float(), base.tensor(name).float())


def test_smoothquant_linears_are_refused(tmp_path, tiny_cfg, official_root):
    base = EightBitSource(FloatSource(official_root.high), "int8")
    base.linears["blocks.0.self_attn.q"]["smooth"] = True
    path, _ = make_lora(tmp_path, tiny_cfg, "comfyui")
    with pytest.raises(CheckpointError, match="SmoothQuant"):
        LoRASource(base, [(read_lora(path, tiny_cfg), 1.0)])


# ---------------------------------------------------------------------------------------------
# files that do not fit


def test_keys_matching_nothing_are_an_error_naming_examples_and_format(tmp_path, tiny_cfg):
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    save_file(sdxl, tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match=r"none of its 2 keys.*lora_unet_down_blocks_0.*another model family"):
        read_lora(tmp_path / "sdxl.safetensors", tiny_cfg)
    unknown = {"diffusion_model.blocks.0.attn.qkv.lora_down.weight": torch.zeros(4, 32),
               "diffusion_model.blocks.0.attn.qkv.lora_up.weight": torch.zeros(96, 4)}
    save_file(unknown, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv.*ComfyUI / Lightning format"):
        read_lora(tmp_path / "other.safetensors", tiny_cfg)


def test_i2v_lora_is_refused_by_name(tmp_path, tiny_cfg):
    factors = random_factors(tiny_cfg, BLOCK_LINEARS, 4, 4.0, 1)
    path = write_comfyui(tmp_path / "i2v.safetensors", factors)
    sd = load_file(path)
    sd["diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"] = torch.zeros(4, 32)
    sd["diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight"] = torch.zeros(32, 4)
    save_file(sd, tmp_path / "i2v.safetensors")
    with pytest.raises(CheckpointError, match=r"Wan I2V.*k_img"):
        read_lora(tmp_path / "i2v.safetensors", tiny_cfg)


def test_lora_of_another_width_is_refused_by_name(tmp_path):
    """Factors of Wan2.2-TI2V-5B (width 3072) against the A14B config: named, with an example."""
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 3072),
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(3072, 2)}
    save_file(sd, tmp_path / "ti2v.safetensors")
    with pytest.raises(CheckpointError, match=r"width 3072 \(Wan2.2-TI2V-5B\).*width 5120.*self_attn\.q"):
        read_lora(tmp_path / "ti2v.safetensors")


def test_partial_file_warns_with_counts(tmp_path, tiny_cfg):
    factors = random_factors(tiny_cfg, BLOCK_LINEARS[:3], 4, 4.0, 1)
    path = write_comfyui(tmp_path / "p.safetensors", factors)
    sd = load_file(path)
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    sd["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(4, 32)  # no block 7 in the tiny
    sd["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = torch.zeros(32, 4)
    save_file(sd, path)
    with pytest.warns(PartialLoRAWarning, match=r"used 9 of 12 keys; ignored 3"):
        lora = read_lora(path, tiny_cfg)
    assert lora.used == 9 and len(lora.ignored) == 3 and len(lora.terms) == 3


def test_dora_and_missing_file_are_refused(tmp_path, tiny_cfg):
    factors = random_factors(tiny_cfg, BLOCK_LINEARS[:1], 4, 4.0, 1)
    path = write_comfyui(tmp_path / "dora.safetensors", factors)
    sd = load_file(path)
    sd["diffusion_model.blocks.0.self_attn.q.dora_scale"] = torch.ones(32, 1)
    save_file(sd, path)
    with pytest.raises(CheckpointError, match="DoRA"):
        read_lora(path, tiny_cfg)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_lora(tmp_path / "nope.safetensors", tiny_cfg)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a safetensors or GGUF file"):
        read_lora(tmp_path / "junk.safetensors", tiny_cfg)


def test_an_expert_given_as_a_lora_is_refused_by_name(tmp_path, tiny_cfg):
    """A trial user passed an expert file as --lora-high: a GGUF one was called damaged, a safetensors one
    'unknown layer names'. Both are named as experts now, from the header."""
    from builders import random_expert
    from builders_files import official_state, write_gguf, write_safetensors

    state = official_state(random_expert(tiny_cfg, 1))
    for path in (write_safetensors(state, tmp_path / "expert.safetensors", torch.float16)[0],
                 write_gguf(state, tmp_path / "expert.gguf")[0]):
        with pytest.raises(CheckpointError, match=r"expert.*not a LoRA: give it as --high / --low"):
            read_lora(path, tiny_cfg)


def test_peft_metadata_alpha_pattern_is_refused_and_rslora_scales_by_sqrt_rank(tmp_path, tiny_cfg):
    factors = random_factors(tiny_cfg, BLOCK_LINEARS[:2], 4, None, 1)
    path = write_diffusers(tmp_path / "peft.safetensors", factors)
    sd = load_file(path)
    for extra, check in (({"transformer.alpha_pattern": {"to_q": 2}, "transformer.lora_alpha": 8}, None),
                         ({"transformer.use_rslora": True, "transformer.lora_alpha": 8}, 8 / 2)):
        save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(extra)})
        if check is None:
            with pytest.raises(CheckpointError, match="alpha_pattern"):
                read_lora(path, tiny_cfg)
        else:
            lora = read_lora(path, tiny_cfg)
            assert lora.alpha == 8 and lora.terms["blocks.0.self_attn.q.weight"][0].scale == check  # 8 / sqrt(4)
