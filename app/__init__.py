"""The FER2013 inference service: a FastAPI app that serves the ONNX model training exports.

Nothing here imports ``training`` or torch; the entry point is :mod:`app.serve`.
"""
