"""Pipeline stages that sit on top of fetch and apply: build, boot, and the workloads run on each boot."""
