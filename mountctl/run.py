"""The supervisor: mount the container's root, run the container in its namespaces, tear down.

Processes and namespaces (DESIGN.md section 4), for one `mountctl run`:

    S  supervisor (this process). Leaves the host mount namespace first: rootful it unshares a
       mount namespace M1 (made rslave); rootless it unshares a user namespace U together with
       M1 (owned by U), mapped by idmap.enter_userns. In M1 it mounts the union on
       `<container>/merged`: kernel overlayfs (with ovl.py's shims) or unionfs, which runs in
       S's forked child F (`unionfs -f`, not exec'd: `_server_main`) in U+M1 (in its own
       session, PDEATHSIG=SIGTERM, named unionfs). So the FUSE server never lives in the
       namespace that calls pivot_root, and no mount of the container is ever visible on the
       host or outlives S and its children.
    C  forked by S: setsid, then unshare(mount | pid | uts | ipc). Its mount namespace M2 is a
       child copy of M1. C forks P, reports P's pid to S, waits for P and exits with P's
       status. (C exists because a process cannot enter the pid namespace it creates; S stays
       outside it so that it can still fork when the container is gone.)
    P  PID 1 of the new pid namespace: builds the tree and pivots into it (rootfs.py), sets the
       hostname, resolves the user against the container's /etc/passwd and /etc/group, then
       forks the command X and becomes a tiny init: it reaps every zombie, forwards SIGINT,
       SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGWINCH to X, and exits with X's status
       (128+N when X was killed by signal N). The command is not PID 1 because PID 1 ignores
       every signal it has no handler for: `sh -c 'sleep 100'` would not die of SIGTERM.
    X  the command: capability bounding set cut to CONTAINER_CAPS, supplementary groups,
       gid, uid, no_new_privs, working directory, exec.

The container's root is mounted nodev (layers extracted as root may hold device nodes, and
there is no device cgroup here); C closes every inherited descriptor but stdio and its pipes,
so PID 1 holds nothing of the supervisor's. The network is the host's (no net namespace).

S forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to P (by pidfd), polls pidfds of C
and of the FUSE server, and returns C's status. If the server dies first, S kills P (which
takes the whole pid namespace with it), reports "unionfs server died" and returns 125. On the
way out it always unmounts the union, stops the server (SIGTERM, then SIGKILL) and updates the
container record; `--rm` then removes the container directory. PDEATHSIG links C to S and P to
C, so killing S with SIGKILL still takes the container and the server down.

Exit statuses as docker's: the command's; 125 when mountctl could not run it; 126 when the
command cannot be executed; 127 when it is not found.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from mountctl import idmap as ids_mod
from mountctl import ovl, rootfs
from mountctl import syscalls as sc
from mountctl.containers import Container, Containers, new_id, proc_start_time
from mountctl.layerdirs import remove_tree
from mountctl.spec import ContainerSpec, RunOptions, SpecError, build_spec, resolve_user
from mountctl.store import Store
from unionfs.tuples import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:  # (typing stays out of `mountctl run`'s start-up)
    from typing import NoReturn

EXIT_SETUP = 125
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
INIT_FORWARDED = (*FORWARDED, signal.SIGWINCH)
CONTAINER_CAPS = frozenset({
    sc.CAP_CHOWN, sc.CAP_DAC_OVERRIDE, sc.CAP_FOWNER, sc.CAP_FSETID, sc.CAP_KILL,
    sc.CAP_SETGID, sc.CAP_SETUID, sc.CAP_SETPCAP, sc.CAP_NET_BIND_SERVICE, sc.CAP_NET_RAW,
    sc.CAP_SYS_CHROOT, sc.CAP_AUDIT_WRITE, sc.CAP_SETFCAP})
"""What root in the container keeps: docker's default set without CAP_MKNOD (there is no
device cgroup here). No CAP_SYS_ADMIN: the container cannot remount /sys or its volumes."""
MOUNT_TIMEOUT = 30.0
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
OVERLAY_DATA_MAX = 4000


class RunError(Exception):
    """mountctl could not run the container; `code` is the exit status to return."""

    def __init__(self, message: str, code: int = EXIT_SETUP) -> None:
        super().__init__(message)
        self.code = code


def exit_code(status: int) -> int:
    """A wait status as a shell would show it: the exit code, or 128+N for signal N."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return EXIT_SETUP


# --------------------------------------------------------------------------- signals


class _Signals:
    """SIGINT & co. queued for the supervisor's poll loop (a wakeup fd makes poll return)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pending: list[int] = []
        self.old: dict[int, signal._HANDLER] = {}
        self.old_wakeup = -1

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)

    def install(self) -> None:
        self.old_wakeup = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
        for s in FORWARDED:
            self.old[s] = signal.signal(s, self._handler)

    def drain(self) -> None:
        """Empty the wakeup pipe (the signals stay pending)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.r, 512):
                pass

    def take(self) -> list[int]:
        self.drain()
        out, self.pending = self.pending, []
        return out

    def abort_requested(self) -> int | None:
        for s in self.pending:
            if s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                return s
        return None

    def restore(self) -> None:
        signal.set_wakeup_fd(self.old_wakeup)
        for s, h in self.old.items():
            signal.signal(s, h)
        os.close(self.r)
        os.close(self.w)

    @staticmethod
    def reset_in_child() -> None:
        signal.set_wakeup_fd(-1)
        for s in INIT_FORWARDED:
            signal.signal(s, signal.SIG_DFL)


# --------------------------------------------------------------------------- the union


def _esc(p: Path | str) -> str:
    return str(p).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _mounted_fs(path: Path) -> str | None:
    """The file system type mounted at `path` in this mount namespace, if any."""
    target = os.fsencode(os.path.realpath(path))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            if rootfs._unescape(left.split()[4]) == target:
                found = right.split()[0].decode()
    return found


class _Union(NamedTuple):
    kind: str  # "overlay" or "fuse"
    merged: Path
    server: _Server | None = None
    log: Path | None = None

    def log_tail(self) -> str:
        if self.log is None:
            return ""
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def teardown(self) -> None:
        if _mounted_fs(self.merged) is not None:
            try:
                sc.umount2(self.merged, 0)
            except OSError:
                with contextlib.suppress(OSError):
                    sc.umount2(self.merged, sc.MNT_DETACH)
        srv = self.server
        if srv is None:
            return
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and srv.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(srv.pid, sig)
            if srv.wait(STOP_TIMEOUT if sig != signal.SIGKILL else None) is not None:
                return


class _Server:
    """The unionfs server, our forked child (`start_unionfs`): what the supervisor asks of it,
    as subprocess.Popen would answer (returncode: exit status, or -N if killed by signal N)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Its returncode once it exited; None if TIMEOUT (seconds) passed first."""
        if self.poll() is None and timeout is not None:
            fd = os.pidfd_open(self.pid)
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                poller.poll(int(timeout * 1000))
            finally:
                os.close(fd)
            return self.poll()
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def _overlay_data(lowers: Sequence[Path], c: Container, rootless: bool, base: Path) -> str:
    def opts(paths: Sequence[str], upper: str, work: str) -> str:
        data = (f"lowerdir={':'.join(_esc(p) for p in paths)},upperdir={_esc(upper)},"
                f"workdir={_esc(work)}")
        return data + (",userxattr" if rootless else "")

    data = opts([str(p) for p in lowers], str(c.upper), str(c.work))
    if len(data) <= OVERLAY_DATA_MAX:
        return data
    # One page of options at most: relative paths, resolved from `base` (our cwd at mount).
    return opts([os.path.relpath(p, base) for p in lowers], os.path.relpath(c.upper, base),
                os.path.relpath(c.work, base))


def mount_overlay(store: Store, lowers: Sequence[Path], c: Container, rootless: bool) -> _Union:
    """Kernel overlayfs on c.merged (OSError when the kernel refuses)."""
    layers = ovl.overlay_lowers(store.root, lowers, rootless=rootless)
    data = _overlay_data(layers, c, rootless, store.root)
    if len(data) > OVERLAY_DATA_MAX:
        raise OSError(errno.E2BIG, f"too many layers for kernel overlayfs ({len(layers)})")
    old = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(store.root)
        sc.mount("overlay", c.merged, "overlay", sc.MS_NODEV, data)
    finally:
        os.fchdir(old)
        os.close(old)
    return _Union("overlay", c.merged)


def start_unionfs(lowers: Sequence[Path], c: Container, signals: _Signals,
                  index: Path | None = None) -> _Union:
    """unionfs in the foreground as our child, in its own session; wait for its mount.
    INDEX: the stack's lower index (`lindex`), if there is one."""
    from mountctl import lindex  # (unionfs' own modules: not for a kernel overlayfs run)

    opts = ",".join([f"lowerdir={':'.join(_esc(p) for p in lowers)}",
                     f"upperdir={_esc(c.upper)}", f"workdir={_esc(c.work)}", "fsname=mountctl",
                     "nodev", *([f"lowerindex={_esc(index)}", f"lowerindex_check={lindex.CHECK}"]
                                if index is not None else [])])
    log = c.dir / "unionfs.log"
    argv = ["-f", "-o", opts, str(c.merged)]
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        me = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the server side
            _server_main(argv, logfd, me)
    finally:
        os.close(logfd)
    server = _Server(pid)
    union = _Union("fuse", c.merged, server, log)
    try:
        _wait_mounted(union, server, signals, time.monotonic() + MOUNT_TIMEOUT)
    except BaseException:
        union.teardown()
        raise
    return union


def _server_main(argv: list[str], logfd: int, parent: int) -> NoReturn:  # pragma: no cover
    """The forked child that becomes the unionfs server: `unionfs -f -o ... MERGED`, run in
    this process rather than exec'd. A new Python would spend 16 ms starting before its first
    import (27 against 11 ms until mounted); this one has the interpreter and, through
    `lindex`, part of unionfs already.

    Like the exec it replaces: a session of its own, SIGTERM when we die, standard input from
    /dev/null, output to LOGFD, no other fd of ours (a lock's fd kept open here would hold
    the lock for the server's lifetime), the signal dispositions reset. What this process
    inherited of ours is never collected (`gc.freeze`): no finalizer of an object of ours can
    then close an fd number the server has reused."""
    code = EXIT_SETUP
    try:
        sc.set_pdeathsig(signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(code)
        gc.freeze()
        os.setsid()
        _Signals.reset_in_child()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        _close_fds_except({0, 1, 2})
        sc.set_name("unionfs")
        from unionfs.cli import main

        code = main(argv)
    except SystemExit as e:  # (its command-line parser's exit)
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        with contextlib.suppress(BaseException):
            import traceback

            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _wait_mounted(union: _Union, server: _Server, signals: _Signals,
                  deadline: float) -> None:
    """Wait until SERVER's FUSE mount is on union.merged: woken by the kernel when the mount
    table changes (a poll of /proc/self/mountinfo reports POLLPRI), when the server exits or
    a signal arrives, not by a timer (a container start waits for this mount, and on a small
    machine a loop re-reading the table takes CPU from the server starting up)."""
    table = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)  # (before looking)
    pidfd = os.pidfd_open(server.pid)
    try:
        poller = select.poll()
        poller.register(table, select.POLLPRI)
        poller.register(pidfd, select.POLLIN)
        poller.register(signals.r, select.POLLIN)
        while (_mounted_fs(union.merged) or "").split(".")[0] != "fuse":
            if server.poll() is not None:
                detail = union.log_tail()
                raise RunError("unionfs could not mount the container's root"
                               + (f": {detail}" if detail else
                                  f" (exit status {server.returncode})"))
            if signals.abort_requested() is not None:
                raise RunError("interrupted while mounting", 128 + signals.pending[0])
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunError(f"unionfs did not mount the container's root within "
                               f"{MOUNT_TIMEOUT:.0f}s")
            poller.poll(max(1, int(left * 1000)))
            signals.drain()  # (what arrived is in `pending`; forwarded once the container runs)
    finally:
        os.close(pidfd)
        os.close(table)


def mount_union(store: Store, lowers: Sequence[Path], c: Container, driver: str,
                rootless: bool, signals: _Signals) -> _Union:
    """The container's root on c.merged. `auto`: kernel overlayfs if a mount works here,
    else unionfs; `overlay`/`fuse` force one."""
    if driver in ("auto", "overlay"):
        try:
            return mount_overlay(store, lowers, c, rootless)
        except OSError as e:
            if driver == "overlay":
                raise RunError(f"kernel overlayfs refused to mount the container's root: "
                               f"{e.strerror or e} (try --driver fuse)") from None
    from mountctl import lindex

    return start_unionfs(lowers, c, signals, lindex.ensure(store.root, lowers))


# --------------------------------------------------------------------------- container side


class _Ctx(NamedTuple):
    """Everything the container side needs, computed before the fork."""

    merged: str
    spec: ContainerSpec
    binds: tuple[rootfs.Bind, ...]
    idmap: ids_mod.IdMap
    errw: int
    pidw: int
    supervisor: int


def _report(fd: int, msg: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (msg.replace("\n", " ") + "\n").encode(errors="replace")[:4000])


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return str(e) or type(e).__name__


def _close_fds_except(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _container_main(ctx: _Ctx) -> NoReturn:  # pragma: no cover - runs in a forked child
    """C: new namespaces, fork P, report its pid, wait for it."""
    code = EXIT_SETUP
    try:
        sc.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != ctx.supervisor:
            os._exit(EXIT_SETUP)
        _close_fds_except({0, 1, 2, ctx.errw, ctx.pidw})
        # S forwards signals to P; C shares S's command line, so `pkill -f` hits it too
        for s in FORWARDED:
            signal.signal(s, signal.SIG_IGN)
        os.setsid()
        sc.unshare(sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC)
        init = os.fork()
        if init == 0:
            _init_main(ctx)
        os.write(ctx.pidw, struct.pack("=i", init))
        os.close(ctx.pidw)
        while True:
            try:
                _, status = os.waitpid(init, 0)
                break
            except ChildProcessError:
                status = EXIT_SETUP << 8
                break
        code = exit_code(status)
    except BaseException as e:
        _report(ctx.errw, f"cannot create the container's namespaces: {_describe(e)}")
    os._exit(code)


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _init_main(ctx: _Ctx) -> NoReturn:  # pragma: no cover - forked child
    """P: PID 1. Build the tree, pivot, resolve the user, then run and reap."""
    code = EXIT_SETUP
    step = "cannot set up the container's root file system"
    try:
        os.close(ctx.pidw)
        # (getppid() is 0 here: our parent lives outside our pid namespace)
        sc.set_pdeathsig(signal.SIGKILL)
        os.umask(0o022)
        rootfs.enter(ctx.merged, ctx.binds, rootless=ctx.idmap.rootless)
        step = "cannot set the hostname"
        sc.sethostname(ctx.spec.hostname)
        step = "cannot resolve the user"
        user = resolve_user(ctx.spec.user, _read_file("/etc/passwd"), _read_file("/etc/group"))
        if ctx.idmap.rootless and not (ctx.idmap.maps_uid(user.uid)
                                       and ctx.idmap.maps_gid(user.gid)):
            raise SpecError(
                f"user {user.uid}:{user.gid} does not exist in this rootless user namespace "
                f"(mapped ids: {_ranges(ctx.idmap)}); run with -u 0, or give this user a "
                "range in /etc/subuid and /etc/subgid")
        step = "cannot create the working directory"
        if not os.path.isdir(ctx.spec.workdir):
            os.makedirs(ctx.spec.workdir, exist_ok=True)
        sc.set_name("mountctl-init")
        code = _reap(ctx, user.uid, user.gid,
                     tuple(g for g in user.groups if not ctx.idmap.rootless
                           or ctx.idmap.maps_gid(g)),
                     ctx.spec.with_home(user.home).env_dict())
    except BaseException as e:
        _report(ctx.errw, f"{step}: {_describe(e)}")
    os._exit(code)


def _ranges(m: ids_mod.IdMap) -> str:
    return ", ".join(f"{r.inside}-{r.inside + r.count - 1}" if r.count > 1 else str(r.inside)
                     for r in m.uids)


def _reap(ctx: _Ctx, uid: int, gid: int, groups: tuple[int, ...],
          env: Mapping[str, str]) -> int:  # pragma: no cover - runs as PID 1
    child = 0
    queued: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)
        else:
            queued.append(signum)

    for sig in INIT_FORWARDED:
        signal.signal(sig, forward)
    pid = os.fork()
    if pid == 0:
        _exec_main(ctx, uid, gid, groups, env)
    child = pid
    for q in queued:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, q)
    while True:
        try:
            wpid, status = os.wait()
        except ChildProcessError:
            return EXIT_SETUP
        if wpid == child:
            return exit_code(status)


def _exec_main(ctx: _Ctx, uid: int, gid: int, groups: tuple[int, ...],
               env: Mapping[str, str]) -> NoReturn:  # pragma: no cover - forked child
    """X: drop to the user, enter the working directory, exec the command."""
    code = EXIT_SETUP
    step = "cannot switch to the user"
    try:
        for s in (*INIT_FORWARDED, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        sc.drop_bounding_caps(CONTAINER_CAPS)
        if ids_mod.setgroups_allowed():
            os.setgroups(list(groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        sc.set_no_new_privs()
        step = f"cannot enter the working directory {ctx.spec.workdir}"
        os.chdir(ctx.spec.workdir)
        argv = list(ctx.spec.argv)
        step = f"cannot execute {argv[0]}"
        try:
            os.execvpe(argv[0], argv, dict(env))
        except OSError as e:
            code = EXIT_NOT_FOUND if e.errno in (errno.ENOENT, errno.ENOTDIR) \
                else EXIT_CANNOT_EXEC
            reason = "command not found" if code == EXIT_NOT_FOUND else (e.strerror or str(e))
            _report(ctx.errw, f"{step}: {reason}")
            os._exit(code)
    except BaseException as e:
        _report(ctx.errw, f"{step}: {_describe(e)}")
    os._exit(code)


# --------------------------------------------------------------------------- supervisor


def _system_files(c: Container, spec: ContainerSpec) -> list[rootfs.Bind]:
    """hosts, hostname and resolv.conf for the container, written into its directory."""
    hostname = spec.hostname
    (c.dir / "hostname").write_text(hostname + "\n")
    (c.dir / "hosts").write_text(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1\t{hostname}\n")
    binds = [rootfs.Bind(str(c.dir / "hosts"), "/etc/hosts", optional=True),
             rootfs.Bind(str(c.dir / "hostname"), "/etc/hostname", optional=True)]
    try:
        resolv = Path("/etc/resolv.conf").read_bytes()
    except OSError:
        resolv = None
    if resolv is not None:
        (c.dir / "resolv.conf").write_bytes(resolv)
        binds.append(rootfs.Bind(str(c.dir / "resolv.conf"), "/etc/resolv.conf", optional=True))
    return binds


def mount_points(spec: ContainerSpec) -> list[str]:
    """Container paths the runner mounts on (export skips them while they are placeholders)."""
    return [*rootfs.SYSTEM_MOUNTS, "etc/hosts", "etc/hostname", "etc/resolv.conf",
            *(v.target.strip("/") for v in spec.volumes)]


def _read_init_pid(pidr: int, cfd: int, timeout: float) -> int | None:
    poller = select.poll()
    poller.register(pidr, select.POLLIN)
    poller.register(cfd, select.POLLIN)
    deadline = time.monotonic() + timeout
    buf = b""
    while len(buf) < 4:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        events = dict(poller.poll(int(left * 1000) + 1))
        if pidr in events:
            chunk = os.read(pidr, 4 - len(buf))
            if not chunk:
                return None
            buf += chunk
        elif cfd in events:
            return None
    return int(struct.unpack("=i", buf)[0])


def _drain(fd: int) -> str:
    chunks = []
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


class _Supervisor:
    def __init__(self, store: Store, c: Container, spec: ContainerSpec, lowers: list[Path],
                 signals: _Signals) -> None:
        self.store = store
        self.containers = Containers(store)
        self.c = c
        self.spec = spec
        self.lowers = lowers
        self.signals = signals
        self.union: _Union | None = None
        self.idmap = ids_mod.HOST
        self.messages: list[str] = []

    def enter_namespaces(self) -> None:
        if os.geteuid() != 0:
            try:
                self.idmap, note = ids_mod.enter_userns(ids_mod.host_plan(), sc.CLONE_NEWNS)
            except OSError as e:
                raise RunError(f"cannot create a user namespace: {e.strerror or e} (see "
                               "'mountctl check')") from None
            if note:
                self.messages.append(f"warning: subordinate id ranges not used ({note}); "
                                     "running with a single-id mapping")
        else:
            try:
                sc.unshare(sc.CLONE_NEWNS)
            except OSError as e:
                raise RunError(f"cannot create a mount namespace: {e.strerror or e}") from None
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)

    def run(self) -> int:
        self.enter_namespaces()
        self.c = self.containers.update(self.c, idmap=self.idmap.to_json(),
                                        rootless=self.idmap.rootless)
        self.union = mount_union(self.store, self.lowers, self.c, self.spec.driver,
                                 self.idmap.rootless, self.signals)
        self.c = self.containers.update(self.c, driver_used=self.union.kind)
        binds = _system_files(self.c, self.spec)
        for v in self.spec.volumes:
            if not os.path.exists(v.source):
                raise RunError(f"volume source {v.source} does not exist")
            binds.append(rootfs.Bind(v.source, v.target, v.readonly))
        if self.signals.abort_requested() is not None:
            raise RunError("interrupted", 128 + (self.signals.abort_requested() or 0))
        return self.start(tuple(binds))

    def start(self, binds: tuple[rootfs.Bind, ...]) -> int:
        errr, errw = os.pipe2(os.O_CLOEXEC)
        pidr, pidw = os.pipe2(os.O_CLOEXEC)
        ctx = _Ctx(str(self.c.merged), self.spec, binds, self.idmap, errw, pidw, os.getpid())
        sys.stdout.flush()
        sys.stderr.flush()
        cpid = os.fork()
        if cpid == 0:  # pragma: no cover - the container side
            _Signals.reset_in_child()
            os.close(errr)
            os.close(pidr)
            _container_main(ctx)
        os.close(errw)
        os.close(pidw)
        cfd = os.pidfd_open(cpid)
        init_fd = -1
        try:
            init = _read_init_pid(pidr, cfd, START_TIMEOUT)
            if init is not None:
                with contextlib.suppress(ProcessLookupError):
                    init_fd = os.pidfd_open(init)
            me = os.getpid()
            self.c = self.containers.update(self.c, status="running", started=time.time(),
                                            pid=me, pid_start=proc_start_time(me))
            code, died = self.supervise(cpid, cfd, init_fd)
            text = _drain(errr).strip()
            if died is not None:
                raise RunError(f"unionfs server died ({died}); the container was killed"
                               + (f": {self.union.log_tail()}" if self.union
                                  and self.union.log_tail() else ""))
            if text:
                self.messages.extend(text.splitlines())
            return code
        finally:
            for fd in (cfd, init_fd, errr, pidr):
                if fd >= 0:
                    os.close(fd)

    def _kill(self, cpid: int, init_fd: int) -> None:
        if init_fd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(init_fd, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(cpid, signal.SIGKILL)

    def supervise(self, cpid: int, cfd: int, init_fd: int) -> tuple[int, str | None]:
        """Forward signals until C exits -> (exit code, None), or the FUSE server dies ->
        (code, how it died)."""
        poller = select.poll()
        poller.register(cfd, select.POLLIN)
        poller.register(self.signals.r, select.POLLIN)
        server = self.union.server if self.union else None
        sfd = -1
        if server is not None:
            sfd = os.pidfd_open(server.pid)
            poller.register(sfd, select.POLLIN)
        try:
            while True:
                poller.poll(1000)
                for sig in self.signals.take():
                    with contextlib.suppress(ProcessLookupError):
                        if init_fd >= 0:
                            signal.pidfd_send_signal(init_fd, sig)
                        else:
                            os.kill(cpid, sig)
                rc = server.poll() if server is not None else None
                if rc is not None:
                    how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
                    self._kill(cpid, init_fd)
                    _, status = _wait_timeout(cpid, cfd, STOP_TIMEOUT)
                    return exit_code(status), how
                pid, status = os.waitpid(cpid, os.WNOHANG)
                if pid == cpid:
                    return exit_code(status), None
        finally:
            if sfd >= 0:
                os.close(sfd)

    def teardown(self) -> None:
        if self.union is not None:
            self.union.teardown()
            self.union = None


def _wait_timeout(pid: int, pidfd: int, timeout: float) -> tuple[int, int]:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)


def run(store: Store, image: str, opts: RunOptions, *, name: str | None = None,
        remove: bool = False, cwd: str | None = None,
        host_env: Mapping[str, str] | None = None, warn: list[str] | None = None) -> int:
    """`mountctl run`: returns the command's exit status. Raises RunError (and SpecError,
    StoreError) when the container cannot be run; messages from the container side that
    explain a status of 125-127, and warnings, are appended to `warn`."""
    rec = store.resolve(image)
    containers = Containers(store)
    cid = new_id()
    spec = build_spec(rec.config, opts, host_env=os.environ if host_env is None else host_env,
                      cwd=cwd or os.getcwd(), default_hostname=cid[:12])
    c = containers.create(rec.id, image, name, {"argv": list(spec.argv), "spec": spec.to_json(),
                                                "mount_points": mount_points(spec)}, cid=cid)
    signals = _Signals()
    signals.install()
    sup = _Supervisor(store, c, spec, store.lowerdirs(rec), signals)
    code = EXIT_SETUP
    error: BaseException | None = None
    try:
        code = sup.run()
        return code
    except RunError as e:
        code = e.code
        error = e
        raise
    except BaseException as e:
        error = e
        raise
    finally:
        try:
            sup.teardown()
        finally:
            signals.restore()
            if warn is not None:
                warn.extend(sup.messages)
            if remove:
                remove_tree(sup.c.dir)
            else:
                with contextlib.suppress(OSError):
                    Containers(store).update(
                        sup.c, status="exited", finished=time.time(), exit_code=code,
                        error=None if error is None else (str(error) or type(error).__name__))
