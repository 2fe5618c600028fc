"""Serving on Triton Inference Server: a model repository generated from the manifest (``repository``), the Python
backend models it runs (``models``), and a local ``tritonserver`` (``server``). Nothing here imports tritonclient
or Triton's Python utilities at import time."""
