"""Walking a saved ML Program: its spec, its nested blocks, its const ops and their stored values.

Palettization and read-back both edit or read the saved protobuf directly (never the MIL program
coremltools would rebuild from it), so they share these few readers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from builder.coreml.package import WEIGHTS_DIR

SPEC_PATH = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHT_FILE = "weight.bin"

ValueReader = Callable[[Any], np.ndarray]


def mil_proto() -> Any:
    from coremltools.proto import MIL_pb2

    return MIL_pb2


def read_spec(package: Path) -> Any:
    """The package's `Model` protobuf."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((package / SPEC_PATH).read_bytes())
    return spec


def value_reader(package: Path) -> ValueReader:
    """Decode any MIL proto value (immediate or in the weight file) with coremltools' own loader."""
    from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext, _load_value

    context = TranscriptionContext(str(package / WEIGHTS_DIR))
    return lambda value: _load_value(context, value)


def _blocks(block: Any) -> Iterator[Any]:
    yield block
    for op in block.operations:
        for inner in op.blocks:
            yield from _blocks(inner)


def function_blocks(program: Any) -> Iterator[tuple[str, list[Any]]]:
    """(function name, every block of it, nested ones included) for each function of the program."""
    for name, function in program.functions.items():
        for block in function.block_specializations.values():
            yield name, list(_blocks(block))


def operations(program: Any) -> Iterator[Any]:
    """Every op of every function, in program order."""
    for _, blocks in function_blocks(program):
        for block in blocks:
            yield from block.operations


def op_name(op: Any) -> str:
    return op.attributes["name"].immediateValue.tensor.strings.values[0]


def is_float_blob(op: Any) -> bool:
    """A float16/float32 const stored in the weight file: what palettization may replace."""
    if op.type != "const" or op.attributes["val"].WhichOneof("value") != "blobFileValue":
        return False
    return op.attributes["val"].type.tensorType.dataType in (mil_proto().FLOAT16, mil_proto().FLOAT32)


def const_shape(op: Any) -> tuple[int, ...]:
    return tuple(d.constant.size for d in op.attributes["val"].type.tensorType.dimensions)


def consumers(blocks: list[Any]) -> dict[str, list[tuple[Any, str]]]:
    """Var name -> (op, parameter) pairs reading it, over a function's nested blocks."""
    readers: dict[str, list[tuple[Any, str]]] = {}
    for block in blocks:
        for op in block.operations:
            for parameter, argument in op.inputs.items():
                for binding in argument.arguments:
                    if binding.WhichOneof("binding") == "name":
                        readers.setdefault(binding.name, []).append((op, parameter))
    return readers


def float_weight_ops(package: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(op name, shape) of every float const stored in the package's weight file, in program order."""
    return [(op_name(op), const_shape(op)) for op in operations(read_spec(package).mlProgram) if is_float_blob(op)]
