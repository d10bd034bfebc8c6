"""Stable Diffusion model building blocks: pipeline pieces, configs and tokenizer files."""
