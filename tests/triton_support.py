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
