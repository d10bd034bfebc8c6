"""`sdbuild report`: a bundle's models, compression cost and sample images, measured in torch."""

from builder.report.plot import Candidate, load_candidates
from builder.report.read_back import load_read_back_unet
from builder.report.report import verify_read_back, write_report

__all__ = ["Candidate", "load_candidates", "load_read_back_unet", "verify_read_back", "write_report"]
