"""The plumbing of a run: config schema and checks, distributed processes, checkpoints, run
records, loggers, per-step metrics and plots."""
