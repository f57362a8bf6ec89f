"""Boot: every build booted per lab host and round, with its workloads (entry: stage.BootStage)."""
