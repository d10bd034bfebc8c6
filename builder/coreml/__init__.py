"""Core ML knowledge that is not specific to Stable Diffusion: package normalisation, read-back."""
