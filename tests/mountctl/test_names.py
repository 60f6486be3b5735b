"""mountctl.names: each check answers as the regular expression it replaced (they were
compiled at every container start), on names made of the characters that matter (the
classes' edges, separators, NUL, newline, non-ASCII letters and digits) and of any."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mountctl import names

EDGES = "aAzZ09gG_.-=\0\n /:éİ٣ｆ"
TEXT = st.one_of(st.text(alphabet=EDGES, max_size=130),
                 st.text(alphabet="0123456789abcdefABCDEFg", min_size=60, max_size=66),
                 st.text(alphabet="abc-", min_size=58, max_size=68),
                 st.text(alphabet="aZ9_.-", min_size=124, max_size=132), st.text(max_size=70))

CASES = [
    (names.is_name, r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"),
    (names.is_host_label, r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"),
    (names.is_env_key, r"[^=\0]+"),
    (names.is_hex64, r"[0-9a-f]{64}"),
    (names.is_hex, r"[0-9a-f]+"),
    (lambda s: names.is_hex(s, 64), r"[0-9a-f]{1,64}"),
]


@settings(max_examples=1000, deadline=None)
@given(TEXT)
def test_each_check_answers_as_its_expression(s: str) -> None:
    for check, pattern in CASES:
        assert check(s) == bool(re.fullmatch(pattern, s)), (pattern, s)


def test_the_limits() -> None:
    assert names.is_name("a" * 128) and not names.is_name("a" * 129)
    assert names.is_host_label("a" * 63) and not names.is_host_label("a" * 64)
    assert names.is_host_label("a-b") and not names.is_host_label("-a")
    assert not names.is_host_label("a-")
    assert names.is_hex("f" * 64, 64) and not names.is_hex("f" * 65, 64)
    assert not names.is_hex("") and not names.is_env_key("") and not names.is_name("")
