"""README demo: build a small layer stack, mount it with unionfs, and show the union at work.

Shows: a lookup falling through to a lower layer, an OCI whiteout and an opaque directory in the
image layers, a copy-up on write, and a deletion leaving a whiteout in the upper directory.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.mounts import mounted


def show(title: str, cmd: list[str]) -> None:
    print(f"\n$ {' '.join(cmd)}    # {title}")
    subprocess.run(cmd, check=False)


def upper_view(upper: Path) -> None:
    print(f"\nupper directory {upper}:")
    for root, dirs, files in os.walk(upper):
        for n in sorted(dirs + files):
            p = Path(root) / n
            st = os.lstat(p)
            kind = ("whiteout (char 0/0)" if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
                    else "dir" if stat.S_ISDIR(st.st_mode) else f"file, {st.st_size} bytes")
            print(f"  {p.relative_to(upper)}: {kind}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="unionfs-demo-") as tmp:
        t = Path(tmp)
        base, top, upper, work, mnt = (t / n for n in ("base", "top", "upper", "work", "mnt"))
        for d in (base, top, upper, work, mnt):
            d.mkdir()
        (base / "etc").mkdir()
        (base / "etc" / "motd").write_text("hello from the base layer\n")
        (base / "etc" / "secret").write_text("deleted by the top layer\n")
        (base / "cache").mkdir()
        (base / "cache" / "old").write_text("hidden by an opaque dir\n")
        (top / "etc").mkdir()
        (top / "etc" / ".wh.secret").write_text("")          # OCI whiteout
        (top / "cache").mkdir()
        (top / "cache" / ".wh..wh..opq").write_text("")     # OCI opaque directory
        (top / "cache" / "new").write_text("fresh cache\n")
        print("layers: base <- top (OCI whiteout of etc/secret, opaque cache/), "
              "upper for changes")
        with mounted("unionfs", [top, base], upper, work, mnt):
            show("merged view", ["ls", "-lR", str(mnt)])
            show("falls through to the base layer", ["cat", str(mnt / "etc" / "motd")])
            show("whited out by the top layer", ["ls", str(mnt / "etc")])
            show("opaque: base's cache/old is hidden", ["ls", str(mnt / "cache")])
            with open(mnt / "etc" / "motd", "a") as f:
                f.write("appended through the mount (copy-up)\n")
            show("after a write: copied up", ["cat", str(mnt / "etc" / "motd")])
            os.unlink(mnt / "cache" / "new")
            print("\n(rm cache/new)")
            show("mount type", ["findmnt", "-n", "-o", "FSTYPE,TARGET", str(mnt)])
        upper_view(upper)
        print(f"\nbase layer untouched: {(base / 'etc' / 'motd').read_text().strip()!r}")
        print("\nunmounted cleanly.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
