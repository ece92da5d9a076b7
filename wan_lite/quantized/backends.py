"""Library backends: optimum-quanto (quanto-int8, quanto-fp8) and bitsandbytes NF4 (nf4).

Each library is an optional extra, imported only when its scheme is used; a missing one raises an
ImportError that names the extra (`pip install "wan-lite[quanto]"` / `"wan-lite[bnb]"`).

- quanto-int8 / quanto-fp8: per-output-channel weight quantization done by quanto itself
  (`quantize(module, weights=qint8 | qfloat8)` + `freeze`) on bf16 weights, weight-only at runtime
  (quanto's QLinear). Our folders also carry `quanto_qmap.json`, so they are quanto folders too.
  `load_quanto_folder` reads the quanto checkpoints people already have: a safetensors state dict
  (one file or shards + index) with `*.weight._data` / `*.weight._scale` keys and a
  `quanto_qmap.json` (what `quantization_map` + `safetensors` save, e.g. optimum-quanto's
  QuantizedDiffusersModel), in official or diffusers key names.
- nf4: bitsandbytes 4-bit NormalFloat, blocksize 64 with double-quantized absmax, for 12 GB and
  smaller cards. Converting runs on the CPU; running needs CUDA (bnb's Linear4bit), and loading on
  another device raises.

Deliberately unsupported: quanto activation quantization, quanto int4/int2, bnb LLM.int8().
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from ..config import ModelConfig
from ..model import WanModel
from .format import FIX_HINT, QuantFormatError, check_shard, config_from_dict
from .linear import _set_module

QUANTO_QTYPES = {"quanto-int8": "qint8", "quanto-fp8": "qfloat8_e4m3fn"}  # scheme -> quanto qtype name
NF4_BLOCKSIZE = 64


def require_quanto():
    try:
        import optimum.quanto as quanto
    except ImportError as e:
        raise ImportError('the quanto-int8 / quanto-fp8 schemes need optimum-quanto: pip install "wan-lite[quanto]"'
                          ) from e
    return quanto


def require_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError('the nf4 scheme needs bitsandbytes: pip install "wan-lite[bnb]"') from e
    return bnb


# ---------------------------------------------------------------------------------------------
# offline: one Linear's weight -> the tensors stored for it (suffixes under the module name)


def quanto_quantize_weight(weight: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """quanto's own quantization of one (N, K) weight, cast to bf16 first as quanto users do."""
    quanto = require_quanto()
    holder = nn.Module()
    holder.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.bfloat16)
    holder.linear.weight.data = weight.to(torch.bfloat16)
    quanto.quantize(holder, weights=getattr(quanto, QUANTO_QTYPES[scheme]))
    quanto.freeze(holder)
    return {k.removeprefix("linear."): v.detach().clone() for k, v in holder.state_dict().items()}


def nf4_quantize_weight(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """bitsandbytes NF4 of one (N, K) weight (bf16 first): packed uint8 data + its serialized QuantState."""
    bnb = require_bnb()
    data, state = bnb.functional.quantize_4bit(weight.to(torch.bfloat16), blocksize=NF4_BLOCKSIZE,
                                               quant_type="nf4", compress_statistics=True)
    out = {"weight": data}
    out.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return out


# ---------------------------------------------------------------------------------------------
# loading


def _cast_input(dtype):
    """Forward pre-hook: the lead's model hands a quantized Linear float32 or bf16; these modules want dtype."""
    return lambda module, args: (args[0].to(dtype), *args[1:])


def _cast_kept(model: nn.Module, skip: set[str], dtype: torch.dtype) -> None:
    """Hold the non-quantized parameters in the dtype wan-lite runs them in (float32 or `dtype`)."""
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] not in skip:
            p.data = p.data.to(WanModel.param_dtype(name, dtype))


def load_quanto(cfg: ModelConfig, state: dict[str, torch.Tensor], qmap: dict[str, dict], *, dtype, device, where: Path):
    """A WanModel whose `qmap` Linears are quanto QLinears, from a quanto state dict in official names."""
    quanto = require_quanto()
    if torch.device(device).type == "cpu":  # safetensors hands out views of the file at 8-byte offsets;
        state = {k: v.clone() for k, v in state.items()}  # torch's CPU int8 kernel crashes on unaligned data
    with torch.device("meta"):
        model = WanModel(cfg)
    for name in qmap:
        model.get_submodule(name).to(dtype)  # quanto's QLinear computes in its float weight's dtype
    quanto.requantize(model, state, qmap, device=torch.device(device))
    expected = {k for k in model.state_dict() if not k.endswith(("input_scale", "output_scale"))}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or extra:
        raise QuantFormatError(f"{where}: the quanto state dict does not match the model (missing "
                               f"{missing[:4]}, unexpected {extra[:4]}): {FIX_HINT}")
    _cast_kept(model, set(qmap), dtype)
    for name in qmap:
        model.get_submodule(name).register_forward_pre_hook(_cast_input(dtype))
    return model.eval().requires_grad_(False)


def load_nf4(cfg, state: dict[str, torch.Tensor], linears, *, dtype, device, where: Path):
    """A WanModel whose `linears` are bitsandbytes Linear4bit (NF4); CUDA only."""
    if torch.device(device).type != "cuda":
        raise RuntimeError(f"{where} is nf4 (bitsandbytes 4-bit), which runs on CUDA only: load it with "
                           "device='cuda', or convert an int8 / fp8 expert for this device")
    bnb = require_bnb()
    with torch.device("meta"):
        model = WanModel(cfg)
    kept = {k for k in model.state_dict() if k.rpartition(".")[0] not in linears}
    for name in linears:
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=dtype,
                                quant_type="nf4", device="meta")
        stats = {k[len(name) + len(".weight."):]: state.pop(k) for k in list(state)
                 if k.startswith(f"{name}.weight.")}
        new.weight = bnb.nn.Params4bit.from_prequantized(state.pop(f"{name}.weight"), stats, device=device,
                                                         module=new)
        if old.bias is not None:
            new.bias = nn.Parameter(state.pop(f"{name}.bias").to(device, dtype), requires_grad=False)
        new.register_forward_pre_hook(_cast_input(dtype))
        _set_module(model, name, new)
    if set(state) != kept:
        raise QuantFormatError(f"{where}: the shards do not hold the model's tensors (missing "
                               f"{sorted(kept - set(state))[:4]}, unexpected {sorted(set(state) - kept)[:4]}): "
                               f"{FIX_HINT}")
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False, assign=True)
    _cast_kept(model, set(linears), dtype)
    return model.eval().requires_grad_(False)


def load_expert(path: Path, meta: dict, *, dtype, device):
    """A wan-lite folder of a library scheme (quanto-int8, quanto-fp8, nf4)."""
    for entry in meta["shards"]:
        check_shard(path, entry, meta["scheme"])
    state = {}
    for entry in meta["shards"]:
        with safe_open(path / entry["file"], framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    cfg = config_from_dict(meta["config"])
    if meta["scheme"] == "nf4":
        return load_nf4(cfg, state, set(meta["linears"]), dtype=dtype, device=device, where=path)
    qmap = {name: {"weights": QUANTO_QTYPES[meta["scheme"]], "activations": "none"} for name in meta["linears"]}
    return load_quanto(cfg, state, qmap, dtype=dtype, device=device, where=path)
