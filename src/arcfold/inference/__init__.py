"""Inference: embedding images with trained models (also training's validation and the test split), ensembles,
predictions and the whole offline run (:func:`arcfold.inference.run.run_inference`)."""
