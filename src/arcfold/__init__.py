"""arcfold: metric-learning pipeline for Kaggle image retrieval and instance recognition."""

__version__ = "0.1.0"
