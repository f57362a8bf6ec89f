"""The SSH lab backend: inventory, connections, host locks, boot methods (entry: lab.SshLab)."""
