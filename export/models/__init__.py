"""Explicit, export-friendly forward passes over Hugging Face weights (one readable file per model)."""
