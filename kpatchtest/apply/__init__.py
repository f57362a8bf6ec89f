"""Apply: the series on each branch with a verdict and verified prerequisites (entry: stage.ApplyStage; engine.apply_series)."""
