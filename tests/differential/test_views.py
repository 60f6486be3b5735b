"""Freshly mounted stacks, no operations: the SUT's merged view of a generated stack must equal
kernel overlayfs's (lookup, readdir, whiteouts of every encoding, opaque directories, xattrs),
and so must its view of the same stack rewritten in the OCI `.wh.` encoding (which the kernel
does not read, so the kernel's view of the original encoding is the model)."""

from __future__ import annotations

import pytest
from hypothesis import given

from tests.differential.harness import ORACLE_KIND, SUT_KIND, DiffPair
from tests.differential.settings import diff_settings, stack_strategy
from tests.helpers.layers import Stack, to_oci


@pytest.mark.timeout(1200)
@diff_settings(15)
@given(stack=stack_strategy())
def test_merged_view_matches_overlayfs(stack: Stack) -> None:
    pair = DiffPair(stack)
    try:
        pair.check_epoch()
    finally:
        pair.close()


@pytest.mark.skipif(SUT_KIND == ORACLE_KIND,
                    reason="kernel overlayfs does not read the OCI encoding")
@pytest.mark.timeout(1200)
@diff_settings(10)
@given(stack=stack_strategy())
def test_oci_encoded_view_matches_overlayfs(stack: Stack) -> None:
    pair = DiffPair(stack, sut_stack=to_oci(stack), oci=True)
    try:
        pair.check_epoch()
    finally:
        pair.close()
