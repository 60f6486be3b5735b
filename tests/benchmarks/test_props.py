"""Property-based benchmarking: generation is deterministic from a seed, saved workloads replay to
the same final tree, the tree model used for generation matches the real layers, and a backend
that answers wrongly is flagged as disagreeing (so its time does not count). No timing asserted.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import backends as bk
from benchmarks import mounts, props
from benchmarks.trees import flatten, snapshot
from benchmarks.util import Progress


def test_generation_is_deterministic() -> None:
    a = props.generate(11, 4, "tiny")
    b = props.generate(11, 4, "tiny")
    assert len(a) == 4
    assert [w.to_json() for w in a] == [w.to_json() for w in b]
    assert [w.name for w in a] == [f"s11-{i}" for i in range(4)]
    c = props.generate(12, 4, "tiny")
    assert [w.digest() for w in a] != [w.digest() for w in c]
    # every drawn workload respects the limits and confines each worker to its scope
    lim = props.LIMITS["tiny"]
    for w in a:
        n = len(w.workers)
        for k, ops in enumerate(w.workers):
            assert ops[0] == {"op": "mkdir", "path": f"w{k}"}
            assert len(ops) <= lim.max_ops + 1
            for op in ops:
                assert props._scope_of(op["path"], n) == k, (op, k)
                if op["op"] == "rename":
                    assert props._scope_of(op["dst"], n) == k


def test_save_and_load(tmp_path: Path) -> None:
    ws = props.generate(5, 3, "tiny")
    for w in ws:
        path = tmp_path / f"{w.name}.json"
        path.write_text(json.dumps(w.to_json()))
    loaded = list(props.load_workloads(sorted(tmp_path.glob("*.json"))))
    assert [w.to_json() for w in loaded] == [w.to_json() for w in ws]
    assert [w.digest() for w in loaded] == [w.digest() for w in ws]
    bundle = tmp_path / "all.json"
    bundle.write_text(json.dumps([w.to_json() for w in ws]))
    assert [w.digest() for w in props.load_workloads([bundle])] == [w.digest() for w in ws]


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_merged_view_model_matches_flatten(data: st.DataObject) -> None:
    """The model the op generator draws against is the tree the layers really produce."""
    import tempfile

    lim = props.LIMITS["tiny"]
    sizes = props.file_sizes("empty-ish", lim.max_file)
    n = data.draw(st.integers(1, 3))
    layers = [data.draw(props.layer_tree(lim, sizes, bottom=i == n - 1)) for i in range(n)]
    with tempfile.TemporaryDirectory() as t:
        written = props.write_layers(layers, Path(t))
        flatten(written, Path(t, "flat"), hardlink=False)
        snap = snapshot(Path(t, "flat"))
    assert {p: d[0] for p, d in snap.items()} == props.merged_view(layers)


def test_replay_reproduces(tmp_path: Path, bench_cache: Path,
                           installed_backends: list[str]) -> None:
    (w,) = props.generate(3, 1, "tiny")
    saved = tmp_path / "w.json"
    saved.write_text(json.dumps(w.to_json()))
    (again,) = props.load_workloads([saved])
    _, first, _ = props.run_props(installed_backends, [w], "tiny", 1, bench_cache, 3,
                                  properties=False, quiet=True)
    _, second, _ = props.run_props(installed_backends, [again], "tiny", 1, bench_cache, 3,
                                   properties=False, quiet=True)
    for res in (first[0], second[0]):
        assert set(res.times) == set(installed_backends), res.errors
        assert res.agrees == {b: True for b in installed_backends}, res.differences
    # the same final tree, on every backend, in both runs
    digests = set(first[0].tree_digest.values()) | set(second[0].tree_digest.values())
    assert len(digests) == 1
    assert first[0].digest == second[0].digest
    assert not mounts.mounts_below(bench_cache)


class _Lossy(bk.Native):
    """A stand-in for a buggy file system (a real one cannot be made to fail on cue): native,
    but it does not show the lower file `a`."""

    name = "lossy"

    @contextlib.contextmanager
    def mount(self, stack: bk.Stack, where: Path,
              env: dict[str, str] | None = None) -> Iterator[bk.Mounted]:
        with super().mount(stack, where, env) as m:
            (m.mnt / "a").unlink()
            yield m


def test_a_wrong_answer_is_flagged(tmp_path: Path) -> None:
    w = props.GenWorkload(0, 0, [{"a": {"t": "f", "size": 3, "seed": 1, "mode": 0o644}}],
                          [[{"op": "mkdir", "path": "w0"},
                            {"op": "write", "path": "w0/x", "size": 10, "seed": 2},
                            {"op": "read", "path": "a"}]])
    runner = props.PropsRunner([bk.BACKENDS["native"], _Lossy()], 1, tmp_path,
                               Progress(0, quiet=True), None)
    res = runner.run_workload(w)
    assert res.agrees == {"native": True, "lossy": False}
    assert any("missing 'a'" in d for d in res.differences["lossy"])
    assert any("ENOENT" in d for d in res.differences["lossy"])
    # a disagreeing backend's time never counts for the slowdown property
    res.agrees["unionfs"] = False
    res.times["unionfs"] = [1.0]
    res.times["fuse-overlayfs"] = [1.0]
    assert props.slowdown_property([res], 2.0) is None
