"""What keeps the ONNX graphs runnable on onnxruntime's CUDA execution provider, checked on the graphs themselves
(no GPU here): no bf16 op inside a model-local function (CUDA-EP session creation fails on one), no ScatterND with
a reduction (it falls back to the CPU), and the ``--inline`` form (onnx's own inliner) computing what the function
form computes on onnxruntime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from saecompress.exporters.onnx import build_onnx, inlined
from saecompress.exporters.onnx_functions import DOMAIN
from saecompress.models import ExpanderSAE

M, N, D, K = 32, 160, 5, 8
CASES = [(activation, storage) for activation in ("signed_topk", "topk_relu", "jumprelu", "topafa")
         for storage in ("float32", "bfloat16", "int8")]


def expander(activation: str) -> ExpanderSAE:
    torch.manual_seed(0)
    threshold = torch.rand(N) * 0.2 if activation == "jumprelu" else None
    sae = ExpanderSAE(M, N, D, K, activation=activation, encoder="untied", threshold=threshold)
    with torch.no_grad():
        sae.enc_values.normal_()
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_()
    return sae


def bf16_ops(function: onnx.FunctionProto) -> list[str]:
    """The nodes of ``function`` that make or hold a bfloat16 tensor."""
    found = []
    for node in function.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.BFLOAT16:
                found.append(f"{node.op_type} to bfloat16")
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.BFLOAT16:
                found.append(f"{node.op_type} holding a bfloat16 tensor")
    return found


def all_nodes(model: onnx.ModelProto):
    yield from model.graph.node
    for function in model.functions:
        yield from function.node


@pytest.mark.parametrize("activation,storage", CASES)
def test_graphs_hold_no_bf16_op_in_functions_and_no_scatternd_reduction(activation, storage):
    sae = expander(activation)
    for graph in ("encode", "decode", "autoencoder"):
        model = build_onnx(sae, graph, storage_dtype=storage, dense_output=graph != "decode")
        assert model.functions, "the expander ops are model-local functions"
        for function in model.functions:
            assert bf16_ops(function) == [], (graph, function.name)
        if storage == "bfloat16":  # the values stay bf16 in the file, cast to float in the main graph
            assert any(init.data_type == TensorProto.BFLOAT16 for init in model.graph.initializer)
        for node in all_nodes(model):
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            assert not (node.op_type == "ScatterND" and reduction != "none"), (graph, node.name)


@pytest.mark.parametrize("activation,storage", CASES)
def test_the_inlined_graph_computes_what_the_function_form_computes(activation, storage):
    sae = expander(activation)
    x = np.random.default_rng(0).standard_normal((37, M)).astype(np.float32) * 2
    model = build_onnx(sae, "autoencoder", storage_dtype=storage, dense_output=True)
    flat = inlined(model)
    assert not flat.functions and all(node.domain in ("", "ai.onnx") for node in flat.graph.node)
    assert DOMAIN not in {entry.domain for entry in flat.opset_import}
    onnx.checker.check_model(flat, full_check=True)
    outputs = []
    for form in (model, flat):
        session = ort.InferenceSession(form.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: x}))
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)


def test_export_inline_from_the_cli(tmp_path):
    from click.testing import CliRunner

    from saecompress.cli.main import cli
    from saecompress.compact import save_compact

    save_compact(expander("signed_topk"), tmp_path / "sae.safetensors", dtype="bfloat16")
    for flag, name in (([], "functions.onnx"), (["--inline"], "inlined.onnx")):
        result = CliRunner().invoke(cli, ["export", str(tmp_path / "sae.safetensors"), str(tmp_path / name), *flag])
        assert result.exit_code == 0, result.output
    functions, flat = (onnx.load(str(tmp_path / name)) for name in ("functions.onnx", "inlined.onnx"))
    assert functions.functions and not flat.functions
    x = np.random.default_rng(2).standard_normal((5, M)).astype(np.float32)
    runs = [ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"activations": x}) for model in (functions, flat)]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
