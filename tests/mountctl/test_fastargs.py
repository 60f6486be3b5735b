"""mountctl.fastargs against argparse: on generated command lines, whatever the fast reader
accepts, argparse accepts too and makes the same of it (every attribute, every value); and
the usual run command lines (the README's, the tests') are read fast."""

from __future__ import annotations

import contextlib
import io
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mountctl import cli, fastargs

OPTIONS = ["--rm", "--name", "-e", "--env", "-w", "--workdir", "-u", "--user", "-v",
           "--volume", "--hostname", "--entrypoint", "--driver",
           # what the fast reader leaves to argparse
           "--na", "--name=x", "-uroot", "--", "-h", "--help", "-x", "--root", "-V", "--rm=1",
           "--driver=fuse", "-e=A"]
VALUES = st.one_of(st.sampled_from(["x", "", "a=b", "A", "-x", "-1", "-", "auto", "fuse",
                                    "overlay", "bogus", "--rm", "run", " ", "/data:/d:ro"]),
                   st.text(max_size=4))
WORDS = st.one_of(st.sampled_from(OPTIONS), VALUES)


@st.composite
def command_lines(draw: Any) -> list[str]:
    argv: list[str] = []
    for _ in range(draw(st.integers(0, 2))):
        argv += ["--root", draw(VALUES)]
    argv.append(draw(st.sampled_from(["run", "run", "run", "ps", "--rm", "images"])))
    for _ in range(draw(st.integers(0, 6))):
        opt = draw(st.sampled_from(OPTIONS))
        argv.append(opt)
        if draw(st.booleans()) or opt in fastargs.VALUES:
            argv.append(draw(VALUES))
    if draw(st.integers(0, 5)):
        argv.append(draw(st.sampled_from(["busybox-test", "img:tag", "-i", "", "run"])))
    argv += draw(st.lists(WORDS, max_size=4))
    return argv


@st.composite
def run_lines(draw: Any) -> list[str]:
    """Run command lines in the fast reader's own words, values of every shape (those that
    start with a dash included): where the two could differ on a line both take."""
    argv = ["--root", draw(VALUES)] if draw(st.booleans()) else []
    argv.append("run")
    for _ in range(draw(st.integers(0, 5))):
        opt = draw(st.sampled_from(sorted({*fastargs.FLAGS, *fastargs.VALUES})))
        if opt in fastargs.VALUES and draw(st.booleans()):
            argv.append(f"{opt}={draw(VALUES)}")  # (`--name=VALUE`; `-e=...` is not that)
        else:
            argv.append(opt)
            if opt in fastargs.VALUES:
                argv.append(draw(VALUES))
    argv.append(draw(st.sampled_from(["busybox-test", "img:tag", "-i", "", "run", "--rm"])))
    argv += draw(st.lists(WORDS, max_size=3))
    return argv


def _argparse(argv: list[str]) -> dict[str, Any] | None:
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            ns = cli.build_parser().parse_args(argv)
        except SystemExit:
            return None
    got = vars(ns)
    got.pop("func", None)
    return got


@settings(max_examples=1500, deadline=None)
@given(st.one_of(command_lines(), run_lines()))
def test_what_the_fast_reader_accepts_argparse_reads_the_same(argv: list[str]) -> None:
    fast = fastargs.parse(argv)
    if fast is not None:
        assert _argparse(argv) == vars(fast), argv


def test_the_usual_run_command_lines_are_read_fast() -> None:
    usual = [
        ["run", "--rm", "--driver", "fuse", "busybox-test"],
        ["run", "--rm", "--driver", "fuse", "-u", "0", "busybox-test",
         "echo '/data:'; ls /data"],
        ["--root", "/tmp/s", "run", "--name", "demo", "--driver", "fuse", "-u", "0",
         "busybox-test", "echo hi > /data/new.txt"],
        ["run", "--rm", "-e", "A=1", "-e", "B", "-v", "/x:/y:ro", "-w", "/tmp", "--hostname",
         "h", "--entrypoint", "", "img:tag", "sh", "-c", "exit 7", "--rm"],
        ["run", "busybox-test"],
        ["--root", "/s", "run", "--env=MCTEST=1", "--env=-x", "--name=", "--driver=fuse",
         "busybox-test"],
    ]
    for argv in usual:
        fast = fastargs.parse(argv)
        assert fast is not None, argv
        assert _argparse(argv) == vars(fast), argv
