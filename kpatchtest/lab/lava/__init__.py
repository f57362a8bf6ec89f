"""The LAVA lab backend (lab: {name: lava, lava: {...}}): see lab.py and docs/lava.md."""
