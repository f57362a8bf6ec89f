"""Shared fixtures: a real public-inbox on loopback (conftest_lore), Debian kernel trees (conftest_debian)."""

pytest_plugins = ["tests.conftest_lore", "tests.conftest_debian", "tests.conftest_lab", "tests.conftest_sshd"]
