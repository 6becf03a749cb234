"""Everything that puts an output in place: atomic writes, what may be replaced, model cards, hub uploads."""
