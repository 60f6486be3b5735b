"""`unionfs.tuples.NamedTuple` (named tuples without typing at run time) against typing's own:
the same class bodies make classes that behave the same, and refuse the same bodies. Also the
regex-free parsers that came with it (`linkindex.parse_key`, `mountinfo.unescape`), against the
regular expressions they replace."""

from __future__ import annotations

import keyword
import pickle
import re
import typing
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unionfs import tuples
from unionfs.config import Config
from unionfs.core.resolve import Kind, Resolution
from unionfs.linkindex import key_of, parse_key
from unionfs.mountinfo import unescape

FIELD = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda n: not keyword.iskeyword(n) and n not in ("self", "cls"))
VALUE = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3), st.binary(max_size=3),
                  st.tuples(st.integers(0, 3)))


@st.composite
def class_bodies(draw: st.DrawFn) -> tuple[str, list[Any]]:
    """The source of a NamedTuple class X (with NamedTuple imported by the caller), and the
    values its required fields take."""
    fields = draw(st.lists(FIELD, max_size=6, unique=True))
    ndefaults = draw(st.integers(0, len(fields)))
    lines = ["class X(NamedTuple):"]
    if draw(st.booleans()):
        lines.append(f"    {draw(st.text(max_size=8))!r}")
    required: list[Any] = []
    for i, f in enumerate(fields):
        if i >= len(fields) - ndefaults:
            lines.append(f"    {f}: object = {draw(VALUE)!r}")
        else:
            lines.append(f"    {f}: int | None")
            required.append(draw(VALUE))
    k = draw(st.integers(0, 9))
    if draw(st.booleans()):
        lines.append(f"    LIMIT = {k}")
    if draw(st.booleans()):
        lines += ["    def size(self) -> int:", f"        return len(self) + {k}"]
    if draw(st.booleans()):
        lines += ["    @property", "    def first(self) -> object:",
                  "        return self[0] if self else None"]
    if draw(st.booleans()):
        lines += ["    @classmethod", "    def made(cls, *args: object) -> object:",
                  "        return cls._make(args)"]
    if draw(st.booleans()):
        lines += ["    @staticmethod", "    def twice(v: int) -> int:", "        return 2 * v"]
    if len(lines) == 1:
        lines.append("    pass")
    return "\n".join(lines), required


def _make(source: str, named_tuple: Any, module: str) -> Any:
    ns: dict[str, Any] = {"NamedTuple": named_tuple, "__name__": module}
    exec(compile("from __future__ import annotations\n" + source, module, "exec"), ns)
    return ns["X"]


def _observe(cls: Any, required: list[Any]) -> dict[str, Any]:
    """What a user of class CLS can see of it and of one instance."""
    seen: dict[str, Any] = {
        "fields": cls._fields, "defaults": cls._field_defaults, "doc": cls.__doc__,
        "name": cls.__name__, "qualname": cls.__qualname__, "module": cls.__module__,
        # (typing 3.11 turns each string annotation into a ForwardRef: what costs its time)
        "annotations": {k: getattr(v, "__forward_arg__", v)
                        for k, v in cls.__annotations__.items()},
        "tuple": issubclass(cls, tuple),
    }
    x = cls(*required)
    seen.update(repr=repr(x), items=tuple(x), equal=x == tuple(x), hash=hash(x) == hash(tuple(x)),
                asdict=x._asdict(), make=cls._make(tuple(x)) == x)
    if x._fields:
        seen["replace"] = tuple(x._replace(**{x._fields[0]: "new"}))
        try:
            cls()
            seen["no_args"] = "made"
        except TypeError:
            seen["no_args"] = "TypeError"
    for attr in ("LIMIT", "size", "first", "made", "twice"):
        if hasattr(cls, attr):
            v = getattr(x, attr)
            seen[attr] = (v() if attr == "size" else v(*tuple(x)) if attr == "made"
                          else v(3) if attr == "twice" else v)
    with pytest.raises(AttributeError):
        x.not_a_field = 1  # (no __dict__: a named tuple's instances take no new attributes)
    return seen


@settings(max_examples=300, deadline=None)
@given(class_bodies())
def test_classes_behave_as_typing_s(body: tuple[str, list[Any]]) -> None:
    source, required = body
    ours = _make(source, tuples.NamedTuple, "m.ours")
    theirs = _make(source, typing.NamedTuple, "m.ours")
    assert type(ours) is type  # a plain named tuple class, no metaclass of ours left on it
    assert _observe(ours, required) == _observe(theirs, required)


@pytest.mark.parametrize("source, error", [
    ("class X(NamedTuple):\n    a: int = 1\n    b: int", TypeError),  # non-default after one
    ("class X(NamedTuple):\n    a: int\n    _fields = ()", AttributeError),
    ("class X(NamedTuple):\n    a: int\n    def _replace(self): pass", AttributeError),
    ("class X(NamedTuple):\n    a: int\n    __slots__ = ()", AttributeError),
    ("class X(NamedTuple):\n    a: int\n    def __new__(cls): pass", AttributeError),
    ("class X(NamedTuple, dict):\n    a: int", TypeError),
])
def test_bodies_typing_refuses_are_refused(source: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        _make(source, typing.NamedTuple, "m")
    with pytest.raises(error):
        _make(source, tuples.NamedTuple, "m")


def test_methods_may_use_super_and_descriptors_learn_their_names() -> None:
    """(typing 3.11 refuses a body whose methods use super(): its class cell is left unset)"""
    X = _make("class X(NamedTuple):\n    a: int\n"
              "    def __repr__(self) -> str:\n        return 'X!' + super().__repr__()\n"
              "    class Named:\n        def __set_name__(self, owner, name):\n"
              "            self.where = (owner.__name__, name)\n"
              "    n = Named()\n", tuples.NamedTuple, "m")
    assert repr(X(1)) == "X!(1,)"  # (the named tuple class is X itself: super() is tuple)
    assert X.n.where == ("X", "n")


def test_the_project_s_tuples_pickle_and_compare() -> None:
    c = Config(lowers=("/a", "/b"), mountpoint="/m", upper="/u")
    assert pickle.loads(pickle.dumps(c)) == c
    assert c._replace(debug=True).debug and not c.debug
    assert c.writable and not c._replace(upper=None).writable  # (a property of the class body)
    r = Resolution(Kind.DIR, (0, 2))
    assert pickle.loads(pickle.dumps(r)) == r and hash(r) == hash(Resolution(Kind.DIR, (0, 2)))


# -- the parsers that replaced regular expressions ----------------------------------------------

_KEY = re.compile(rb"([0-9]+)-([0-9a-f]+)-([0-9a-f]+)")


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=12),
                 st.lists(st.sampled_from([b"0", b"7", b"9", b"a", b"f", b"g", b"-", b"A", b" ",
                                           b"+", b"_", b"\xd9\xa3"]), max_size=12).map(b"".join),
                 st.tuples(st.integers(0, 99), st.integers(0, 2**64),
                           st.integers(0, 2**64)).map(lambda t: key_of(*t))))
def test_parse_key_agrees_with_the_regular_expression(name: bytes) -> None:
    m = _KEY.fullmatch(name)
    assert parse_key(name) == (None if m is None else (int(m[1]), int(m[2], 16), int(m[3], 16)))


_OCTAL = re.compile(r"\\([0-7]{3})")


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["\\", "0", "1", "4", "7", "8", "a", " ", "\\040", "\\134",
                                 "\\12", "٣"]), max_size=12).map("".join))
def test_unescape_agrees_with_the_regular_expression(field: str) -> None:
    assert unescape(field) == _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)
