"""The searched-schedule baseline (Diff-ES style): a (mu+lambda) ES over per-stage sparsities."""
