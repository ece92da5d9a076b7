"""The official Wan2.2 modules (PyPI `wan22`), loaded without the `wan` package `__init__`.

`wan/__init__.py` imports every pipeline and their heavy dependencies (and `wan22` is installed with
`--no-deps`), so each module file the tests need is loaded on its own with importlib, under stub
parent packages (`wan`, `wan.modules`, `wan.utils`) that make the relative imports resolve.

The official `flash_attention` asserts CUDA and flash-attn. It is replaced by an SDPA stand-in of
the same signature that masks keys past `k_lens` and computes in q's dtype (fp32 stays fp32), so the
official forward runs on the CPU as the exact reference the tests compare against.

`official()` returns a cached namespace with `model`, `attention`, `t5`, `tokenizers`, `vae2_1`,
`fm_solvers_unipc`. Each module is imported on first access; one that fails to import raises an
ImportError naming the file and the cause when (and only when) that attribute is used.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

# module attribute -> (dotted name, path under the `wan` package)
_MODULES = {
    "attention": ("wan.modules.attention", "modules/attention.py"),
    "model": ("wan.modules.model", "modules/model.py"),
    "tokenizers": ("wan.modules.tokenizers", "modules/tokenizers.py"),
    "t5": ("wan.modules.t5", "modules/t5.py"),
    "vae2_1": ("wan.modules.vae2_1", "modules/vae2_1.py"),
    "fm_solvers_unipc": ("wan.utils.fm_solvers_unipc", "utils/fm_solvers_unipc.py"),
}


@functools.cache
def wan_root() -> Path:
    """The installed `wan` package folder, found without importing it (cached: once the stub
    packages are registered, `find_spec("wan")` no longer works)."""
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the official Wan2.2 code is not installed: pip install --no-deps wan22 "
            "(it declares flash_attn, which cannot build without CUDA)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def sdpa_flash_attention(
    q,
    k,
    v,
    q_lens=None,
    k_lens=None,
    dropout_p=0.0,
    softmax_scale=None,
    q_scale=None,
    causal=False,
    window_size=(-1, -1),
    deterministic=False,
    dtype=torch.bfloat16,
    version=None,
):
    """Stand-in for the official `flash_attention`: q/k/v (B, L, N, D) -> (B, Lq, N, D) in q's dtype.

    Keys at positions >= k_lens[b] are masked out, as the varlen flash kernel drops them. Computes in
    q's dtype (the official kernel casts fp32 to bf16; the tests want an exact fp32 reference).
    """
    if q_lens is not None or dropout_p or causal or tuple(window_size) != (-1, -1):
        raise NotImplementedError("the SDPA stand-in supports only the arguments the Wan DiT uses")
    out_dtype = q.dtype
    if q_scale is not None:
        q = q * q_scale
    q, k, v = (u.to(out_dtype).transpose(1, 2) for u in (q, k, v))  # (B, N, L, D)
    mask = None
    if k_lens is not None:
        positions = torch.arange(k.size(2), device=k.device)
        mask = positions[None, :] < k_lens.to(k.device)[:, None]  # (B, Lk)
        mask = mask[:, None, None, :]  # (B, 1, 1, Lk)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
    return x.transpose(1, 2).to(out_dtype)  # (B, Lq, N, D)


def _stub_packages(root: Path) -> None:
    """Register empty `wan`, `wan.modules`, `wan.utils` packages so relative imports resolve."""
    for name, sub in (("wan", ""), ("wan.modules", "modules"), ("wan.utils", "utils")):
        existing = sys.modules.get(name)
        if existing is not None and getattr(existing, "__wan_lite_stub__", False):
            continue
        if existing is not None:
            # The real package was imported elsewhere; replacing it would break that importer.
            raise ImportError(
                f"{name} is already imported from its real __init__; tests/reference.py loads the "
                "module files directly and needs the stub packages"
            )
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root / sub)]
        pkg.__wan_lite_stub__ = True
        sys.modules[name] = pkg
        if "." in name:
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, pkg)


@contextlib.contextmanager
def _cpu_default_device():
    """t5.py evaluates `torch.cuda.current_device()` as a default argument when its class is defined,
    which raises on a CPU-only torch: answer "cpu" while the module executes."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: torch.device("cpu")
    try:
        yield
    finally:
        torch.cuda.current_device = saved


def _load(dotted: str, path: Path) -> types.ModuleType:
    if dotted in sys.modules:
        return sys.modules[dotted]
    spec = importlib.util.spec_from_file_location(dotted, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[dotted] = module
    try:
        with _cpu_default_device():
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[dotted]
        raise
    parent, _, child = dotted.rpartition(".")
    setattr(sys.modules[parent], child, module)
    return module


class _Official:
    """Lazy namespace of the official modules; a module is imported when its attribute is read."""

    def __init__(self, root: Path):
        self.root = root
        self._errors: dict[str, BaseException] = {}

    def __getattr__(self, attr: str) -> types.ModuleType:
        if attr not in _MODULES:
            raise AttributeError(attr)
        if attr in self._errors:
            raise self._failure(attr)
        dotted, rel = _MODULES[attr]
        try:
            module = _load(dotted, self.root / rel)
        except Exception as exc:  # noqa: BLE001 - recorded and re-raised with the file named
            self._errors[attr] = exc
            raise self._failure(attr) from exc
        if attr in ("attention", "model"):
            # model.py does `from .attention import flash_attention`: patch both namespaces.
            module.flash_attention = sdpa_flash_attention
            if attr == "model":
                self.attention  # noqa: B018 - ensure the attention module is patched as well
        self.__dict__[attr] = module  # cache: later reads skip __getattr__
        return module

    def _failure(self, attr: str) -> ImportError:
        exc = self._errors[attr]
        return ImportError(
            f"official module wan/{_MODULES[attr][1]} failed to import "
            f"({type(exc).__name__}: {exc}); the tests that use official().{attr} cannot run"
        )


@functools.cache
def official() -> _Official:
    """The official modules as a cached namespace (see the module docstring)."""
    root = wan_root()
    _stub_packages(root)
    return _Official(root)
