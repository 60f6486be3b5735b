"""Differential tests: unionfs (or DIFF_SUT) against kernel overlayfs on identical layers."""
