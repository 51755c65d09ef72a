"""Training, evaluation and publishing of FER2013 models (needs the ``train`` extra)."""
