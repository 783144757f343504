"""Triton semantic attention vs a float64 materialized reference (outputs and all gradients).

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), at small odd shapes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from triton_support import assert_compiles_like_eager, check_op_against_float64  # noqa: E402
from triton_support import rel_err as _rel  # noqa: E402

from kernels.triton_decoupling import semantic_attention_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference_semantic_attention(U, V, a, X):
    """DESIGN §2.2 computed literally: materializes the (B,S,C,D) tanh tensor."""
    z = torch.tanh(U[:, :, None, :] * V[None, None, :, :])  # (B,S,C,D)
    score = (z * a).sum(-1)  # (B,S,C)
    alpha = score.softmax(dim=1)
    return torch.einsum("bsc,bsf->bcf", alpha, X)


def _inputs(B, S, D, C, F, dtype, a_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, S, D, generator=g)
    V = torch.randn(C, D, generator=g)
    a = torch.randn(D, generator=g) * a_scale
    X = torch.randn(B, S, F, generator=g)
    return [t.to(DEV, dtype) for t in (U, V, a, X)]


def check_against_reference(B, S, D, C, F, dtype, a_scale=1.0, dtypes=None, eager=False):
    check_op_against_float64(semantic_attention_triton, reference_semantic_attention,
                             _inputs(B, S, D, C, F, dtype, a_scale), "UVaX", (B, C, F), dtypes, eager)


@pytest.mark.parametrize(
    "B,S,D,C,F",
    [(1, 1, 1, 1, 1), (2, 17, 5, 17, 65), (3, 7, 19, 2, 3), (1, 67, 3, 2, 2), (18, 2, 3, 2, 2)],
    ids=["ones", "above-blocks", "primes", "S-over-two-blocks", "B-over-dV-split"],
)
def test_matches_reference_float32(B, S, D, C, F):
    check_against_reference(B, S, D, C, F, torch.float32)


def _late_max_inputs(B, S, D, C, F, dtype, seed=0):
    """Inputs whose every softmax row peaks past the first tile of the attention kernel.

    The forward kernel tiles positions by ``block(S, hi=64)``; a row whose maximum lies in the
    first tile never exercises the online rescaling of the running sum. Positions s < 64 get
    U scaled down 20x, so their scores stay near 0 while later ones spread wide: the row maxima
    land past the first tile."""
    U, V, a, X = _inputs(B, S, D, C, F, torch.float32, seed=seed)
    U[:, :64] *= 0.05
    score = (torch.tanh(U.double()[:, :, None, :] * V.double()[None, None]) * a.double()).sum(-1)
    late = score.argmax(dim=1) >= 64  # (B,C): row maximum beyond the first tile
    assert late.all(), f"precondition: {int((~late).sum())} rows peak in the first tile"
    return [t.to(dtype) for t in (U, V, a, X)]


@pytest.mark.parametrize("S", [81, 130], ids=["S81-two-tiles", "S130-three-tiles"])
def test_row_maximum_in_a_later_tile(S):
    """The online softmax must rescale its running sum when a later tile brings a new maximum."""
    ins = _late_max_inputs(2, S, 6, 3, 5, torch.float32)
    check_op_against_float64(
        semantic_attention_triton, reference_semantic_attention, ins, "UVaX", (2, 3, 5)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_row_maximum_in_a_later_tile_gpu():
    ins = [t.cuda() for t in _late_max_inputs(4, 130, 64, 20, 96, torch.float32)]
    check_op_against_float64(
        semantic_attention_triton, reference_semantic_attention, ins, "UVaX", (4, 20, 96)
    )


def test_matches_reference_bfloat16():
    check_against_reference(2, 13, 11, 5, 7, torch.bfloat16)


def test_mixed_dtypes_promote():
    # autocast-style inputs: bf16 projections with a float32 feature map
    bf, f32 = torch.bfloat16, torch.float32
    check_against_reference(2, 5, 9, 3, 6, f32, dtypes=(bf, bf, f32, f32))


def test_large_scores_are_stable():
    # scores of order +-100: a naive exp would overflow in float32
    check_against_reference(1, 11, 7, 3, 4, torch.float32, a_scale=30.0)


def test_non_contiguous_inputs_are_copied():
    U, V, a, X = _inputs(2, 5, 6, 3, 4, torch.float32)
    Ut = U.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    Vt = V.t().contiguous().t()
    assert not Ut.is_contiguous() and not Vt.is_contiguous()
    out = semantic_attention_triton(Ut, Vt, a, X)
    assert _rel(out, reference_semantic_attention(U.double(), V.double(), a.double(), X.double())) <= 1e-5


def test_errors():
    U, V, a, X = _inputs(2, 5, 6, 3, 4, torch.float32)
    with pytest.raises(TypeError, match="U must be float32"):
        semantic_attention_triton(U.double(), V, a, X)
    with pytest.raises(ValueError, match="inner dims"):
        semantic_attention_triton(U, V[:, :5], a, X)
    with pytest.raises(ValueError, match="X .* must be"):
        semantic_attention_triton(U, V, a, X[:, :4])
    with pytest.raises(ValueError, match="3 dimensions"):
        semantic_attention_triton(U[0], V, a, X)


def test_cpu_tensors_without_interpreter_are_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    U, V, a, X = (t.cpu() for t in _inputs(1, 2, 3, 2, 2, torch.float32))
    with pytest.raises(RuntimeError, match="U is on cpu.*TRITON_INTERPRET=1"):
        semantic_attention_triton(U, V, a, X)


def test_torch_compile_traces_through_the_custom_op():
    assert_compiles_like_eager(semantic_attention_triton, _inputs(2, 5, 6, 3, 4, torch.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_shapes_gpu(dtype):
    check_against_reference(8, 49, 512, 80, 1024, dtype, eager=True)
