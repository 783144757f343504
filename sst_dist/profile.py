"""``sst-dist profile CONFIG [key.sub=value ...]``: where a run's time and memory go.

Measures images/s of (a) the data pipeline alone, (b) the training step alone on a resident
synthetic batch, (c) the two together, then profiles a few end-to-end steps with
``torch.profiler`` to split a step into phases (data, backbone, decoupling, GNN, classifier,
pair head, pseudo labels, losses, backward, optimizer, communication), forward and backward.
Run it under any launcher like ``sst-dist train``: every rank writes ``profile-rank<R>.json``
and a Chrome trace; rank 0 combines them into ``profile.json`` (with scaling efficiency when
``--baseline`` names a 1-rank ``profile.json``), ``profile.png`` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

EXIT_STATUSES = """exit status:
  0  profiled: rank 0 printed the table and wrote OUT/profile.json (other ranks: their rank file)
  1  an unexpected failure while profiling (with a traceback)
  2  bad input: a missing or invalid config or override, a bad --modes/--steps/--warmup/
     --profile-steps value, an unreadable --baseline, an --out that holds an earlier profile
     (without --overwrite) or a training run's checkpoints (one line on stderr)"""

# what a profile writes into --out (besides its run directory); --overwrite replaces exactly these
PROFILE_FILES = ("profile.json", "profile.png", "profile-rank*.json", "trace-rank*.json")


def register(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXIT_STATUSES
    parser.add_argument("config", help="run config YAML (see launch/configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, as for train"
    )
    parser.add_argument("--out", default="profile", help="output directory (default: ./profile)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each mode (default 2)")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=3,
        help="end-to-end steps under torch.profiler for the breakdown (0: skip; default 3)",
    )
    parser.add_argument("--modes", default="data,model,e2e", help="comma list of data, model, e2e")
    parser.add_argument(
        "--epoch",
        type=int,
        default=None,
        help="epoch the steps act as (default: the first after warm-up, so pseudo labels run)",
    )
    parser.add_argument(
        "--baseline", default=None, help="profile.json of a 1-rank run: report scaling efficiency"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier profile in --out (never checkpoints)"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def _parse_modes(text: str) -> list[str]:
    from sst_dist.profiling.report import MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes: unknown mode(s) {bad or text!r}; allowed: {', '.join(MODES)}")
    return modes


def _check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "warmup", "profile_steps"):
        low = 1 if name == "steps" else 0
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.epoch is not None and args.epoch < 0:
        raise ValueError(f"--epoch must be >= 0, got {args.epoch}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    # the profiled run lives under --out (OUT/run unless output.name says otherwise): an
    # output.root would point it at another directory, such as a training run's
    rooted = [o for o in args.overrides if o.split("=", 1)[0] == "output.root"]
    if rooted:
        raise ValueError(f"override {rooted[0]}: profile writes its run under --out; set --out instead")


def earlier_profile(out: Path, run_name: str) -> list[str]:
    """What an earlier profile left in ``out``: its files and its run's outputs. A run directory
    with checkpoints is a training run, never a profile's: refused even with --overwrite."""
    from sst_dist.train.rundir import EARLIER_RUN, checkpoint_names

    run_dir = out / run_name
    if checkpoint_names(run_dir):
        raise ValueError(f"{run_dir} already holds checkpoints: profile a run config into another --out")
    found = sorted({p.name for pattern in PROFILE_FILES for p in out.glob(pattern)})
    return found + [f"{run_name}/{n}" for n in EARLIER_RUN if (run_dir / n).exists()]


def profile_rank(cfg: Any, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """This rank's record: throughput of each mode, peak memory, the phase breakdown."""
    from sst_dist.train.trainer import Trainer

    trainer = Trainer(cfg, overwrite=args.overwrite)
    try:
        return _measure(trainer, cfg, args, out)
    finally:  # the run directory's lock goes back too: a later profile in this process may use it
        trainer.metrics.close()
        trainer.release()


def _measure(trainer: Any, cfg: Any, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    from sst_dist.profiling import measure

    epoch = cfg.pseudo.warmup_epochs if args.epoch is None else args.epoch
    rec: dict[str, Any] = {
        "rank": trainer.rank,
        "world_size": trainer.world,
        "device": str(trainer.device),
        "config": str(args.config),
        "overrides": list(args.overrides),
        "batch_size": cfg.train.batch_size,
        "image_size": cfg.data.image_size,
        "epoch": epoch,
        "zero_stage": cfg.train.zero_stage,
        "host": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "modes": {},
    }
    modes = _parse_modes(args.modes)
    if "data" in modes:
        rec["modes"]["data"] = measure.time_data(
            trainer.data.train_loader, args.steps, args.warmup, trainer.device
        )
    if "model" in modes:
        batch = measure.synthetic_batch(
            cfg.train.batch_size,
            cfg.model.num_classes,
            cfg.data.image_size,
            cfg.data.proportion,
            seed=1000 + trainer.rank,
        )
        rec["modes"]["model"] = measure.time_model(trainer, batch, args.steps, args.warmup, epoch)
    if "e2e" in modes:
        rec["modes"]["e2e"] = measure.time_e2e(trainer, args.steps, args.warmup, epoch)
    if args.profile_steps > 0:
        trace = out / f"trace-rank{trainer.rank}.json"
        rec["breakdown"] = measure.profile_steps(trainer, args.profile_steps, epoch, trace)
        rec["trace"] = str(trace)
    return rec


def run(args: argparse.Namespace) -> int:
    from sst_dist.config import ConfigError, load_config

    out = Path(args.out)
    try:
        _check_args(args)
        _parse_modes(args.modes)
        baseline = None
        if args.baseline:
            from sst_dist.profiling.report import load_baseline

            baseline = load_baseline(args.baseline)
        overrides = [
            f"output.root={out}",
            "output.name=run",
            "output.tensorboard=false",
            "train.progress=false",
            *args.overrides,
        ]
        cfg = load_config(args.config, overrides)
        earlier = earlier_profile(out, cfg.output.name)
        if earlier and not args.overwrite:
            raise ValueError(f"--out {out} already holds a profile ({', '.join(earlier[:4])}); "
                             "choose another --out, or pass --overwrite to replace it")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"sst-dist profile: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    from sst_dist.train import distributed as D

    if args.overwrite and D.detect_env().rank == 0:  # before any rank writes: no stale rank file
        for pattern in PROFILE_FILES:
            for stale in out.glob(pattern):
                stale.unlink()

    from sst_dist.profiling import report
    from sst_dist.train.checkpoint import CheckpointError
    from sst_dist.train.data import DataError
    from sst_dist.train.rundir import RunDirError

    try:
        rec = profile_rank(cfg, args, out)
    except (RunDirError, DataError, CheckpointError) as e:
        print(f"sst-dist profile: {e}", file=sys.stderr)
        return 2
    (out / f"profile-rank{rec['rank']}.json").write_text(json.dumps(rec, indent=1))
    records = D.gather_object_list(rec)
    if rec["rank"] != 0:
        return 0
    result = report.aggregate(list(records))
    result["rank_files"] = [f"profile-rank{r['rank']}.json" for r in records]
    if baseline is not None:
        result["scaling"] = report.scaling(result, baseline)
    if not args.no_plot and result.get("breakdown"):
        result["plot"] = str(report.plot(result, out / "profile.png"))
    (out / "profile.json").write_text(json.dumps(result, indent=1))
    print(report.format_table(result))
    print(f"wrote {out / 'profile.json'}")
    return 0
