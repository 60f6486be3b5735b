"""The command line, compatible with fuse-overlayfs, turned into a checked, frozen `Config`.

    unionfs [-f] [-d] -o lowerdir=L1:L2,upperdir=U,workdir=W[,opt...] [SOURCE] MOUNTPOINT
    unionfs index build -o lowerdir=L1:L2:... FILE      (a lower index, see layerindex.py)
    unionfs cache dir|list|prune|clear [-o lowercache=DIR]   (the lower cache, lowercache.py)

Bad input is reported as one line on stderr and exit status 1 (2 for usage errors), never a
traceback. `parse_options` and `check` are separate from `main` so tests can call them directly.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Sequence

from . import __version__, log
from .config import Config
from .layerindex import AUTO as AUTO_INDEX
from .linkindex import LINKS_SUBDIR
from .lowercache import default_dir as default_cache_dir
from .mount import GENERIC_FUSE_OPTIONS
from .mountinfo import mounts
from .tuples import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

HELP_OPTIONS = """\
mount options (-o, comma separated, may repeat):
  lowerdir=L1:L2:...   read-only branches, top first (required); '\\:' escapes a colon
  upperdir=DIR         writable branch (needs workdir; without both the mount is read-only)
  workdir=DIR          empty work directory on the same file system as upperdir
  fsname=NAME          name shown as the mount's source (default: unionfs)
  timeout=SECONDS      kernel entry/attribute cache timeout (default 86400)
  writeback=0|1        kernel writeback cache (default 1)
  readahead=KIB        the mount's read-ahead window in KiB (default 1024; 0 keeps the kernel's;
                       needs root, silently kept otherwise)
  noopen=0|1           no open/create/release requests: files are read and written per inode,
                       fewer requests per file opened (default 0; needs the patched pyfuse3 and
                       root). Copy-up happens at the first write, not at open, so its errors
                       (ENOSPC, EROFS) surface from write/fsync/close instead of open
  dircache=0|1         kernel caches directory listings, no opendir/releasedir requests
                       (default 1; needs the pyfuse3 that scripts/setup.sh builds, else off)
  loop=direct|trio     how requests are received: direct (default with the pyfuse3 that
                       scripts/setup.sh builds) reads /dev/fuse in the main thread and answers
                       each request at once; trio runs pyfuse3's trio main loop (several times
                       the cost per request; always used with an upstream pyfuse3)
  spin=MICROSECONDS    with loop=direct, after each request poll this long for the next one
                       before sleeping (default 50; 0 never polls; off with a single CPU
                       or a cgroup CPU quota under two CPUs):
                       a client that sends its next request within that time finds the
                       server awake, which saves two task wake-ups per request (costly on
                       virtual machines); costs up to that much CPU time per request, and
                       stops while requests come further apart than that
  lowerindex=FILE      an index of the lower branches (`unionfs index build`): lookups read
                       the lower layers from it instead of probing each one; the mount fails
                       if the index was built for other layers or a layer changed since
  lowerindex=auto      the same, the index kept in the lowercache= directory: a mount that
                       finds none for these layers (or a stale one) runs without and builds
                       it after the unmount, for the next mount (with lowerindex_check=roots,
                       for layers immutable by construction, lookups then touch no layer)
  lowerindex_check=dirs|files|roots
                       how the index is checked at mount, and what it then answers:
                       dirs (default): every indexed directory's inode, mtime and ctime; the
                         index answers which layer holds a name, attributes are stat'ed live;
                       files: that, plus every indexed object's lstat (all but atime, one
                         stat per object at mount); lookups/getattr of lower objects are then
                         answered from the index's attributes, without touching the layer;
                       roots: only the layers' roots; attributes from the index too (for
                         layers immutable by construction, as in mountctl's store)
                       (attributes served from the index show the atime of the build)
  lowercache=DIR|off   where each lower layer's directory listings and opaque flags, once
                       read, are kept for the next mount (one file per layer; default
                       /var/cache/unionfs/layers as root, else $XDG_CACHE_HOME/unionfs/layers;
                       $UNIONFS_LOWER_CACHE overrides; off keeps nothing). A cached directory
                       is used after one lstat shows it unchanged, so a cold lookup in a deep
                       stack reads no directory of the layers that do not hold the name.
                       Not used with lowerindex=
  lowercache_check=ahead|inline
                       ahead (default): at mount a helper process checks every cached
                       directory (one lstat each), on another CPU, ahead of the lookups that
                       need them; what it has not reached yet is checked at first use, as
                       with inline (always inline for fewer than 8 lower layers, with a
                       single CPU or a cgroup CPU quota under two CPUs)
  allow_other          let other users in (default when run as root)
  allow_root           accepted for compatibility (implies allow_other)
  default_permissions  kernel permission checks (always on)
  debug                same as -d
accepted and ignored for fuse-overlayfs compatibility:
  fsync=, fast_ino=, static_nlink, noacl, threaded=, volatile, xattr_permissions=,
  squash_to_root, squash_to_uid=, squash_to_gid=, uidmapping=, gidmapping=, max_idle_threads=
generic mount options (passed to the kernel where meaningful):
  rw, ro, dev, nodev, suid, nosuid, exec, noexec, atime, noatime, relatime, strictatime,
  lazytime, sync, async, dirsync, context=, fscontext=, defcontext=, rootcontext=, x-*
"""

_IGNORED_FLAGS = {"static_nlink", "noacl", "volatile", "squash_to_root", "nonempty",
                  "default_permissions", "relatime", "strictatime", "lazytime", "nofail",
                  "auto", "noauto", "user", "users", "nouser", "_netdev", "norelatime",
                  "nodiratime", "diratime", "silent", "loud"}
_IGNORED_KEYS = {"fsync", "fast_ino", "threaded", "xattr_permissions", "squash_to_uid",
                 "squash_to_gid", "uidmapping", "gidmapping", "max_idle_threads", "context",
                 "fscontext", "defcontext", "rootcontext", "plugins", "redirect_dir", "index",
                 "metacopy", "xino", "max_threads", "uid", "gid", "default_permissions"}


class UsageError(Exception):
    """Bad command line or bad branches: reported as one line, exit status 1."""


def split_options(text: str) -> list[str]:
    """Split a -o string on commas, honouring backslash escapes (kept for lowerdir)."""
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if c == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def split_lowerdir(value: str) -> list[str]:
    r"""Split lowerdir on ':' ; '\:' is a literal colon, '\\' a backslash, '\,' a comma."""
    out: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            cur.append(value[i + 1])
            i += 2
            continue
        if c == ":":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def _unescape(value: str) -> str:
    return "".join(split_lowerdir(value.replace(":", "\\:")))


def _bounded_int(key: str, value: str, high: int, unit: str) -> int:
    """The value of option KEY as an integer in 0..HIGH (of UNIT), or a UsageError."""
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"{key}: not a number of {unit}: {value!r}") from None
    if not 0 <= n <= high:
        raise UsageError(f"{key}: expected 0..{high} {unit}")
    return n


def parse_options(opts: Sequence[str]) -> dict[str, object]:
    """Interpret the -o options. Returns the recognised settings."""
    res: dict[str, object] = {"fuse": []}
    fuse: list[str] = []
    for raw in opts:
        for opt in split_options(raw):
            if not opt:
                continue  # a trailing comma, as podman writes
            key, eq, value = opt.partition("=")
            if key == "lowerdir":
                dirs = split_lowerdir(value)
                if not value or any(not d for d in dirs):
                    raise UsageError("lowerdir: empty branch path")
                res["lowerdir"] = dirs
            elif key in ("upperdir", "workdir", "fsname", "lowerindex", "lowercache"):
                if not value:
                    raise UsageError(f"{key}: empty value")
                res[key] = _unescape(value)
            elif key == "timeout":
                try:
                    t = float(value)
                except ValueError:
                    raise UsageError(f"timeout: not a number: {value!r}") from None
                if t <= 0:
                    raise UsageError("timeout: must be > 0 (0 disables the kernel cache "
                                     "and makes every read cost a request)")
                res["timeout"] = t
            elif key == "writeback":
                if value not in ("0", "1"):
                    raise UsageError(f"writeback: expected 0 or 1, got {value!r}")
                res["writeback"] = value == "1"
            elif key == "readahead":
                res["readahead"] = _bounded_int(key, value, 65536, "KiB")
            elif key == "spin":
                res["spin"] = _bounded_int(key, value, 10000, "microseconds")
            elif key == "lowerindex_check":
                if value not in ("dirs", "files", "roots"):
                    raise UsageError(f"lowerindex_check: expected dirs, files or roots, got "
                                     f"{value!r}")
                res[key] = value
            elif key == "lowercache_check":
                if value not in ("ahead", "inline"):
                    raise UsageError(f"lowercache_check: expected ahead or inline, got "
                                     f"{value!r}")
                res[key] = value
            elif key == "loop":
                if value not in ("direct", "trio"):
                    raise UsageError(f"loop: expected direct or trio, got {value!r}")
                res[key] = value
            elif key in ("dircache", "noopen"):
                if value not in ("0", "1"):
                    raise UsageError(f"{key}: expected 0 or 1, got {value!r}")
                res[key] = value == "1"
            elif key in ("allow_other", "allow_root") and not eq:
                res["allow_other"] = True
            elif key == "debug" and not eq:
                res["debug"] = True
            elif not eq and key in GENERIC_FUSE_OPTIONS:
                fuse.append(key)
            elif (not eq and key in _IGNORED_FLAGS) or (eq and key in _IGNORED_KEYS) \
                    or key.startswith("x-"):
                continue
            else:
                raise UsageError(f"unknown option: {opt!r} (see unionfs --help)")
    res["fuse"] = fuse
    return res


def _is_dir(path: str, what: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path!r} does not exist") from None
    except OSError as e:
        raise UsageError(f"{what} {path!r}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {path!r} is not a directory")
    return os.path.realpath(path)


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _mounted_paths() -> set[str]:
    try:
        return {mp for mp, _ in mounts()}
    except OSError:
        return set()


ALLOWED_IN_WORKDIR = {"work", "index", "incompat", LINKS_SUBDIR}


def check(settings: dict[str, object], mountpoint: str, foreground: bool, debug: bool
          ) -> Config:
    """Validate branches and mount point; build the Config."""
    lowers_raw = settings.get("lowerdir")
    if not lowers_raw:
        raise UsageError("missing -o lowerdir=DIR[:DIR...]")
    assert isinstance(lowers_raw, list)
    lowers = [_is_dir(p, "lowerdir") for p in lowers_raw]
    upper = settings.get("upperdir")
    work = settings.get("workdir")
    assert upper is None or isinstance(upper, str)
    assert work is None or isinstance(work, str)
    if (upper is None) != (work is None):
        raise UsageError("upperdir and workdir go together: give both or neither")
    if upper is not None:
        assert isinstance(upper, str) and isinstance(work, str)
        upper = _is_dir(upper, "upperdir")
        work = _is_dir(work, "workdir")
        if os.stat(upper).st_dev != os.stat(work).st_dev:
            raise UsageError(f"workdir {work!r} is not on the same file system as upperdir "
                             f"{upper!r}")
        if _inside(work, upper) or _inside(upper, work):
            raise UsageError("upperdir and workdir must not contain each other")
        for low in lowers:
            if _inside(upper, low) or _inside(low, upper):
                raise UsageError(f"upperdir {upper!r} overlaps lowerdir {low!r}")
            if _inside(work, low):
                raise UsageError(f"workdir {work!r} is inside lowerdir {low!r}")
        foreign = sorted(set(os.listdir(work)) - ALLOWED_IN_WORKDIR)
        if foreign:
            raise UsageError(f"workdir {work!r} holds files that are not ours: "
                             f"{', '.join(foreign[:5])} (use an empty directory)")
        if not os.access(upper, os.W_OK) or not os.access(work, os.W_OK):
            raise UsageError("upperdir and workdir must be writable")
    mnt = _is_dir(mountpoint, "mountpoint")
    if mnt in _mounted_paths() and not any(mnt == p for p in lowers):
        raise UsageError(f"mountpoint {mountpoint!r} is busy: something is mounted there")
    fuse_opts = settings.get("fuse", [])
    assert isinstance(fuse_opts, list)
    fsname = settings.get("fsname", "unionfs")
    timeout = settings.get("timeout", 86400.0)
    assert isinstance(fsname, str) and isinstance(timeout, float)
    writeback = settings.get("writeback", True)
    lowercache = settings.get("lowercache", default_cache_dir())
    assert lowercache is None or isinstance(lowercache, str)
    if lowercache == "off":
        lowercache = None
    elif lowercache is not None:
        lowercache = os.path.abspath(lowercache)
        if os.path.exists(lowercache) and not os.path.isdir(lowercache):
            raise UsageError(f"lowercache {lowercache!r} is not a directory")
    lowerindex = settings.get("lowerindex")
    if lowerindex == AUTO_INDEX:
        if lowercache is None:
            raise UsageError("lowerindex=auto keeps the index in the lower cache directory: "
                             "give one (lowercache=DIR)")
    elif lowerindex is not None:
        assert isinstance(lowerindex, str)
        if not os.path.isfile(lowerindex):
            raise UsageError(f"lowerindex {lowerindex!r} is not a file")
        lowerindex = os.path.realpath(lowerindex)
    return Config(
        lowers=tuple(lowers), mountpoint=mnt, upper=upper, work=work,
        foreground=foreground or debug, debug=debug, fsname=fsname,
        allow_other=bool(settings.get("allow_other", os.geteuid() == 0)),
        timeout=timeout, writeback=bool(writeback), fuse_options=tuple(fuse_opts),
        dircache=bool(settings.get("dircache", True)),
        noopen=bool(settings.get("noopen", False)),
        readahead_kib=int(settings.get("readahead", 1024)),  # type: ignore[call-overload]
        lowerindex=lowerindex,
        lowerindex_check=str(settings.get("lowerindex_check", "dirs")),
        lowercache=lowercache,
        lowercache_check=str(settings.get("lowercache_check", "ahead")),
        loop=str(settings.get("loop", "direct")),
        spin_us=int(settings.get("spin", 50)),  # type: ignore[call-overload]
    )


class Args(NamedTuple):
    """The mount command line: `-o` values in order, `-f`, `-d`, the paths."""

    options: list[str]
    foreground: bool
    debug: bool
    paths: list[str]


def parse_simple(argv: Sequence[str]) -> Args | None:
    """The command line as `build_parser` parses it, for the forms mount programs use (`-o
    VALUE`, `-f`, `-d`, paths, in any order), or None for anything else (help, version,
    attached or unknown options, usage errors), which `parse_args` leaves to argparse: every
    mount starts a Python process, and importing argparse costs about 4 ms of it. A property
    test holds the two parsers to the same result."""
    options: list[str] = []
    paths: list[str] = []
    foreground = debug = False
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            value = next(it, None)
            if value is None or value.startswith("-"):
                return None
            options.append(value)
        elif arg == "-f":
            foreground = True
        elif arg == "-d":
            debug = True
        elif arg.startswith("-"):
            return None
        else:
            paths.append(arg)
    if not paths:
        return None
    return Args(options, foreground, debug, paths)


def parse_args(argv: Sequence[str]) -> tuple[Args, argparse.ArgumentParser | None]:
    """The mount command line, and the argparse parser if it took one to parse it (for its
    error messages). Exits as argparse does on --help, --version and usage errors."""
    simple = parse_simple(argv)
    if simple is not None:
        return simple, None
    parser = build_parser()
    ns = parser.parse_intermixed_args(argv)
    return Args(ns.options, ns.foreground, ns.debug, ns.paths), parser


def build_parser() -> argparse.ArgumentParser:
    import argparse
    p = argparse.ArgumentParser(
        prog="unionfs",
        description="A union file system in user space: read-only lower branches under one "
                    "writable upper branch, with overlayfs/OCI whiteouts. Command line "
                    "compatible with fuse-overlayfs. Also: `unionfs index build` (a lower "
                    "index) and `unionfs cache dir|list|prune|clear` (the lower cache).",
        epilog=HELP_OPTIONS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, see below")
    p.add_argument("-f", dest="foreground", action="store_true",
                   help="stay in the foreground (default: return once mounted)")
    p.add_argument("-d", dest="debug", action="store_true",
                   help="log every request to stderr (implies -f)")
    p.add_argument("-V", "--version", action="version", version=f"unionfs {__version__}")
    p.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT",
                   help="mount point; a preceding SOURCE (as mount(8) passes) is ignored")
    return p


INDEX_USAGE = "usage: unionfs index build -o lowerdir=L1:L2:... FILE"


def index_main(argv: Sequence[str]) -> int:
    """`unionfs index build -o lowerdir=L1:L2:... FILE`: write the lower index of a stack."""
    import argparse
    p = argparse.ArgumentParser(
        prog="unionfs index build",
        description="Walk the lower branches once and write what they hold to FILE, for "
                    "`-o lowerindex=FILE` (rebuild it whenever a layer changes).")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="lowerdir=L1:L2:... (top first, as for mounting; other mount "
                        "options are accepted and ignored)")
    p.add_argument("file", metavar="FILE")
    args = p.parse_args(argv)
    try:
        settings = parse_options(args.options)
        lowers_raw = settings.get("lowerdir")
        if not lowers_raw:
            raise UsageError("missing -o lowerdir=DIR[:DIR...]")
        assert isinstance(lowers_raw, list)
        lowers = [_is_dir(d, "lowerdir") for d in lowers_raw]
    except UsageError as e:
        print(f"unionfs: {e}", file=sys.stderr)
        return 1
    from .layerindex import write

    try:
        write(lowers, args.file)
    except OSError as e:
        print(f"unionfs: cannot build the index {args.file!r}: {e}", file=sys.stderr)
        return 1
    return 0


CACHE_USAGE = "usage: unionfs cache {dir,list,prune,clear} [-o lowercache=DIR] [--days N]"


def cache_main(argv: Sequence[str]) -> int:
    """`unionfs cache dir|list|prune|clear`: look after the lower cache directory."""
    import argparse
    p = argparse.ArgumentParser(
        prog="unionfs cache",
        description="The lower cache (see lowercache= in unionfs --help): dir prints where it "
                    "is, list shows its files (kind, size, last use, layers), prune removes "
                    "the files no mount used for --days (default 30; unmounts do it too), "
                    "clear removes them all (the next mounts read their layers afresh).")
    p.add_argument("action", choices=("dir", "list", "prune", "clear"))
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="lowercache=DIR (default as for mounting)")
    p.add_argument("--days", type=float, default=None, metavar="N")
    args = p.parse_args(argv)
    from . import lowercache

    try:
        settings = parse_options(args.options)
    except UsageError as e:
        print(f"unionfs: {e}", file=sys.stderr)
        return 1
    where = settings.get("lowercache", default_cache_dir())
    if where is None or where == "off":
        print("unionfs: no lower cache directory (lowercache=off, or no HOME)", file=sys.stderr)
        return 1
    assert isinstance(where, str)
    where = os.path.abspath(where)
    if args.action == "dir":
        print(where)
        return 0
    if args.days is not None and (args.action != "prune" or args.days < 0):
        print("unionfs: --days N (N >= 0) goes with prune", file=sys.stderr)
        return 1
    try:
        names = sorted(os.listdir(where))
    except FileNotFoundError:
        names = []
    except OSError as e:
        print(f"unionfs: {where}: {e.strerror}", file=sys.stderr)
        return 1
    files = [n for n in names if n.endswith((".layer", ".index", ".tmp"))]
    if args.action == "list":
        try:
            for n in files:
                path = os.path.join(where, n)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                kind = n.rsplit(".", 1)[1]
                used = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.st_mtime))
                layers = ":".join(lowercache.describe(path)) or "-"
                print(f"{kind:5}  {st.st_size:>10}  {used}  {layers}", flush=True)
        except BrokenPipeError:  # (| head)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.action == "prune":
        days = lowercache.UNUSED_DAYS if args.days is None else args.days
        print(f"removed {lowercache.prune(where, days=days)} file(s) from {where}")
        return 0
    removed = 0
    for n in files:
        try:
            os.unlink(os.path.join(where, n))
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as e:
            print(f"unionfs: {n}: {e.strerror}", file=sys.stderr)
            return 1
    print(f"removed {removed} file(s) from {where}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["cache"]:
        return cache_main(args_list[1:])
    if args_list[:1] == ["index"]:
        if args_list[1:2] != ["build"]:
            print(INDEX_USAGE, file=sys.stderr)
            return 2
        return index_main(args_list[2:])
    args, parser = parse_args(args_list)
    if len(args.paths) > 2:
        (parser or build_parser()).error("too many arguments: expected [SOURCE] MOUNTPOINT")
    mountpoint = args.paths[-1]
    try:
        settings = parse_options(args.options)
        debug = bool(args.debug or settings.get("debug"))
        config = check(settings, mountpoint, args.foreground, debug)
    except UsageError as e:
        print(f"unionfs: {e}", file=sys.stderr)
        return 1
    log.setup(log.DEBUG if config.debug else log.WARNING, "unionfs: %(levelname)s %(message)s")
    from .mount import run

    def on_error(msg: str) -> None:
        print(f"unionfs: {msg}", file=sys.stderr)

    try:
        return run(config, on_error, exit_when_mounted=True)
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"unionfs: cannot mount {mountpoint!r}: {e.strerror or e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"unionfs: cannot mount {mountpoint!r}: {e}", file=sys.stderr)
        return 1
