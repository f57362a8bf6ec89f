"""The compare stage: baseline against patched, per branch and lab host (issue 12)."""
