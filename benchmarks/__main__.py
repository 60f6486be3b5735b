"""Command line: `python -m benchmarks run | scaling | props | dataset` (see benchmarks/README.md).

Parses arguments, calls the runner, scaling or props module, prints the tables and writes JSON and
PNG files. Exit status: 0 on success, 1 when a step failed (reported on one line), 2 on usage
errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import backends as bk
from .datasets import SCALES, cache_dir, ensure_dataset
from .util import BenchError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fs", default=",".join(bk.ALL_BACKENDS),
                   help="backends, comma-separated (default: all; missing ones are skipped): "
                        + ",".join(bk.ALL_BACKENDS))
    p.add_argument("--scale", default="small", choices=list(SCALES),
                   help="sizes (default small; 'full' is the issue's 1 GiB / 10k files / 100 MB)")
    p.add_argument("--cache", type=Path, default=None,
                   help="dataset cache (default $UNIONFS_BENCH_CACHE or /var/cache/unionfs-bench)")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG chart (matplotlib)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description="side-by-side union file system benchmarks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="workloads side by side on every backend")
    _common(r)
    r.add_argument("--workloads", default=None,
                   help="comma-separated workload names or prefixes (default: all); "
                        "`list` prints them")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--dataset", default="synthetic", choices=["synthetic", "rootfs"])
    r.add_argument("--no-tree-check", action="store_true",
                   help="skip comparing each backend's merged view with native first")

    s = sub.add_parser("scaling", help="cost curves: layers, directory size, copy-up size, RSS")
    _common(s)
    s.add_argument("--curves", default="layers,dirsize,copyup,rss",
                   help="which curves (default all): layers,dirsize,copyup,rss")
    s.add_argument("--rounds", type=int, default=3)

    pr = sub.add_parser("props", help="property-based benchmarks on generated workloads")
    _common(pr)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--count", type=int, default=5, help="generated workloads")
    pr.add_argument("--rounds", type=int, default=3)
    pr.add_argument("--save", type=Path, default=None,
                    help="directory to save each generated workload as JSON")
    pr.add_argument("--replay", type=Path, action="append", default=None,
                    help="run a saved workload (JSON) instead of generating; may repeat")
    pr.add_argument("--max-slowdown", type=float, default=None,
                    help="stated factor: unionfs may be at most this much slower than "
                         "fuse-overlayfs on any workload")
    pr.add_argument("--no-properties", action="store_true",
                    help="only the generated workloads, not the depth/listing properties")

    d = sub.add_parser("dataset", help="build (or show) a cached dataset")
    d.add_argument("--dataset", default="synthetic", choices=["synthetic", "rootfs"])
    d.add_argument("--scale", default="small", choices=list(SCALES))
    d.add_argument("--cache", type=Path, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "scaling":
            from .scaling import main as scaling_main
            return scaling_main(args)
        if args.command == "props":
            from .props import main as props_main
            return props_main(args)
        if args.command == "dataset":
            ds = ensure_dataset(args.dataset, SCALES[args.scale], args.cache)
            print(json.dumps({"root": str(ds.root), "layers": [str(x) for x in ds.layers],
                              "entries": ds.entries, "features": sorted(ds.features),
                              "cache": str(cache_dir(args.cache))}, indent=1))
            return 0
    except (BenchError, ValueError) as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks: interrupted", file=sys.stderr)
        return 130
    return 2


def _run(args: argparse.Namespace) -> int:
    from .report import MissingDependency, chart_data, render_chart, render_text, write_json
    from .runner import RunOptions, run_benchmark
    from .workloads import WORKLOADS

    if args.workloads == "list":
        for w in WORKLOADS:
            needs = f" [needs {','.join(sorted(w.needs))}]" if w.needs else ""
            print(f"{w.name:<20} {w.cache:<5} {w.doc}{needs}")
        return 0
    opts = RunOptions(backends=bk.parse_backends(args.fs), workloads=args.workloads,
                      rounds=args.rounds, dataset=args.dataset, scale=args.scale,
                      cache=args.cache, quiet=args.quiet, check_trees=not args.no_tree_check)
    res = run_benchmark(opts)
    print(render_text(res))
    if args.json:
        write_json(res, args.json)
        print(f"\nJSON: {args.json}")
    if args.plot:
        try:
            render_chart(chart_data(res), args.plot)
            print(f"chart: {args.plot}")
        except MissingDependency as e:
            print(f"no chart: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
