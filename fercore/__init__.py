"""Code shared by training and serving: labels, preprocessing, models, checkpoints, storage.

Everything that must agree between the model that training writes and the model that
serving reads lives here, once (no train/serve skew).
"""

__version__ = "0.1.0"
