"""The local lab backend: a QEMU VM on the known-good kernel, reached like a lab host (entry: lab.LocalLab)."""
