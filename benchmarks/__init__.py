"""Side-by-side and property-based file system benchmarks."""
