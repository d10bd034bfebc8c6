"""W8A8: 8-bit weights and activations for the UNet, with coremltools' torch quantizer.

`unet.py` rebuilds the conversion module's forward in a form torch.fx can trace (what
coremltools' `LinearQuantizer` needs), `quantizer.py` holds the quantizer configurations,
`calibration.py` records the UNet inputs that set activation ranges, `sensitivity.py` measures what
quantizing each layer alone costs, and `decisions.py` turns those measurements into the per-layer
W8A8 / W8A32 choice the converted model is built with.
"""
