"""Pure decision logic: no os, no pyfuse3, no trio imports."""
