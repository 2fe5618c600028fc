"""Torch-free deployment runtime: manifest, preprocessing, tokenisation, ONNX Runtime / TensorRT backends.

Nothing in this package imports torch or transformers. Parity checks import the PyTorch reference from
``export`` lazily, inside the function that needs it.
"""
