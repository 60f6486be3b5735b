"""Rendering results: terminal tables, JSON, and the PNG chart (ratio to fuse-overlayfs per
workload, log scale).

The chart is computed in two steps: `chart_data` (pure: which bars, which values, which labels)
and `render_chart` (matplotlib, imported only there). Without matplotlib, `render_chart` raises
`MissingDependency` with the install command; `chart_data` works everywhere and is what the tests
check when matplotlib is absent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runner import Results
from .util import fmt_ratio, fmt_seconds, render_table

REFERENCE = "fuse-overlayfs"
COLORS = {"native": "#7f7f7f", "overlay": "#1f77b4", "fuse-overlayfs": "#2ca02c",
          "unionfs-fuse": "#9467bd", "unionfs": "#d62728", "unionfs-noopen": "#ff7f0e",
          "unionfs-index": "#8c564b", "unionfs-nospin": "#e377c2", "unionfs-nocache": "#bcbd22",
          "unionfs-autoindex": "#17becf", "unionfs-inline": "#aec7e8"}


class MissingDependency(RuntimeError):
    pass


def _flag(res: Results, w: str, b: str) -> str:
    c = res.cell(w, b)
    if c.errors and not c.times:
        return "FAIL"
    mark = ""
    if c.agrees is False:
        mark = "!"
    if res.tree_check.get(b):
        mark = "!"
    return mark


def times_table(res: Results) -> str:
    header = ["workload", *res.backends]
    rows = []
    for w in res.workloads:
        row = [w]
        for b in res.backends:
            c = res.cell(w, b)
            flag = _flag(res, w, b)
            if flag == "FAIL":
                row.append("FAIL")
            else:
                row.append(f"{fmt_seconds(c.median)} ({fmt_seconds(c.best)}){flag}")
        rows.append(row)
    return render_table(header, rows)


def ratio_table(res: Results, reference: str) -> str:
    header = ["workload", *(b for b in res.backends if b != reference)]
    rows = []
    for w in res.workloads:
        rows.append([w, *(fmt_ratio(res.ratio(w, b, reference))
                          for b in res.backends if b != reference)])
    return render_table(header, rows)


def server_table(res: Results) -> str:
    """Server CPU seconds per workload for every FUSE backend, and unionfs request counts."""
    fuse = [b for b in res.backends
            if b in ("fuse-overlayfs", "unionfs-fuse") or b.startswith("unionfs")]
    if not fuse:
        return ""
    header = ["workload", *(f"cpu {b}" for b in fuse)]
    has_reqs = "unionfs" in res.backends and any(
        res.cell(w, "unionfs").requests for w in res.workloads)
    if has_reqs:
        header += ["unionfs requests (median per run)"]
    rows = []
    for w in res.workloads:
        row = [w, *(fmt_seconds(res.cell(w, b).cpu_median) for b in fuse)]
        if has_reqs:
            reqs = res.cell(w, "unionfs").requests_median()
            total = sum(reqs.values())
            top = sorted(reqs.items(), key=lambda kv: -kv[1])[:5]
            row.append(f"{total}: " + " ".join(f"{k}={v}" for k, v in top) if reqs else "-")
        rows.append(row)
    return render_table(header, rows, right=True)


def mount_table(res: Results) -> str:
    """How long each backend takes to mount (start until mounted; not part of any workload's
    time), median over every cell's fresh mount, with the ratio to the reference."""
    rows = []
    ref = res.mount_median(REFERENCE)
    for b in res.backends:
        t = res.mount_median(b)
        if t is None:
            continue
        rows.append([b, fmt_seconds(t), str(res.mount_count(b)),
                     fmt_ratio(t / ref) if ref and b != REFERENCE else "-"])
    if not rows:
        return ""
    return render_table(["backend", "mount (median)", "mounts", f"ratio to {REFERENCE}"], rows,
                        right=True)


def describe_meta(meta: Mapping[str, Any]) -> str:
    m = meta.get("machine", {})
    lines = [
        f"date {m.get('date', '?')}; {m.get('nproc', '?')} CPUs ({m.get('cpu', '?')}), "
        f"{m.get('mem_gib', '?')} GiB RAM, kernel {m.get('kernel', '?')}, "
        f"backing fs {m.get('fs_under_test', '?')}",
        f"dataset {meta.get('dataset')} ({meta.get('scale')}, {meta.get('entries')} entries), "
        f"{meta.get('rounds')} round(s)" + (f", {meta['elapsed_s']} s" if 'elapsed_s' in meta
                                            else ""),
    ]
    versions = meta.get("versions", {})
    if versions:
        lines.append("versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items() if v))
    return "\n".join(lines)


def render_text(res: Results) -> str:
    parts = [describe_meta(res.meta), ""]
    for name, why in res.skipped_backends.items():
        parts.append(f"skipped backend {name}: {why}")
    for name, why in res.skipped_workloads.items():
        parts.append(f"skipped workload {name}: {why}")
    parts += ["", "median (best) wall time per workload; ! = result differs from native, "
              "FAIL = every round failed", times_table(res)]
    if "native" in res.backends:
        parts += ["", "ratio of medians to native (lower is better)",
                  ratio_table(res, "native")]
    if REFERENCE in res.backends:
        parts += ["", f"ratio of medians to {REFERENCE} (lower is better)",
                  ratio_table(res, REFERENCE)]
    mt = mount_table(res)
    if mt:
        parts += ["", "mounting: from the server's start (mount(8) for overlay) until the mount "
                  "point is mounted", mt]
    st = server_table(res)
    if st:
        parts += ["", "server CPU time (user+sys, median) per workload", st]
    problems = []
    for b, d in res.tree_check.items():
        if d:
            problems.append(f"{b}: merged view differs from native: " + "; ".join(d[:5]))
    for (w, b), c in res.cells.items():
        if c.agrees is False:
            problems.append(f"{w} on {b}: " + "; ".join(c.differences[:5]))
        for e in c.errors:
            problems.append(f"{w} on {b}: {e}")
    if problems:
        parts += ["", "problems:", *("  " + p for p in problems)]
    return "\n".join(parts)


def write_json(res: Results, path: Path) -> None:
    path.write_text(json.dumps(res.to_json(), indent=1, sort_keys=False) + "\n")


# -- the chart ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chart:
    title: str
    workloads: list[str]
    series: dict[str, list[float | None]]
    """backend -> ratio of its median to the reference's, per workload (None: no value)"""
    reference: str


def chart_data(res: Results, reference: str = REFERENCE) -> Chart:
    if reference not in res.backends:
        reference = "native" if "native" in res.backends else res.backends[0]
    series = {b: [res.ratio(w, b, reference) for w in res.workloads]
              for b in res.backends if b != reference}
    m = res.meta
    title = (f"median time relative to {reference} (log scale; < 1 is faster)\n"
             f"dataset {m.get('dataset')} / {m.get('scale')}, {m.get('rounds')} round(s), "
             f"{m.get('machine', {}).get('date', '')}")
    return Chart(title, list(res.workloads), series, reference)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MissingDependency("the PNG chart needs matplotlib: "
                                "pip install matplotlib (or the 'bench' extra)") from e
    return plt


def render_chart(chart: Chart, path: Path) -> None:
    plt = _pyplot()
    n = len(chart.workloads)
    names = list(chart.series)
    height = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.26 * n * max(1, len(names)) ** 0.5))
    for i, b in enumerate(names):
        ys = [k + (i - (len(names) - 1) / 2) * height for k in range(n)]
        vals = chart.series[b]
        # bars grow from 1 (same as the reference) towards the ratio, either way
        widths = [v - 1 if v is not None and v > 0 else float("nan") for v in vals]
        ax.barh(ys, widths, height=height, color=COLORS.get(b), label=b, left=1)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(range(n))
    ax.set_yticklabels(chart.workloads)
    ax.invert_yaxis()
    ax.set_xlabel(f"median time / median time of {chart.reference}")
    ax.set_title(chart.title, fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def line_chart(path: Path, panels: Sequence[dict[str, Any]], title: str) -> None:
    """Several log-log panels of (x, y) series: used by the scaling curves.

    Each panel: {"title", "xlabel", "ylabel", "series": {name: [(x, y), ...]}, "logx", "logy"}."""
    plt = _pyplot()
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for name, pts in panel["series"].items():
            pts = [(x, y) for x, y in pts if y is not None and y > 0]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    color=COLORS.get(name.split(" ")[0]), label=name)
        if panel.get("logx", True):
            ax.set_xscale("log")
        if panel.get("logy", True):
            ax.set_yscale("log")
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
