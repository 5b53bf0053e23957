"""A tiny ONNX graph builder: named nodes, constants and initializers without boilerplate.

One ``GraphBuilder`` writes either a graph (constants become initializers) or a model-local
function body (constants become ``Constant`` nodes, since functions cannot hold initializers).
"""

from __future__ import annotations

import itertools

import numpy as np
from onnx import FunctionProto, GraphProto, TensorProto, helper, numpy_helper

STANDARD = ""  # the default ONNX domain


class GraphBuilder:
    """Collects nodes; ``op`` returns the output name(s) of each node it adds."""

    def __init__(self, prefix: str, *, function: bool = False) -> None:
        self.prefix = prefix
        self.function = function
        self.nodes: list = []
        self.initializers: list[TensorProto] = []
        self._ids = itertools.count()

    def name(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._ids)}"

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1,
           domain: str = STANDARD, **attrs) -> str | list[str]:
        """Add ``op_type(inputs, **attrs)``; one output name, or a list when ``outputs`` > 1."""
        names = outputs if isinstance(outputs, list) else [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(op_type),
                                           domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value: np.ndarray | list | int | float, hint: str = "c",
              dtype: np.dtype | type | None = None) -> str:
        """A constant tensor (initializer in a graph, ``Constant`` node in a function)."""
        array = np.asarray(value, dtype=dtype)
        if self.function:
            return self.op("Constant", value=numpy_helper.from_array(array, self.name(hint)))
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def initializer(self, name: str, array: np.ndarray | TensorProto) -> str:
        """A named initializer (graph only): the stored weights, kept under readable names."""
        assert not self.function, "functions cannot hold initializers"
        if isinstance(array, TensorProto):
            array.name = name
            self.initializers.append(array)
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant (shapes, axes, TopK's K)."""
        return self.const(np.array(values, dtype=np.int64), "i64")

    def graph(self, name: str, inputs: list, outputs: list) -> GraphProto:
        return helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)

    def function_proto(self, domain: str, name: str, inputs: list[str], outputs: list[str],
                       opset: int, attributes: list[str] = (), doc: str = "") -> FunctionProto:
        return helper.make_function(domain, name, inputs, outputs, self.nodes,
                                    [helper.make_opsetid(STANDARD, opset)],
                                    attributes=list(attributes), doc_string=doc)
