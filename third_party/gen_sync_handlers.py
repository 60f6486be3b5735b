"""Generate the synchronous handler variants of pyfuse3's handlers.pxi (patch item 7).

Usage: python3 gen_sync_handlers.py pyfuse3-3.5.0/src/pyfuse3/handlers.pxi   (edits in place)

Run on the upstream file (with the earlier patch items applied), then add by hand what is not
generated: the `_sync_handlers` flag, `use_sync_handlers`, `_sync_handler_failed`, the forget
callbacks and the zero-copy view in `fuse_write_buf` (`_bufvec_view`; see the patch), and
regenerate the patch with diff -ru (third_party/README.md).

For each callback in OPS, `async def fuse_X_async (...)` gets a twin `cdef fuse_X_sync (...)` whose
body is the same with `await operations.M(` replaced by `operations.M_sync(`, and the callback's
`save_retval(fuse_X_async(...))` is preceded by a branch that, with the flag set, calls the twin
and returns. The twins therefore reply exactly as pyfuse3's own coroutines do.
"""

from __future__ import annotations

import re
import sys

OPS = {  # callback name -> the operations methods awaited in its coroutine
    "lookup": ["lookup"], "getattr": ["getattr"], "setattr": ["setattr"],
    "readlink": ["readlink"], "mknod": ["mknod"], "mkdir": ["mkdir"], "unlink": ["unlink"],
    "rmdir": ["rmdir"], "symlink": ["symlink"], "rename": ["rename"], "link": ["link"],
    "open": ["open"], "read": ["read"], "write": ["write"], "write_buf": ["write"],
    "release": ["release"], "fsync": ["fsync"], "readdirplus": ["readdir"],
    "getxattr": ["getxattr"], "listxattr": ["listxattr"], "setxattr": ["getxattr", "setxattr"],
    "removexattr": ["removexattr"], "create": ["create"], "statfs": ["statfs"],
}


def _block_end(lines: list[str], start: int) -> int:
    """Index of the first top-level line after the block opened at START."""
    k = start + 1
    while k < len(lines):
        line = lines[k]
        if line and not line[0].isspace() and not line.startswith("#"):
            return k
        k += 1
    return k


def generate(src: str) -> str:
    lines = src.split("\n")
    out: list[str] = []
    done: set[str] = set()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"async def fuse_(\w+)_async \((.*)\):$", line)
        if m and m.group(1) in OPS:
            op = m.group(1)
            end = _block_end(lines, i)
            body = lines[i:end]
            out.extend(body)
            while body and not body[-1].strip():
                body = body[:-1]
            out.append(f"cdef fuse_{op}_sync ({m.group(2)}):")
            for bl in body[1:]:
                for meth in OPS[op]:
                    bl = bl.replace(f"await operations.{meth}(", f"operations.{meth}_sync(")
                if "await" in bl:
                    raise SystemExit(f"{op}: an await left in the synchronous twin: {bl!r}")
                out.append(bl)
            out.extend(["", ""])
            done.add(op)
            i = end
            continue
        m = re.match(r"(\s+)save_retval\(fuse_(\w+)_async\((.*)$", line)
        if m and m.group(2) in OPS:
            ind, op, rest = m.groups()
            call = f"fuse_{op}_async({rest}"
            j = i
            while call.count("(") > call.count(")"):  # the call may span lines
                j += 1
                call += "\n" + lines[j]
            sync_call = call[:-1].replace(f"fuse_{op}_async(", f"fuse_{op}_sync(", 1)
            out.append(ind + "if _sync_handlers:")
            out.append(ind + "    try:")
            for k, cl in enumerate(sync_call.split("\n")):
                out.append((ind + "        " if k == 0 else "    ") + cl)
            out.append(ind + "    except BaseException as e:")
            out.append(ind + "        _sync_handler_failed(c.req, e)")
            out.append(ind + "    return")
            out.append(ind + "save_retval(" + call)
            i = j + 1
            continue
        out.append(line)
        i += 1
    missing = set(OPS) - done
    if missing:
        raise SystemExit(f"callbacks not found: {sorted(missing)}")
    return "\n".join(out)


if __name__ == "__main__":
    path = sys.argv[1]
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(generate(text))
