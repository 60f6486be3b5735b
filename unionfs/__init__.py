"""unionfs: a userspace union filesystem on FUSE."""

__version__ = "0.1.0"
