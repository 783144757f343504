"""Shared helpers for the Triton kernels: input checks, interpreter detection, jit helpers.

Why: every launcher must reject bad input with the same clear messages (device, dtype,
shape) and must work under ``TRITON_INTERPRET=1`` on CPU tensors, whatever the order in
which modules were imported.

Layout policy: non-contiguous inputs are made contiguous (a copy), never rejected.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernel(fn):  # type: ignore[no-untyped-def]
    """Return ``fn`` ready to launch, or say clearly why the interpreter cannot run it.

    ``@triton.jit`` chooses compiled or interpreted when the function is decorated (at import),
    and triton's own helpers (tl.sum, tl.cumsum, ...) are decorated when triton is first
    imported. So ``TRITON_INTERPRET=1`` works only if it was set before triton was imported.
    """
    if interpret_mode():
        from triton.runtime.interpreter import InterpretedFunction

        if not (isinstance(fn, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)):
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after triton (or kernels.triton_*) was imported; "
                "set it in the environment or in tests/conftest.py before anything imports triton"
            )
    return fn


def check_float(name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Validate a floating input (device, dtype, rank) and return it contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    check_device(name, t)
    return t.contiguous()


def check_labels(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Validate a label tensor in {-1, 0, +1} (any int or float dtype except bool)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be an int or float tensor in {{-1,0,1}}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the features are on {device}")
    return t.contiguous()


def check_device(name: str, t: torch.Tensor) -> None:
    """CUDA tensors, or any device when the interpreter is on."""
    if t.is_cuda or interpret_mode():
        return
    raise RuntimeError(
        f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
        "(or TRITON_INTERPRET=1 to run them on the CPU interpreter; or use backend='torch')"
    )


def same_device(**tensors: torch.Tensor) -> None:
    """Raise when the named tensors live on different devices."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Output dtype for mixed float inputs (e.g. bf16 activations with fp32 X under autocast).

    The kernels load every operand and accumulate in float32 whatever its dtype, so mixed
    inputs need no copies; the output takes torch's promotion of the inputs' dtypes.
    """
    out = tensors[0].dtype
    for t in tensors[1:]:
        out = torch.promote_types(out, t.dtype)
    return out


def block(n: int, lo: int = 16, hi: int = 64) -> int:
    """Power-of-two tile size covering ``n`` when small, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


@triton.jit
def tanh_f32(x):
    """Accurate float32 tanh from exp (no tanh in tl; libdevice is not in the interpreter).

    Small |x| use the odd Taylor series to x^9 (no cancellation), the rest
    sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) (never overflows).
    """
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(ax < 0.2, small, big)


def aot_compile(fn, signature: dict, constexprs: dict, arch: int = 90, num_warps: int = 4) -> dict:  # type: ignore[no-untyped-def]
    """Compile a ``@triton.jit`` kernel for a CUDA arch without a GPU; report ptxas registers/spills.

    Why: the CPU interpreter accepts programs the GPU compiler rejects (dot shapes, types), so
    tests compile every kernel for sm_90 offline. Needs TRITON_INTERPRET unset in this process.
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = {**signature, **{k: "constexpr" for k in constexprs}}
    k = triton.compile(
        ASTSource(fn, full, constexprs), target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
        fh.write(k.asm["ptx"])
        fh.flush()
        res = subprocess.run(
            [ptxas, f"-arch=sm_{arch}a", "-v", fh.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        )
    regs = re.findall(r"Used (\d+) registers", res.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
    return {
        "kernel": fn.__name__,
        "regs": int(regs[0]) if regs else None,
        "spill_store_bytes": int(spills[0]) if spills else 0,
    }


def _aot_main(argv: list[str]) -> int:
    """``python -m kernels._triton_common MODULE [fp32,bf16]``: compile MODULE.aot_specs() for sm_90."""
    import importlib
    import json

    if interpret_mode():
        raise SystemExit("unset TRITON_INTERPRET for the offline compile check")
    mod = importlib.import_module(argv[0])
    for ptr in (argv[1] if len(argv) > 1 else "fp32,bf16").split(","):
        for fn, sig, const in mod.aot_specs(f"*{ptr}"):
            print(json.dumps({"dtype": ptr, **aot_compile(fn, sig, const)}), flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_aot_main(sys.argv[1:]))
