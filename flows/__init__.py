"""Prefect flows over the DVC pipeline (see flows/pipeline.py)."""
