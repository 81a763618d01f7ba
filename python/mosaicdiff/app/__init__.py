"""The `mosaicdiff` command line beneath `mosaicdiff.cli`, one job per module.

Imports point down only: `mosaicdiff.cli` (the parser) -> `commands` (one function per
subcommand) -> `mosaicdiff.demo` / `mosaicdiff.evaluate` -> `experiment` (the steps they share)
-> `inputs` (models, calibration data) -> the method (`mosaicdiff.pruning`, `sampling`, ...).
`argtypes`, `outputs` and `errors` are the leaves: flag values, output locations, exit codes.
"""
