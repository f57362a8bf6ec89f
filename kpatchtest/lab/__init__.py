"""The lab: hosts reached over SSH, with power and console commands (labgrid-style:
a target is resources + drivers + a boot strategy, so hardware and the local QEMU lab
share one boot path)."""
