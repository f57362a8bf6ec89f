"""Pipeline stages that sit on top of fetch and apply (build; later boot, workloads)."""
