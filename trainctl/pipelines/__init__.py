"""Pipelines: steps that run as ordinary sessions, in the order their `needs` give, each
starting from what earlier steps produced (`{steps.pretrain.best_checkpoint}`), resumable like
make: `spec` reads and checks pipeline.toml, `engine` runs it and keeps the pipeline record."""
