"""Exporting distilled students as stock diffusers pipelines."""
