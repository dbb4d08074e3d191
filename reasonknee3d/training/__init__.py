"""Training both model families: experiment config schema, stages, Trainer wiring, checkpoints, plots."""
