"""The model-agnostic method: schedule, stage plan, calibration, OBS, compaction, pruning.

Never imports a model family: the family's adapter is passed in (`mosaicdiff.api`)."""
