"""sdbuild: declarative, cached builds of Stable Diffusion checkpoints into Core ML bundles."""

__version__ = "0.1.0"
