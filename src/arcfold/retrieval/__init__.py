"""Retrieval: metrics (Recall@K, MAP@R), k-NN search, re-ranking, label voting, combining embeddings, submissions.

Pure numpy/torch functions over embeddings; nothing here knows of models, training or files of an experiment.
"""
