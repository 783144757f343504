"""The one GPU check + benchmark of the SST head kernels.

For every kernel at the real shapes (C=80, S=49, D=512 decoupling / 1024 pairs, F=1024, K=100,
B=8 and 32) it (1) checks the Triton kernel's output and gradients against a float64 materialized
reference, and (2) times, forward and forward+backward: the materialized eager reference, the
fused PyTorch form (kernels.dispatch backend="torch") eager and under torch.compile, and the Triton
kernel. It measures the card's ceilings first (a big bf16/fp32 matmul, a big copy) and prints time,
GB/s, TFLOP/s and their fraction of those ceilings, and the profiler's GPU time (time far above it
means the host, not the kernels, bounds the call); JSON goes to
benchmarks/results/kernels-<card>-<date>.json.

    python -m kernels.bench                 # on a GPU: about 2-4 minutes on an H100
    python -m kernels.bench --smoke         # tiny shapes, CPU under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from data_shards.results_out import OVERWRITE_HELP, OutputRefused, dir_output

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# ---- materialized eager references (DESIGN §2/§3 computed literally) -------------------------
def ref_attention(U, V, a, X):
    z = torch.tanh(U[:, :, None, :] * V[None, None, :, :])  # (B,S,C,D)
    return torch.einsum("bsc,bsf->bcf", (z * a).sum(-1).softmax(dim=1), X)


def ref_pairs(U, V, A, beta, c):
    i, j = torch.triu_indices(U.shape[1], U.shape[1], 1, device=U.device)
    return (torch.relu(U[:, i] + V[:, j] + beta) * A).sum(-1) + c  # (B,P,D) materialized


def ref_gram(x):
    xc = x.transpose(0, 1)
    return F.cosine_similarity(xc[:, :, None, :], xc[:, None, :, :], dim=-1)


def ref_pseudo(features, bank, labels, margin):
    sim = F.cosine_similarity(features[:, :, None, :], bank[None], dim=-1).mean(-1)  # (B,C,K,F) inside
    return sim, torch.where((labels == 0) & (sim >= margin), torch.ones_like(labels), labels)


def ref_update(bank, features, labels):
    lab = labels.cpu()
    rows = []
    for c in range(bank.shape[0]):
        new = [features[b, c].to(bank.dtype) for b in range(features.shape[0]) if lab[b, c] == 1]
        rows.append(torch.cat([torch.stack(new), bank[c]])[: bank.shape[1]] if new else bank[c])
    return torch.stack(rows)


# ---- cases: inputs, cost model, forms -------------------------------------------------------
def make_cases(B: int, C: int, S: int, Dd: int, Dp: int, Fd: int, K: int, dtype, dev) -> list[dict]:
    """One dict per kernel: inputs, which are differentiable, bytes/flops of one forward."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

    P = C * (C - 1) // 2
    esz = torch.finfo(dtype).bits // 8
    labels = torch.randint(-1, 2, (B, C), generator=g).to(dev, torch.int8)
    bank = rnd(C, K, Fd)
    bank[:, K // 2 :] = 0
    return [
        dict(
            name="semantic_attention",
            ins=[rnd(B, S, Dd, scale=0.5), rnd(C, Dd, scale=0.5), rnd(Dd, scale=0.1), rnd(B, S, Fd)],
            grad=True,
            ref=ref_attention,
            bytes=esz * (B * S * Dd + C * Dd + Dd + B * S * Fd + B * C * Fd),
            flops=3 * B * C * S * Dd + 2 * B * C * S * Fd,
        ),
        dict(
            name="pair_cooccurrence",
            ins=[rnd(B, C, Dp), rnd(B, C, Dp), rnd(P, Dp, scale=0.05), rnd(Dp), rnd(P)],
            grad=True,
            ref=ref_pairs,
            bytes=esz * (2 * B * C * Dp + P * Dp + Dp + P + B * P),
            flops=4 * B * P * Dp,
        ),
        dict(
            name="class_cosine_gram",
            ins=[rnd(B, C, Fd)],
            grad=True,
            ref=ref_gram,
            bytes=esz * (B * C * Fd + C * B * B),
            flops=2 * C * B * B * Fd,
        ),
        dict(
            name="bank_pseudo_labels",
            ins=[rnd(B, C, Fd), bank, labels, 0.3],
            grad=False,
            ref=ref_pseudo,
            bytes=esz * (C * K * Fd + B * C * Fd) + 9 * B * C,
            flops=3 * C * K * Fd + 4 * B * C * Fd,
        ),
        dict(
            name="bank_update",
            ins=[bank, rnd(B, C, Fd), labels],
            grad=False,
            ref=ref_update,
            bytes=esz * (2 * C * K * Fd + B * C * Fd) + B * C,
            flops=0,
        ),
    ]


def forms(name: str, compile_ok: bool) -> dict[str, Callable]:
    import kernels.dispatch as kd

    fn = getattr(kd, name)
    out = {"torch": lambda *a: fn(*a, backend="torch"), "triton": lambda *a: fn(*a, backend="triton")}
    if compile_ok:
        out["compiled_torch"] = torch.compile(lambda *a: fn(*a, backend="torch"))
    return out


# ---- measurement -------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Mean milliseconds per call (CUDA events on a GPU, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    sync()
    if torch.cuda.is_available():
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(iters):
            fn()
        e1.record()
        sync()
        return e0.elapsed_time(e1) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def device_ms(fn: Callable[[], object], iters: int) -> float | None:
    """GPU kernel time per call from the profiler (no host time); None off CUDA. Read beside the
    event-timed ms: ms far above device_ms means the call is bound by the host's work (autograd,
    dispatch, launches), not by its kernels (docs/gpu-step.md, floors of the Triton heads)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / iters


def ceilings(dev, smoke: bool) -> dict:
    """Measured peak-ish numbers of this card: dense matmul TFLOP/s and copy GB/s."""
    n = 256 if smoke else 8192
    res = {}
    for dt_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        ms = timed(lambda x=x, y=y: x @ y, 1 if smoke else 20, 0 if smoke else 3)
        res[f"matmul_{dt_name}_tflops"] = 2 * n**3 / ms / 1e9
    src = torch.empty(int(2**22 if smoke else 2**28), device=dev, dtype=torch.float32)  # 1 GiB on GPU
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 1 if smoke else 20, 0 if smoke else 3)
    res["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
    return res


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-2)).item()


def _errors(case: dict, fn: Callable, ins: list, ref_out, ref_ins: list, gout) -> dict:
    """Relative errors of fn(ins) (output, and each float input's gradient) vs the float64 run."""
    fl = [torch.is_tensor(t) and t.is_floating_point() for t in ins]
    args = [t.clone().requires_grad_(case["grad"]) if f else t for t, f in zip(ins, fl)]
    out = fn(*args)
    if case["name"] == "bank_pseudo_labels":
        return {"sim": rel_err(out[0], ref_out[0])}
    errs = {"out": rel_err(out, ref_out)}
    if case["grad"]:
        out.backward(gout.to(out.dtype))
        errs.update(
            {f"grad{k}": rel_err(t.grad, r.grad) for k, (t, r) in enumerate(zip(args, ref_ins)) if fl[k]}
        )
    return errs


def check(case: dict, dtype) -> dict:
    """Triton vs the float64 reference: output (and every gradient when differentiable).

    Passes when each error is within TOL or within twice the eager reference's own error in the
    same dtype (float32 rounding at D=1024 can exceed 1e-5 for PyTorch itself).
    """
    import kernels.dispatch as kd

    fn = getattr(kd, case["name"])
    ins = case["ins"]
    fl = [torch.is_tensor(t) and t.is_floating_point() for t in ins]
    ref = [t.double().requires_grad_(case["grad"]) if f else t for t, f in zip(ins, fl)]
    expect = case["ref"](*ref)
    gout = None
    if case["grad"]:
        gout = torch.randn(expect.shape, generator=torch.Generator().manual_seed(1)).to(expect.device)
        expect.backward(gout.double())
    errs = _errors(case, lambda *a: fn(*a, backend="triton"), ins, expect, ref, gout)
    eager = _errors(case, case["ref"], ins, expect, ref, gout)
    ok = all(v <= max(TOL[dtype], 2 * eager[k]) for k, v in errs.items())
    if case["name"] == "bank_pseudo_labels":
        out = fn(*ins, backend="triton")
        margin_ok = (expect[0] - ins[3]).abs() > 1e-3
        errs["labels_mismatch"] = int((out[1] != expect[1])[margin_ok].sum())
        ok &= errs["labels_mismatch"] == 0
    return {"errors": errs, "eager_errors": eager, "ok": ok}


def bench_case(case: dict, compile_until: float, iters: int, warmup: int, ceil: dict, dtype) -> dict:
    """Time every form; torch.compile forms only until the wall-clock ``compile_until``."""
    ins = case["ins"]
    fl = [torch.is_tensor(t) and t.is_floating_point() for t in ins]
    candidates = {"reference": case["ref"], **forms(case["name"], compile_until > 0)}
    peak = ceil["matmul_bf16_tflops" if dtype == torch.bfloat16 else "matmul_fp32_tflops"]
    rows = {}
    for form, fn in candidates.items():
        for mode in ("fwd", "fwd+bwd") if case["grad"] else ("fwd",):
            if form == "compiled_torch" and time.time() > compile_until:
                rows[f"{form}/{mode}"] = {"error": "skipped: compile time budget spent (--budget-s)"}
                continue
            args = [t.detach().requires_grad_(mode != "fwd") if f else t for t, f in zip(ins, fl)]

            def step(fn=fn, args=args, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        return fn(*args)
                out = fn(*args)
                out.backward(torch.ones_like(out))
                for t in args:
                    if torch.is_tensor(t):
                        t.grad = None

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            try:
                ms = timed(step, iters, warmup)
            except Exception as e:  # a form that fails is reported, not fatal
                rows[f"{form}/{mode}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                continue
            try:
                gpu_ms = device_ms(step, max(1, iters // 2))
            except Exception as e:  # the profiler is a reading aid: its failure is not the form's
                print(f"  {form}/{mode}: no device time ({type(e).__name__}: {str(e)[:120]})")
                gpu_ms = None
            k = 1 if mode == "fwd" else 3  # backward ~ 2x forward work and traffic
            gbps, tflops = k * case["bytes"] / ms / 1e6, k * case["flops"] / ms / 1e9
            rows[f"{form}/{mode}"] = {
                "ms": ms,
                "device_ms": gpu_ms,
                "GBps": gbps,
                "TFLOPs": tflops,
                "frac_copy": gbps / ceil["copy_gbps"],
                "frac_matmul": tflops / peak,
                "peak_MiB": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            }
    return rows


def report(name: str, dname: str, B: int, chk: dict, rows: dict) -> None:
    errs = " ".join(f"{k}={v:.1e}" for k, v in chk["errors"].items())
    errs += f" (eager same-dtype max {max(chk['eager_errors'].values()):.1e})"
    print(f"\n{name:<20} {dname:<8} B={B:<3} check {'OK ' if chk['ok'] else 'BAD'} {errs}", flush=True)
    for k, r in rows.items():
        if "error" in r:
            print(f"  {k:<24} ERROR {r['error']}")
            continue
        peak = f" peak {r['peak_MiB']:8.0f} MiB" if r["peak_MiB"] is not None else ""
        peak += f" gpu {r['device_ms']:8.3f} ms" if r.get("device_ms") is not None else ""
        print(
            f"  {k:<24} {r['ms']:9.3f} ms {r['GBps']:8.1f} GB/s ({r['frac_copy']:5.1%}) "
            f"{r['TFLOPs']:7.2f} TFLOP/s ({r['frac_matmul']:5.1%}){peak}",
            flush=True,
        )


def card_name() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=os.environ.get("SST_BENCH_PROG"), description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 iteration (CPU interpreter ok)")
    p.add_argument("--batches", default=None, help="comma list of B (default 8,32; smoke 3)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile form")
    p.add_argument("--budget-s", type=float, default=90.0, help="no new torch.compile forms after this")
    p.add_argument("--out", default=None, help="result folder (default benchmarks/results; smoke: tmp)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:  # bad arguments for this machine: one line, exit 2 (was exit 1, a failure's status)
        if os.environ.get("TRITON_INTERPRET") != "1" and "triton" in sys.modules:
            print(f"{p.prog}: no CUDA: set TRITON_INTERPRET=1 before starting python", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if not a.smoke:
            print(f"{p.prog}: no CUDA GPU: only --smoke runs here (CPU, Triton interpreter)", file=sys.stderr)
            return 2
    # smoke: a fresh private directory (mkdtemp), not a guessable name in the shared temp dir
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = a.out or (
        tempfile.mkdtemp(prefix="sst-kernels-") if a.smoke else os.path.join(repo, "benchmarks", "results")
    )
    try:  # before any work: a refused output would otherwise lose the run's numbers
        results = dir_output(out_dir, [f"kernels-{card_name()}-{dt.datetime.now(dt.UTC):%Y%m%d}.json"],
                             overwrite=a.overwrite)
    except OutputRefused as e:
        return e.exit(p.prog)
    dev = torch.device("cuda" if cuda else "cpu")
    shapes = (
        dict(C=5, S=7, Dd=16, Dp=16, Fd=24, K=6)
        if a.smoke
        else dict(C=80, S=49, Dd=512, Dp=1024, Fd=1024, K=100)
    )
    batches = [int(b) for b in (a.batches or ("3" if a.smoke else "8,32")).split(",")]
    iters, warmup = (1, 0) if a.smoke else (a.iters, 3)
    compile_ok = not a.no_compile and not a.smoke
    t0 = time.time()
    ceil = ceilings(dev, a.smoke)
    print(f"card {card_name()}  ceilings: " + ", ".join(f"{k}={v:.1f}" for k, v in ceil.items()))
    result = {
        "card": card_name(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "host": platform.node(),
        "smoke": a.smoke,
        "shapes": shapes,
        "ceilings": ceil,
        "runs": [],
    }
    all_ok = True
    for dname in a.dtypes.split(","):
        dtype = getattr(torch, dname)
        for B in batches:
            for case in make_cases(B, dtype=dtype, dev=dev, **shapes):
                chk = check(case, dtype)
                all_ok &= chk["ok"]
                rows = bench_case(case, t0 + a.budget_s if compile_ok else 0.0, iters, warmup, ceil, dtype)
                result["runs"].append(
                    {"kernel": case["name"], "dtype": dname, "B": B, "check": chk, "timings": rows}
                )
                report(case["name"], dname, B, chk, rows)
                result["all_ok"], result["wall_s"] = all_ok, time.time() - t0
                # rewritten after every case (a killed run keeps its numbers); atomic, follows no link
                path = results.write(json.dumps(result, indent=1))
    print(f"\nall checks {'passed' if all_ok else 'FAILED'}; {result['wall_s']:.0f} s; wrote {path}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
