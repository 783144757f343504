"""Triton pair co-occurrence head vs a float64 materialized reference (outputs and all gradients).

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), at small odd shapes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from triton_support import assert_compiles_like_eager, check_op_against_float64  # noqa: E402
from triton_support import rel_err as _rel  # noqa: E402

from kernels.triton_pairs import pair_cooccurrence_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference_pair_cooccurrence(U, V, A, beta, c):
    """DESIGN §2.5 identity computed literally with a Python loop over pairs (slow, obvious)."""
    C = U.shape[1]
    q, p = [], 0
    for i in range(C):
        for j in range(i + 1, C):
            q.append((A[p] * torch.relu(U[:, i] + V[:, j] + beta)).sum(-1) + c[p])
            p += 1
    return torch.stack(q, dim=1)


def _inputs(B, C, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = C * (C - 1) // 2
    ts = (
        torch.randn(B, C, D, generator=g),
        torch.randn(B, C, D, generator=g),
        torch.randn(P, D, generator=g),
        torch.randn(D, generator=g),
        torch.randn(P, generator=g),
    )
    return [t.to(DEV, dtype) for t in ts]


def check_against_reference(B, C, D, dtype, dtypes=None, eager=False):
    check_op_against_float64(pair_cooccurrence_triton, reference_pair_cooccurrence, _inputs(B, C, D, dtype),
                             ("U", "V", "A", "beta", "c"), (B, C * (C - 1) // 2), dtypes, eager)


@pytest.mark.parametrize(
    "B,C,D", [(1, 2, 1), (2, 7, 65), (3, 18, 5)], ids=["one-pair", "above-D-block", "above-pair-block"]
)
def test_matches_reference_float32(B, C, D):
    check_against_reference(B, C, D, torch.float32)


def test_matches_reference_bfloat16():
    check_against_reference(2, 5, 13, torch.bfloat16)


def test_mixed_dtypes_promote():
    bf, f32 = torch.bfloat16, torch.float32
    check_against_reference(2, 5, 7, f32, dtypes=(bf, bf, f32, f32, bf))


def test_pair_order_is_row_major_upper_triangle():
    # A one-hot per pair picks out relu(U[i] + V[j]) in the pair's own slot only
    C, D = 4, 1
    U = torch.zeros(1, C, D, device=DEV)
    V = torch.arange(C, dtype=torch.float32, device=DEV).view(1, C, 1) * 10
    U[0, :, 0] = torch.arange(C, dtype=torch.float32, device=DEV)
    P = C * (C - 1) // 2
    q = pair_cooccurrence_triton(
        U, V, torch.ones(P, D, device=DEV), torch.zeros(D, device=DEV), torch.zeros(P, device=DEV)
    )
    expect = [i + 10 * j for i in range(C) for j in range(i + 1, C)]  # (0,1),(0,2),(0,3),(1,2),...
    assert q[0].tolist() == expect


def test_non_contiguous_inputs_are_copied():
    U, V, A, beta, c = _inputs(2, 5, 6, torch.float32)
    At = A.t().contiguous().t()
    assert not At.is_contiguous()
    out = pair_cooccurrence_triton(U, V, At, beta, c)
    expect = reference_pair_cooccurrence(*(t.double() for t in (U, V, A, beta, c)))
    assert _rel(out, expect) <= 1e-5


def test_errors():
    U, V, A, beta, c = _inputs(2, 5, 6, torch.float32)
    with pytest.raises(TypeError, match="A must be float32"):
        pair_cooccurrence_triton(U, V, A.double(), beta, c)
    with pytest.raises(ValueError, match=r"expected A \(10,6\)"):
        pair_cooccurrence_triton(U, V, A[:9], beta, c)
    with pytest.raises(ValueError, match="must match U"):
        pair_cooccurrence_triton(U, V[:, :4], A, beta, c)


def test_cpu_tensors_without_interpreter_are_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    U, V, A, beta, c = (t.cpu() for t in _inputs(1, 3, 2, torch.float32))
    with pytest.raises(RuntimeError, match="U is on cpu.*TRITON_INTERPRET=1"):
        pair_cooccurrence_triton(U, V, A, beta, c)


def test_torch_compile_traces_through_the_custom_op():
    assert_compiles_like_eager(pair_cooccurrence_triton, _inputs(2, 4, 6, torch.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_shapes_gpu(dtype):
    check_against_reference(8, 80, 1024, dtype, eager=True)
