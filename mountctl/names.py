"""The shapes of the names mountctl accepts (container names, host names, environment keys,
ids), checked in plain Python: compiling their regular expressions at import took 2 ms of
every container start (`re` compiles in Python). Each check is held to the expression it
replaces by a property test (tests/mountctl/test_names.py)."""

from __future__ import annotations

_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_REST = _ALNUM | frozenset("_.-")
_LABEL_REST = _ALNUM | frozenset("-")
_HEX = frozenset("0123456789abcdef")


def is_hex(s: str, most: int | None = None) -> bool:
    """Lower-case hex digits: `[0-9a-f]+`, or `[0-9a-f]{1,MOST}`."""
    return 0 < len(s) <= (len(s) if most is None else most) and _HEX.issuperset(s)


def is_hex64(s: str) -> bool:
    """An id: `[0-9a-f]{64}`."""
    return len(s) == 64 and _HEX.issuperset(s)


def is_name(s: str) -> bool:
    """A container name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`."""
    return 0 < len(s) <= 128 and s[0] in _ALNUM and _NAME_REST.issuperset(s)


def is_host_label(s: str) -> bool:
    """One label of a host name: `[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?`."""
    return (0 < len(s) <= 63 and s[0] in _ALNUM and s[-1] in _ALNUM
            and _LABEL_REST.issuperset(s))


def is_env_key(s: str) -> bool:
    """An environment variable's name: `[^=\\0]+`."""
    return bool(s) and "=" not in s and "\0" not in s
