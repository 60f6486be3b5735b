"""mountctl: run container images on unionfs."""

__version__ = "0.1.0"
