"""Stage functions: plain functions from declared input folders and params to an output folder.

Each module wires Stable Diffusion knowledge (`builder.sd`) and Core ML helpers (`builder.coreml`)
into the generic engine's stage contract `run(inputs, params, out) -> summary`.
"""
