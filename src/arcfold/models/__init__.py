"""Models: the embedding model (backbone -> pool -> neck), and the training-only heads and losses."""
