"""README demo for mountctl: build a tiny busybox image, import it, run it on unionfs.

Shows: the import (an OCI layout tar with three layers), the image's own command with its Env,
User and WorkingDir, the whiteout and the opaque directory of layer 2 at work inside the
container, a write landing in the container's upper directory (the image stays untouched),
an exit status passed through, and `ps`, `export` and `rm`. Everything happens in a temporary
store that is removed at the end. Run as root (see `mountctl check` for rootless use).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.images import busybox_image, write_image


def _shown(arg: str) -> str:
    if arg and not any(c in arg for c in " ;|>'\"$`\\*?&<()"):
        return arg
    return f'"{arg}"' if not any(c in arg for c in '"$`\\') else shlex.quote(arg)


def mountctl(root: Path, *args: str, title: str) -> int:
    shown = " ".join(_shown(a) for a in args)
    print(f"\n$ mountctl {shown}    # {title}", flush=True)
    p = subprocess.run([sys.executable, "-m", "mountctl", "--root", str(root), *args],
                       timeout=120, check=False)
    if p.returncode:
        print(f"[exit status {p.returncode}]", flush=True)
    return p.returncode


def main() -> int:
    if not Path("/bin/busybox").is_file():
        print("demo_mountctl: needs /bin/busybox (Debian package busybox-static)")
        return 1
    with tempfile.TemporaryDirectory(prefix="mountctl-demo-") as tmp:
        t = Path(tmp)
        root = t / "store"
        archive = write_image(busybox_image(), t / "busybox-test.tar", "oci-tar", "gzip")
        print(f"built {archive.name}: an OCI layout with 3 layers (layer 2 deletes "
              "data/remove-me.txt and makes /opq opaque)")
        steps = [
            (("import", str(archive)), "import: layers verified and extracted once"),
            (("images",), "the store"),
            (("run", "--rm", "--driver", "fuse", "busybox-test"),
             "the image's Entrypoint+Cmd, Env, User and WorkingDir"),
            (("run", "--rm", "--driver", "fuse", "-u", "0", "busybox-test",
              "echo '/data:'; ls /data; echo '/opq:'; ls /opq; mount | head -1"),
             "whiteout and opaque dir at work; the root is a unionfs mount"),
            (("run", "--name", "demo", "--driver", "fuse", "-u", "0", "busybox-test",
              "echo hi > /data/new.txt; rm /data/hello.txt"), "changes go to the upper"),
            (("ps",), "the container, kept until rm"),
        ]
        for args, title in steps:
            if mountctl(root, *args, title=title):
                return 1
        code = mountctl(root, "run", "--rm", "--driver", "fuse", "busybox-test", "exit 7",
                        title="the command's exit status")
        if code != 7:
            return 1
        layer = t / "demo.tar"
        if mountctl(root, "export", "demo", str(layer), title="the changes as an OCI layer"):
            return 1
        with tarfile.open(layer) as tar:
            print("  " + "\n  ".join(m.name for m in tar.getmembers()))
        if mountctl(root, "rm", "demo", title="remove the container"):
            return 1
    print("\ndone: the temporary store is gone, nothing is left mounted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
