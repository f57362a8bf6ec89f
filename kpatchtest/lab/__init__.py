"""The lab: where kernels boot. `backend.py` is the contract (a Lab runs BootJobs);
`ssh/` drives hosts over SSH (inventory, host locks, boot methods), `local/` is a QEMU VM
made to look like such a host, so both share one boot path."""
