"""The defender's side: scan a corpus for poisons, filter it, check its provenance, and
measure how well all of that works against known poisons."""
