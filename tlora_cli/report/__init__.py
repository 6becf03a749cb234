"""What an adapter holds and where its budget went: the numbers (summary) and the picture (picture)."""
