"""``sst-dist shards ...``: convert COCO / VOC / list / JSONL / synthetic data to shards, verify them.

Each converter writes one split per call (the synthetic one writes train and test), into
``--out``. Readers import lazily so ``--help`` stays instant. Exit statuses (also in every
``--help``): 0 done; 1 ``verify`` found a problem, or an unexpected error (with a traceback);
2 bad arguments or input, in one line on stderr naming the file, key or value.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from data_shards.images import DEFAULT_MAX_PIXELS
from data_shards.safe_io import UnsafePathError

CONVERT_EXIT = ("exit status: 0 success; 2 bad arguments or input (one line on stderr "
                "naming the file, key or value; an existing split stays as it was and an output folder "
                "this run created is removed); 1 an unexpected error (a traceback: a bug to report); "
                "143 stopped by SIGTERM, rolled back as on Ctrl-C")
VERIFY_EXIT = ("exit status: 0 every file matches; 1 a problem was found (one FAIL line on stderr "
               "each), or an unexpected error (a traceback); 2 bad arguments or a missing shard folder")
SYNTHETIC_FLAGS = {"n_train": "--n-train", "n_test": "--n-test", "num_classes": "--num-classes",
                   "image_size": "--image-size", "num_scenes": "--scenes", "difficulty": "--difficulty"}


def _common(p: argparse.ArgumentParser, name: str, split_required: bool = True) -> None:
    p.add_argument("--out", required=True, type=Path, help="shard directory to write into")
    p.add_argument("--name", default=name, help=f"dataset name in the shard file names (default {name})")
    if split_required:
        p.add_argument("--split", required=True, help="split name in the shard file names, e.g. train, test")
    workers = min(4, os.cpu_count() or 1)
    p.add_argument("--workers", type=int, default=workers,
                   help=f"image reading/encoding processes (default {workers}: the CPU count, at most 4; "
                        "0: in the main process)")
    p.add_argument("--shard-bytes", type=float, default=1e9, help="target shard size in bytes (default 1e9)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing split of this name (swapped in once the new one is complete)")
    p.add_argument("--bad-images", choices=("fail", "skip"), default="fail",
                   help="unreadable images: fail listing all of them (default), or skip them "
                        "(listed in _info.json)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="let annotation paths point outside the image folder (absolute or ../ paths)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _convert(split_data, args: argparse.Namespace, split: str) -> int:
    from data_shards.convert import convert_labeled

    info = convert_labeled(split_data, args.out, args.name, split, num_workers=args.workers,
                           shard_bytes=args.shard_bytes, overwrite=args.overwrite,
                           progress=not args.no_progress, bad_images=args.bad_images,
                           max_pixels=args.max_pixels)
    skipped = f", {info['num_skipped']} unreadable image(s) skipped" if info.get("num_skipped") else ""
    print(f"{args.name}/{split}: {info['num_samples']} samples, {len(info['classes'])} classes, "
          f"{len(info['shards'])} shard(s) in {args.out}{skipped}")
    return 0


def _run_coco(args: argparse.Namespace) -> int:
    from data_shards.coco import read_coco

    return _convert(read_coco(args.annotations, args.images, args.allow_outside_images), args, args.split)


def _run_voc(args: argparse.Namespace) -> int:
    from data_shards.voc import read_voc

    out_split = args.out_split or ("train" if args.split == "trainval" else args.split)
    return _convert(read_voc(args.root, args.split, args.allow_outside_images), args, out_split)


def _run_list(args: argparse.Namespace) -> int:
    from data_shards.listfmt import read_list

    data = read_list(args.image_list, args.labels_json, args.images, args.classes, args.num_classes,
                     args.allow_outside_images)
    return _convert(data, args, args.split)


def _run_jsonl(args: argparse.Namespace) -> int:
    from data_shards.jsonl import read_jsonl

    return _convert(read_jsonl(args.jsonl, args.classes, args.images, args.allow_outside_images), args,
                    args.split)


def _run_synthetic(args: argparse.Namespace) -> int:
    from data_shards.synthetic import check_generation, generation_params
    from data_shards.synthetic_build import build_synthetic

    check_generation(args.n_train, args.n_test, args.num_classes, args.image_size, args.scenes,
                     args.difficulty, names=SYNTHETIC_FLAGS)  # before anything is written
    params = generation_params(args.n_train, args.n_test, args.num_classes, args.image_size, args.seed,
                               args.scenes, args.difficulty)
    built = build_synthetic(args.out, params, name=args.name, raw_dir=args.raw_dir, overwrite=args.overwrite,
                            num_workers=args.workers, progress=not args.no_progress,
                            shard_bytes=args.shard_bytes, bad_images=args.bad_images,
                            max_pixels=args.max_pixels)
    for split, info in built.infos.items():
        print(f"{args.name}/{split}: {info['num_samples']} samples, {len(info['classes'])} classes, "
              f"{len(info['shards'])} shard(s) in {args.out}")
    for split in built.removed:
        print(f"{args.name}/{split}: the old split was removed (--n-test 0)")
    print(f"raw COCO files and JPEGs in {built.raw}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from data_shards.verify import verify_shards

    if not args.shard_dir.is_dir():
        raise NotADirectoryError(f"shard folder not found: {args.shard_dir}")
    problems = verify_shards(args.shard_dir, args.split)
    for line in problems:
        print(f"FAIL {line}", file=sys.stderr)
    if not problems:
        print(f"OK: every shard in {args.shard_dir} matches its _info.json sha256 and size")
    return 1 if problems else 0


def _stop_on_sigterm(signum: int, frame) -> None:
    """SIGTERM (``timeout``, SLURM, ``kill``) unwinds like Ctrl-C, so a conversion rolls back
    instead of leaving its temporary files; exit status 128 + 15 as for a plain SIGTERM."""
    raise SystemExit(128 + signum)


def _guarded(func):
    """Expected errors (bad input, missing files, unsafe paths) -> one line on stderr, exit 2."""
    def run(args: argparse.Namespace) -> int:
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main else None
        try:
            return func(args)
        except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
                UnsafePathError) as err:
            print(f"sst-dist shards: error: {err}", file=sys.stderr)
            return 2
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
    return run


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``shards`` sub-subcommands to the ``shards`` parser."""
    parser.epilog = (f"{CONVERT_EXIT}. verify: {VERIFY_EXIT.removeprefix('exit status: ')}. "
                     "Each FORMAT's --help lists its options.")
    sub = parser.add_subparsers(dest="shards_command", metavar="FORMAT", required=True)

    p = sub.add_parser("coco", epilog=CONVERT_EXIT,
                       help="COCO instances JSON (pycocotools order, classes by category id)")
    p.add_argument("--annotations", required=True, type=Path, help="instances_*.json")
    p.add_argument("--images", required=True, type=Path, help="directory of the split's images")
    _common(p, "coco")
    p.set_defaults(func=_guarded(_run_coco))

    p = sub.add_parser("voc", epilog=CONVERT_EXIT,
                       help="Pascal VOC 2007 (ImageSets/Main order, difficult objects ignored)")
    p.add_argument("--root", required=True, type=Path,
                   help="VOC2007 directory (Annotations/, ImageSets/, JPEGImages/)")
    p.add_argument("--split", required=True, help="image set to read: trainval or test")
    p.add_argument("--out-split", default=None, help="split name for the shards (default: trainval -> train)")
    _common(p, "voc2007", split_required=False)
    p.set_defaults(func=_guarded(_run_voc))

    p = sub.add_parser("list", epilog=CONVERT_EXIT,
                       help="VG-200 style: image list file + JSON image name -> class indices")
    p.add_argument("--image-list", required=True, type=Path, help="one image name per line (dataset order)")
    p.add_argument("--labels-json", required=True, type=Path, help="JSON {image name: [class indices]}")
    p.add_argument("--images", required=True, type=Path, help="directory the image names are relative to")
    p.add_argument("--classes", type=Path, default=None, help="class names file, one a line")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (without --classes)")
    _common(p, "vg200")
    p.set_defaults(func=_guarded(_run_list))

    p = sub.add_parser("jsonl", epilog=CONVERT_EXIT,
                       help='JSON lines {"image": path, "labels": [names or indices]}')
    p.add_argument("--jsonl", required=True, type=Path, help="the JSONL file (line order = dataset order)")
    p.add_argument("--classes", required=True, type=Path, help="class names file, one a line")
    p.add_argument("--images", type=Path, default=None,
                   help="base of relative image paths (default: the JSONL file's directory)")
    _common(p, "jsonl")
    p.set_defaults(func=_guarded(_run_jsonl))

    p = sub.add_parser("synthetic", epilog=CONVERT_EXIT,
                       help="generate synthetic multi-label scenes and shard train + test")
    p.add_argument("--n-train", type=int, default=2000, help="training images (default 2000, at least 1)")
    p.add_argument("--n-test", type=int, default=500,
                   help="test images (default 500; 0 writes no test split)")
    p.add_argument("--num-classes", type=int, default=12, help="object classes (default 12, at most 120)")
    p.add_argument("--image-size", type=int, default=128, help="square image side in pixels (default 128)")
    p.add_argument("--scenes", type=int, default=4, help="scene types (default 4)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same bytes)")
    p.add_argument("--difficulty", choices=("easy", "hard"), default="easy",
                   help="easy: large clean objects; hard: small objects, look-alike distractors, clutter, "
                        "lighting and blur (default easy)")
    p.add_argument("--raw-dir", type=Path, default=None,
                   help="where the COCO JSON + JPEGs go (default OUT/raw-synthetic): a new or empty folder, "
                        "or the one an earlier run made for this --out (replaced with --overwrite)")
    _common(p, "synthetic", split_required=False)
    next(a for a in p._actions if a.dest == "overwrite").help = (
        "replace this dataset (its train and test splits, synthetic.json and raw folder; with --n-test 0 "
        "an old test split is removed), swapped in once the new one is complete; never another --name's "
        "dataset or files this command did not make")
    p.set_defaults(func=_guarded(_run_synthetic))

    p = sub.add_parser("verify", epilog=VERIFY_EXIT,
                       help="check every shard's sha256 and size against its _info.json")
    p.add_argument("shard_dir", type=Path, help="shard directory")
    p.add_argument("--split", default=None, help="only this split (default: all)")
    p.set_defaults(func=_guarded(_run_verify))
