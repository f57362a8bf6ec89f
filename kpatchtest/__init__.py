"""kpatchtest: test Linux kernel patch series across stable branches."""

__version__ = "0.1.0"
