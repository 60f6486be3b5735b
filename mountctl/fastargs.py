"""`mountctl run`'s command line read without argparse: importing argparse (with re, gettext
and locale) and building the parser of every command took about 10 ms of each container
start, a seventh of it.

`parse` takes a run command line as people and scripts spell it (`[--root DIR] run [--rm]
[--name N] [-e K=V]... [-w DIR] [-u U] [-v S:D]... [--hostname H] [--entrypoint E]
[--driver D] IMAGE [CMD...]`, an option and its value as two words, or a long option as
`--name=VALUE`) and returns what argparse makes of it: the same attributes with the same
values. Anything else (another command, abbreviated options, `-uVALUE`, a separate value
that starts with a dash, `--`, help, version, anything argparse would refuse) is None: the
caller asks argparse, which then parses it, or reports it as it always did.
tests/mountctl/test_fastargs.py holds the two together on generated command lines."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

from mountctl.spec import DRIVERS

FLAGS = {"--rm": "rm"}
VALUES = {"--name": "name", "-e": "env", "--env": "env", "-w": "workdir",
          "--workdir": "workdir", "-u": "user", "--user": "user", "-v": "volume",
          "--volume": "volume", "--hostname": "hostname", "--entrypoint": "entrypoint",
          "--driver": "driver"}
APPENDED = frozenset({"env", "volume"})


def parse(argv: Sequence[str]) -> SimpleNamespace | None:
    """The parsed `run` command line ARGV, or None: ask argparse."""
    if "--" in argv:
        return None  # (argparse's own rules for it differ between the command and its options)
    n = len(argv)
    i = 0
    root = None
    while i < n and argv[i] == "--root":
        if i + 1 == n or argv[i + 1].startswith("-"):
            return None
        root = argv[i + 1]
        i += 2
    if i == n or argv[i] != "run":
        return None
    i += 1
    got: dict[str, object] = {"root": root, "command_name": "run", "rm": False, "name": None,
                              "env": [], "workdir": None, "user": None, "volume": [],
                              "hostname": None, "entrypoint": None, "driver": "auto"}
    while i < n:
        word = argv[i]
        if word in FLAGS:
            got[FLAGS[word]] = True
            i += 1
            continue
        dest = VALUES.get(word)
        if dest is None and word.startswith("--") and "=" in word:
            # `--name=VALUE`: the value is the rest of the word, whatever it is
            opt, _, value = word.partition("=")
            dest = VALUES.get(opt) if opt.startswith("--") else None
            if dest is None:
                return None
            step = 1
        elif dest is None:
            if word.startswith("-"):
                return None
            break  # the image
        elif i + 1 == n or argv[i + 1].startswith("-"):
            return None
        else:
            value = argv[i + 1]
            step = 2
        if dest == "driver" and value not in DRIVERS:
            return None  # (argparse checks each occurrence against its choices)
        if dest in APPENDED:
            got[dest].append(value)  # type: ignore[attr-defined]
        else:
            got[dest] = value
        i += step
    if i == n:
        return None
    got["image"] = argv[i]
    got["command"] = list(argv[i + 1:])
    return SimpleNamespace(**got)
