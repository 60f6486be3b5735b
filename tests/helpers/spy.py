"""Recording the calls of a function a test replaces for its duration (the real one still runs)."""

from __future__ import annotations

from typing import Any

import pytest


def record_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, attr: str, arg: int = 1
                 ) -> list[Any]:
    """Replace OWNER.ATTR with a wrapper that appends its positional argument number ARG to the
    list returned, then calls the original."""
    seen: list[Any] = []
    real = getattr(owner, attr)

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[arg])
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, spy)
    return seen
