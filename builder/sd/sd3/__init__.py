"""Stable Diffusion 3: T5 tokenizer files, synthetic pipelines and the conversion modules of its
T5 text encoder and MMDiT denoiser (the CLIP encoders and the VAE are the SDXL/SD ones)."""
