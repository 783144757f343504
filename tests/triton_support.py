"""Shared checks for the Triton kernel tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def assert_compiles_like_eager(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
    """torch.compile(fullgraph=True) traces through the custom op (fake impl + registered
    autograd) and gives bit-identical outputs and input gradients."""
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    out, out_c = fn(*a), torch.compile(fn, backend="aot_eager", fullgraph=True)(*b)
    out.sum().backward()
    out_c.sum().backward()
    assert torch.equal(out, out_c)
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(a, b))


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|, computed in float64."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_op_against_float64(
    op: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    ins: Sequence[torch.Tensor],
    names: Sequence[str],
    out_shape: tuple[int, ...],
    dtypes: Sequence[torch.dtype] | None = None,
    eager: bool = False,
) -> None:
    """``op`` (a Triton kernel) vs ``reference`` run in float64 on the same rounded inputs:
    output and every input gradient within TOL of their dtypes.

    ``dtypes`` casts the inputs one by one (mixed inputs: the output promotes, each gradient
    keeps its input's dtype). ``eager`` (large shapes) also allows twice what ``reference``
    itself gets wrong in the inputs' own dtype.
    """
    ins = list(ins)
    if dtypes is not None:
        ins = [t.to(d) for t, d in zip(ins, dtypes)]
    dtype = ins[0].dtype
    for t in ins[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    tri = [t.clone().requires_grad_() for t in ins]
    ref = [t.double().requires_grad_() for t in ins]
    out, expect = op(*tri), reference(*ref)
    assert out.shape == out_shape and out.dtype == dtype, (out.shape, out.dtype)
    g = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
    out.backward(g)
    expect.backward(g.double())
    tol = {k: TOL[t.dtype] for k, t in zip(names, ins)}
    tol["out"] = TOL[dtype]
    if eager:
        eag = [t.clone().requires_grad_() for t in ins]
        eout = reference(*eag)
        eout.backward(g)
        tol["out"] = max(tol["out"], 2 * rel_err(eout, expect))
        for k, t, r in zip(names, eag, ref):
            tol[k] = max(tol[k], 2 * rel_err(t.grad, r.grad))
    assert rel_err(out, expect) <= tol["out"], ("out", rel_err(out, expect))
    for name, t, r in zip(names, tri, ref):
        assert t.grad.dtype == t.dtype
        assert rel_err(t.grad, r.grad) <= tol[name], (name, rel_err(t.grad, r.grad), tol[name])
