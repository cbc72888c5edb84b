"""The built-in data sets: the embedded synthetic glyphs (generated on first use) and Omniglot (from its zips)."""
