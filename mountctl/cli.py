"""The `mountctl` command line: subcommands over the store, the runner and the exporter.

    mountctl [--root DIR] import FILE [--name NAME[:TAG]] | images | rmi IMAGE... |
             inspect IMAGE | run [...] IMAGE [CMD...] | ps | rm CONTAINER... |
             export CONTAINER FILE | commit CONTAINER NAME[:TAG] | check

Owns argument parsing, output formats and exit statuses. Every expected failure is one line on
stderr, `mountctl: <what went wrong>`, never a traceback; exit status 1 for failed commands, 2
for usage errors, and for `run` the command's own status (125 when mountctl could not run it,
126/127 when it could not be executed / found, as docker does). The store root is `--root`,
else $MOUNTCTL_ROOT, else /var/lib/mountctl for root and $XDG_DATA_HOME/mountctl otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mountctl import __version__, fastargs, idmap, ovl
from mountctl.containers import Container, ContainerError, Containers
from mountctl.image import ImageError
from mountctl.layerdirs import remove_tree
from mountctl.spec import DRIVERS, RunOptions, SpecError, check_name
from mountctl.store import Store, StoreError, resolve_root

TYPE_CHECKING = False
if TYPE_CHECKING:  # (typing stays out of `mountctl run`'s start-up)
    import argparse
    from typing import IO, Any, NoReturn

EXIT_FAIL = 1
EXIT_USAGE = 2


class CliError(Exception):
    pass


# --------------------------------------------------------------------------- output helpers


def _ago(ts: float) -> str:
    s = max(0, int(time.time() - ts))
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= size:
            n = s // size
            return f"{n} {unit if n != 1 else unit[:-1]} ago"
    return f"{s} seconds ago"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


class _ProgressBar:
    """A one-line progress bar on a terminal (stderr), at most ten updates a second."""

    def __init__(self, stream: IO[str], label: str) -> None:
        self.stream = stream
        self.label = label
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if total <= 0 or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        frac = min(1.0, done / total)
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% "
                          f"{done / 1048576:.1f}/{total / 1048576:.1f} MiB")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- commands


def _store_map() -> idmap.IdMap | None:
    """The user namespace in which a rootless user's store is changed: the one with their
    subordinate ids, so that extracted files get their real owners (the same ids the
    containers see); None when root, or with a single-id mapping only (then every file simply
    belongs to the user)."""
    if os.geteuid() == 0:
        return None
    plan = idmap.host_plan()
    return plan if plan.method == "newuidmap" else None


def _in_userns(m: idmap.IdMap | None, fn: Callable[[], None]) -> None:
    if m is None:
        fn()
    else:
        idmap.call_in_userns(m, fn)


def cmd_import(store: Store, args: argparse.Namespace) -> int:
    path = os.path.abspath(args.file)

    def work() -> None:
        bar = _ProgressBar(sys.stderr, "importing") if sys.stderr.isatty() else None
        try:
            res = store.import_image(path, tags=[args.name] if args.name else (),
                                     progress=bar)
        finally:
            if bar is not None:
                bar.close()
        rec = res.image
        print(f"{rec.id} {' '.join(rec.names) or '<untagged>'} ({len(rec.layers)} layers, "
              f"{len(res.extracted)} new)")

    _in_userns(_store_map(), work)
    return 0


def cmd_images(store: Store, args: argparse.Namespace) -> int:
    rows = [["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "LAYERS"]]
    for rec in store.images():
        for name in rec.names or ("<none>:<none>",):
            repo, _, tag = name.rpartition(":")
            rows.append([repo, tag, rec.short_id, _ago(rec.imported), str(len(rec.layers))])
    if args.quiet:
        for rec in store.images():
            print(rec.short_id)
        return 0
    print(_table(rows))
    return 0


def cmd_rmi(store: Store, args: argparse.Namespace) -> int:
    failed = 0
    for ref in args.images:
        def work(ref: str = ref) -> None:
            res = store.remove_image(ref)
            for name in res.untagged:
                print(f"Untagged: {name}")
            if res.deleted:
                print(f"Deleted: {res.id}")
            ovl.gc(store.root, store.layers_dir)
            from mountctl import lindex  # (unionfs' layer index: only here and for fuse runs)

            lindex.gc(store.root)

        try:
            _in_userns(_store_map(), work)
        except (StoreError, idmap.UserNsError) as e:
            _error(str(e))
            failed += 1
    return EXIT_FAIL if failed else 0


def cmd_inspect(store: Store, args: argparse.Namespace) -> int:
    rec = store.resolve(args.image)
    print(json.dumps(rec.to_json(), indent=2, sort_keys=True))
    return 0


def cmd_run(store: Store, args: argparse.Namespace) -> int:
    from mountctl.run import RunError, run

    opts = RunOptions(command=tuple(args.command), entrypoint=args.entrypoint,
                      env=tuple(args.env), workdir=args.workdir, user=args.user,
                      hostname=args.hostname, volumes=tuple(args.volume), driver=args.driver)
    notes: list[str] = []
    try:
        if args.name is not None:
            check_name(args.name)
        code = run(store, args.image, opts, name=args.name, remove=args.rm, warn=notes)
    except RunError as e:
        for n in notes:
            _error(n)
        _error(str(e))
        return e.code
    except (StoreError, ImageError, SpecError, idmap.UserNsError, OSError) as e:
        for n in notes:
            _error(n)
        _error(_text(e))
        return 125
    for n in notes:
        _error(n)
    return code


def cmd_ps(store: Store, args: argparse.Namespace) -> int:
    every = Containers(store).all()
    if args.quiet:
        for c in every:
            print(c.short_id)
        return 0
    rows = [["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"]]
    for c in every:
        argv = (c.record.get("spec") or {}).get("argv") or []
        command = " ".join(str(a) for a in argv)
        if len(command) > 30:
            command = command[:27] + "..."
        rows.append([c.short_id, str(c.record.get("image", "")), json.dumps(command),
                     _ago(float(c.record.get("created", 0))), c.status_text(), c.name])
    print(_table(rows))
    return 0


def _owner_map(c: Container) -> idmap.IdMap | None:
    """Rootless, the map of the user namespace the container ran in (its files may belong to
    subordinate ids), else the store's; None when root."""
    m = idmap.IdMap.from_json(c.record.get("idmap"))
    if os.geteuid() != 0 and m.rootless:
        return m
    return _store_map()


def _as_owner(c: Container, fn: Callable[[], None]) -> None:
    """Run `fn` with access to every file of the container."""
    _in_userns(_owner_map(c), fn)


def _stop(c: Container, timeout: float = 20.0) -> None:
    pid = c.record.get("pid")
    if not isinstance(pid, int) or not c.alive():
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while c.alive():
        if time.monotonic() > deadline:
            raise ContainerError(f"container {c.short_id} did not stop within {timeout:.0f}s")
        time.sleep(0.05)


def cmd_rm(store: Store, args: argparse.Namespace) -> int:
    cs = Containers(store)
    failed = 0
    for ref in args.containers:
        try:
            c = cs.get(ref)
            if c.alive():
                if not args.force:
                    raise ContainerError(f"container {c.name} ({c.short_id}) is running; stop "
                                         "it first or use rm -f")
                _stop(c)
            _as_owner(c, lambda c=c: remove_tree(c.dir))  # type: ignore[misc]
            print(c.short_id)
        except (StoreError, idmap.UserNsError, OSError) as e:
            _error(_text(e))
            failed += 1
    return EXIT_FAIL if failed else 0


def _export_here(store: Store, c: Container, fd: int) -> None:
    from mountctl.export import export_upper, sidecar_lookup  # (tarfile: not at every run)

    lowers = store.lowerdirs(str(c.record["image_id"]))
    skip = [str(p) for p in c.record.get("mount_points", [])]
    with os.fdopen(os.dup(fd), "wb") as f:
        export_upper(c.upper, lowers, f, skip=skip, meta=sidecar_lookup())


def _export_to(store: Store, c: Container, fd: int) -> None:
    _as_owner(c, lambda: _export_here(store, c, fd))


def cmd_export(store: Store, args: argparse.Namespace) -> int:
    c = Containers(store).get(args.container)
    if args.file == "-":
        if sys.stdout.isatty():
            raise CliError("refusing to write a tar archive to a terminal")
        sys.stdout.flush()
        _export_to(store, c, sys.stdout.fileno())
        return 0
    dest = Path(args.file)
    import tempfile  # (start-up time: not every command needs it)
    fd, tmp = tempfile.mkstemp(prefix=".mountctl-export-", dir=dest.parent or ".")
    try:
        _export_to(store, c, fd)
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        os.close(fd)
        fd = -1
        os.replace(tmp, dest)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _unlink_quietly(tmp)
        raise
    return 0


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def cmd_commit(store: Store, args: argparse.Namespace) -> int:
    c = Containers(store).get(args.container)
    base = store.resolve(str(c.record["image_id"]))

    def work() -> None:  # export and store in one go, in the container's user namespace
        import hashlib  # (start-up time: not every command needs them)
        import tempfile
        fd, tmp = tempfile.mkstemp(prefix=".tmp-commit-", suffix=".tar", dir=store.root)
        try:
            _export_here(store, c, fd)
            os.lseek(fd, 0, os.SEEK_SET)
            h = hashlib.sha256()
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
            diff_id = "sha256:" + h.hexdigest()
            from mountctl.export import committed_config

            config = committed_config(base.config, diff_id, f"mountctl commit {c.short_id}")
            res = store.add_image(config, tmp, names=[args.name], source=f"container {c.id}")
        finally:
            os.close(fd)
            _unlink_quietly(tmp)
        print(f"{res.image.id} {' '.join(res.image.names)}")

    _as_owner(c, work)
    return 0


def cmd_check(store: Store, args: argparse.Namespace) -> int:
    from mountctl.check import report

    rep = report(str(store.root))
    print("\n".join(rep.lines()))
    return 0 if rep.can_run else EXIT_FAIL


# --------------------------------------------------------------------------- parser


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it ($COLUMNS, standard
    output's terminal, else 80), without importing shutil (see `_Parser`)."""
    with contextlib.suppress(ValueError):
        if (n := int(os.environ.get("COLUMNS", ""))) > 0:
            return n
    try:
        n = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80
    return n if n > 0 else 80


def build_parser() -> argparse.ArgumentParser:
    """Every command's parser (argparse imported here: a run's usual command line is
    read by `fastargs`)."""
    import argparse

    class _Formatter(argparse.HelpFormatter):
        def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                     width: int | None = None) -> None:
            super().__init__(prog, indent_increment, max_help_position,
                             _columns() - 2 if width is None else width)

    class _Parser(argparse.ArgumentParser):
        """argparse's parser with a help formatter that finds the terminal's width itself:
        argparse's own imports shutil for it when an argument is added (with bz2 and lzma, 2 ms
        of every container start)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("formatter_class", _Formatter)
            super().__init__(*args, **kwargs)

    p = _Parser(
        prog="mountctl",
        description="Import container images and run them with unionfs (or kernel overlayfs) "
                    "as the root file system, as root or rootless.")
    p.add_argument("--root", metavar="DIR",
                   help="store directory (default: $MOUNTCTL_ROOT, /var/lib/mountctl for root, "
                        "$XDG_DATA_HOME/mountctl otherwise)")
    p.add_argument("-V", "--version", action="version", version=f"mountctl {__version__}")
    sub = p.add_subparsers(dest="command_name", metavar="COMMAND", required=True,
                           parser_class=_Parser)

    s = sub.add_parser("import", help="import a docker-archive or OCI layout (dir or tar)")
    s.add_argument("file")
    s.add_argument("--name", metavar="NAME[:TAG]", help="name the image (replaces its tags)")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("images", help="list images")
    s.add_argument("-q", "--quiet", action="store_true", help="only image ids")
    s.set_defaults(func=cmd_images)

    s = sub.add_parser("rmi", help="remove images (refused while a container uses one)")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.set_defaults(func=cmd_rmi)

    s = sub.add_parser("inspect", help="show an image's record and config as JSON")
    s.add_argument("image")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("run", help="run a command in a new container")
    s.add_argument("--rm", action="store_true", help="remove the container when it exits")
    s.add_argument("--name", help="container name")
    s.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                   help="set an environment variable (K alone: copy it from here)")
    s.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside")
    s.add_argument("-u", "--user", metavar="UID[:GID]", help="user (names or numbers)")
    s.add_argument("-v", "--volume", action="append", default=[], metavar="SRC:DST[:ro]",
                   help="bind mount a host path")
    s.add_argument("--hostname", help="host name (default: the container's short id)")
    s.add_argument("--entrypoint", help="replace the image's entrypoint ('' for none)")
    s.add_argument("--driver", choices=DRIVERS, default="auto",
                   help="root file system: auto (kernel overlayfs if it mounts, else unionfs), "
                        "fuse (unionfs), overlay (kernel overlayfs)")
    s.add_argument("image")
    s.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("ps", help="list containers")
    s.add_argument("-a", "--all", action="store_true", help="accepted: ps always lists all")
    s.add_argument("-q", "--quiet", action="store_true", help="only container ids")
    s.set_defaults(func=cmd_ps)

    s = sub.add_parser("rm", help="remove containers")
    s.add_argument("-f", "--force", action="store_true", help="stop a running one first")
    s.add_argument("containers", nargs="+", metavar="CONTAINER")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("export", help="write a container's changes as an OCI layer tar")
    s.add_argument("container")
    s.add_argument("file", help="output file ('-': standard output)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("commit", help="make an image from a container's changes")
    s.add_argument("container")
    s.add_argument("name", metavar="NAME[:TAG]")
    s.set_defaults(func=cmd_commit)

    s = sub.add_parser("check", help="explain what this host allows and how run will work")
    s.set_defaults(func=cmd_check)
    return p


def _text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def _error(msg: str) -> None:
    print(f"mountctl: {msg}", file=sys.stderr)


def entry() -> NoReturn:
    """The `mountctl` command (and `python -m mountctl`): `main`, then the exit without the
    interpreter's teardown, which frees every module's objects one by one (6 ms of every
    command here; nothing of this process is needed once its output is flushed)."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # (the reader went away: what Python's own exit reports)
        code = code or 120
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    fast = fastargs.parse(sys.argv[1:] if argv is None else argv)
    if fast is not None:
        fast.func = cmd_run
        args: argparse.Namespace = fast  # type: ignore[assignment]  # (the same attributes)
    else:
        args = build_parser().parse_args(argv)
    store = Store(resolve_root(args.root))
    try:
        code: int = args.func(store, args)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAIL
    except (StoreError, ImageError, SpecError, idmap.UserNsError, CliError, OSError) as e:
        _error(_text(e))
        return EXIT_FAIL
