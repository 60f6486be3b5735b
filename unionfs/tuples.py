"""`NamedTuple` class syntax without the typing module at run time.

Every mount starts a Python process, and `import typing` (with re, contextlib and warnings
behind it) cost about 5 ms of a 40 ms start-up; typing.NamedTuple itself then turns each string
annotation into a ForwardRef, another 1.5 ms for `Config` alone. Type checkers see
typing.NamedTuple (mypy takes any `if TYPE_CHECKING:` as true); at run time the class body is
handed to `collections.namedtuple` with its defaults, and its methods, properties, docstring
and other attributes are set on the result, as typing does. The test checks that classes made
here behave as typing's do.

Modules that need typing only for annotations import it under `TYPE_CHECKING = False` /
`if TYPE_CHECKING:` the same way.
"""

from __future__ import annotations

from collections import namedtuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
else:
    # what typing.NamedTuple lets a class body neither set nor override
    _PROHIBITED = frozenset(("__new__", "__init__", "__slots__", "__getnewargs__", "_fields",
                             "_field_defaults", "_make", "_replace", "_asdict", "_source"))
    # what the class statement itself puts in the body
    _CLASS_KEYS = frozenset(("__module__", "__qualname__", "__annotations__", "__doc__",
                             "__orig_bases__", "__classcell__", "__static_attributes__",
                             "__firstlineno__"))

    class _Maker(type):
        def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, object]) -> type:
            if ns.get("_is_base_", False):
                return super().__new__(mcls, name, bases, ns)  # `NamedTuple` itself
            if bases != (NamedTuple,):
                raise TypeError("a NamedTuple class can only have NamedTuple as its base")
            annotations = dict(ns.get("__annotations__", {}))
            defaults = []
            for field in annotations:
                if field in ns:
                    defaults.append(ns[field])
                elif defaults:
                    raise TypeError(f"Non-default namedtuple field {field} cannot follow "
                                    f"default field{'s' if len(defaults) > 1 else ''} "
                                    f"{', '.join(f for f in annotations if f in ns)}")
            cls = namedtuple(name, annotations, defaults=defaults,
                             module=str(ns["__module__"]))
            cls.__annotations__ = annotations
            if ns.get("__doc__") is not None:
                cls.__doc__ = ns["__doc__"]
            for key, value in ns.items():
                if key in _PROHIBITED:
                    raise AttributeError("Cannot overwrite NamedTuple attribute " + key)
                if key in _CLASS_KEYS or key in annotations:
                    continue
                setattr(cls, key, value)
                set_name = getattr(type(value), "__set_name__", None)
                if set_name is not None:
                    set_name(value, cls, key)
            cell = ns.get("__classcell__")
            if cell is not None:  # (methods that use super() or __class__)
                cell.cell_contents = cls
            return cls

    class NamedTuple(metaclass=_Maker):
        """Base of named tuple classes (see the module's docstring)."""

        _is_base_ = True
