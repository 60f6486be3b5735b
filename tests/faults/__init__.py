"""Fault tests: crashes, load, hostile input (see each module's docstring)."""
