"""Build: baseline and patched kernels per branch from a Kconfig recipe (entry: stage.BuildStage)."""
