"""Mixed-bit palettization (MBP): per-layer sensitivity analysis and per-layer bit-width recipes.

A layer is named by its torch parameter name in the UNet conversion module (`layers.py`), which
both the analysis and recipe files use, and which maps to the converted package's op names by
rule, so a recipe fits any checkpoint of the same architecture.
"""
