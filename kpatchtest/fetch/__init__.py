"""Fetch: a series from lore (b4), a local mbox or a commit range, as one Series (entry: stage.fetch_series)."""
