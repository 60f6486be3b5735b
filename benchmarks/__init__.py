"""Side-by-side and property-based file system benchmarks (see benchmarks/README.md).

`python -m benchmarks run | scaling | props | dataset`. Modules:
`util` (commands, /proc, output), `mounts` (mounting with timeouts), `backends` (the file systems
under test), `trees` (layer formats, flattening, snapshots), `datasets` (cached layer stacks),
`workloads` + `runner` + `report` (the side-by-side run), `scaling` (cost curves), `props`
(Hypothesis-generated workloads and performance properties).
"""
