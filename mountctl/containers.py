"""Container records: `<root>/containers/<cid>/` and its `container.json`.

Owns the layout of one container directory:
  container.json   the record (id, name, image_id, image, spec, status, times, supervisor pid,
                   exit code, driver, id map); store.py reads its "image_id" to refuse `rmi`
  upper/ work/     the container's writable branch and the union's work directory
  merged/          the mount point of its root file system (mounted only inside the runner's
                   private mount namespace, never on the host)
  hosts hostname resolv.conf   bound over the container's /etc files
  unionfs.log      the FUSE server's stderr

Invariants: ids are 64 hex digits; names are unique (checked under the store lock when the
record is created); the record is replaced atomically (tmp + rename), so readers never see a
half-written one. A record saying "running" whose supervisor process is gone (same pid and
start time) reads as "dead": the process was killed before it could clean up.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

from mountctl.jsonfile import write_json
from mountctl.names import is_hex, is_hex64
from mountctl.store import Store, StoreError
from unionfs.tuples import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:  # (typing stays out of `mountctl run`'s start-up)
    from typing import Any



class ContainerError(StoreError):
    """No such container, an ambiguous reference, or a busy container."""




def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks); None if there is no such
    process or it has exited (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        fields = data[data.rindex(b")") + 2:].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (ValueError, IndexError):
        return None


class Container(NamedTuple):
    dir: Path
    record: Mapping[str, Any]

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def name(self) -> str:
        return str(self.record.get("name") or "")

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def work(self) -> Path:
        return self.dir / "work"

    @property
    def merged(self) -> Path:
        return self.dir / "merged"

    def alive(self) -> bool:
        """Whether the supervisor that runs this container is still there."""
        pid = self.record.get("pid")
        start = self.record.get("pid_start")
        if not isinstance(pid, int) or pid <= 0:
            return False
        now = proc_start_time(pid)
        return now is not None and (start is None or now == start)

    @property
    def state(self) -> str:
        """created, running, exited or dead."""
        status = str(self.record.get("status", "created"))
        if status == "running" and not self.alive():
            return "dead"
        return status

    def status_text(self, now: float | None = None) -> str:
        state = self.state
        when = self.record.get("finished") if state == "exited" else self.record.get("started")
        ago = _ago((now or time.time()) - float(when)) if isinstance(when, int | float) else ""
        if state == "exited":
            return f"Exited ({self.record.get('exit_code')}) {ago} ago"
        if state == "running":
            return f"Up {ago}"
        if state == "dead":
            return "Dead (supervisor gone)"
        return "Created"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= size:
            n = s // size
            return f"{n} {unit if n != 1 else unit[:-1]}"
    return f"{s} seconds" if s != 1 else "1 second"


def new_id() -> str:
    """64 random hex digits (what `secrets.token_hex(32)` gives, without importing secrets:
    it imports hashlib, which loads OpenSSL's libcrypto at every `run`)."""
    return os.urandom(32).hex()


class Containers:
    """The containers of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dir = store.containers_dir

    def all(self) -> list[Container]:
        out: list[Container] = []
        if not self.dir.is_dir():
            return out
        for d in self.dir.iterdir():
            if not is_hex64(d.name):
                continue
            try:
                rec = json.loads((d / "container.json").read_bytes())
            except FileNotFoundError:
                continue
            except ValueError:
                rec = {"id": d.name, "status": "corrupt"}
            if isinstance(rec, dict):
                out.append(Container(d, rec))
        return sorted(out, key=lambda c: (float(c.record.get("created", 0)), c.id))

    def get(self, ref: str) -> Container:
        """A container by name, full id or unique id prefix."""
        every = self.all()
        for c in every:
            if c.name == ref:
                return c
        if is_hex(ref, 64):
            found = [c for c in every if c.id.startswith(ref)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ContainerError(f"container id prefix {ref!r} is ambiguous: "
                                     + ", ".join(c.short_id for c in found))
        raise ContainerError(f"no such container: {ref}")

    def create(self, image_id: str, image: str, name: str | None,
               fields: Mapping[str, Any], cid: str | None = None) -> Container:
        """A new container directory and record (status "created"), under the store lock, so
        that a concurrent `rmi` sees it and names stay unique."""
        with self.store.locked():
            self.store.resolve(image_id)  # still there, now that we hold the lock
            if name is not None and any(c.name == name for c in self.all()):
                raise ContainerError(f"the name {name!r} is already used by a container "
                                     "(remove it with 'mountctl rm')")
            cid = cid or new_id()
            d = self.dir / cid
            d.mkdir(mode=0o700)
            for sub in ("upper", "work", "merged"):
                (d / sub).mkdir(mode=0o755)
            rec = {"id": cid, "name": name or f"c-{cid[:12]}", "image_id": image_id,
                   "image": image, "created": time.time(), "status": "created", **fields}
            write_json(d / "container.json", rec)
            return Container(d, rec)

    def update(self, c: Container, **changes: Any) -> Container:
        rec = {**c.record, **changes}
        write_json(c.dir / "container.json", rec)
        return Container(c.dir, rec)
