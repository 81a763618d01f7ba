"""The `mosaicdiff` command line beneath `mosaicdiff.app.cli`, one job per module.

Imports point down only: `mosaicdiff.app.cli` (the parser) -> `commands` (one function per
subcommand) -> `mosaicdiff.app.demo` / `mosaicdiff.app.evaluate` -> `experiment` (the steps they share)
-> `inputs` (models, calibration data) -> the method (`mosaicdiff.method.pruning`, `sampling`, ...).
`argtypes`, `outputs` and `errors` are the leaves: flag values, output locations, exit codes.
"""
