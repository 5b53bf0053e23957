"""ONNX export: checker passes, onnxruntime matches a float64 reference for every ordering and dtype."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from saecompress import SaeCompressError
from saecompress.cli.main import cli
from saecompress.compact import load_compact, save_compact
from saecompress.exporters.onnx import EncodeLayout, build_onnx, export_onnx, read_onnx_metadata
from saecompress.models import ExpanderSAE, TopKSAE

M, N, D, K = 48, 512, 5, 8


def make_sae(activation="signed_topk", encoder="tied", normalize=False, n=N, seed=0) -> ExpanderSAE:
    torch.manual_seed(seed)
    sae = ExpanderSAE(M, n, D, K, seed=seed, activation=activation, encoder=encoder, normalize_input=normalize)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, **feeds) -> dict[str, np.ndarray]:
    sess = session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def rel_err(got, want) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


def assert_codes_match(indices, values, ref_idx, ref_vals, tol):
    """Identical index sets per row, and values (matched by index) within relative ``tol``."""
    indices, values = indices.reshape(-1, ref_idx.shape[1]), values.reshape(-1, ref_idx.shape[1])
    assert indices.dtype == np.int64
    for row in range(len(ref_idx)):
        assert set(indices[row].tolist()) == set(ref_idx[row].tolist()), f"row {row}"
    got = np.take_along_axis(values, np.argsort(indices, 1), 1)
    want = np.take_along_axis(ref_vals, np.argsort(ref_idx, 1), 1)
    assert rel_err(got, want) < tol


CASES = [  # (activation, encoder, normalize, storage dtype): every ordering, dtype, encoder, norm
    # (threshold activations: tests/test_onnx_threshold.py)
    ("signed_topk", "tied", False, "float32"),
    ("topk_relu", "untied", True, "float32"),
    ("relu_topk", "tied", True, "float32"),
    ("signed_topk", "untied", True, "float16"),
    ("topk_relu", "tied", False, "bfloat16"),
    ("relu_topk", "untied", False, "int8"),
    ("topk_relu", "tied", True, "int8"),
    ("abs_topk", "untied", True, "bfloat16"),
]


@pytest.mark.parametrize("activation,encoder,normalize,storage", CASES)
def test_autoencoder_matches_float64_reference(float64_sae, tmp_path, activation, encoder, normalize, storage):
    path = save_compact(make_sae(activation, encoder, normalize), tmp_path / "sae.safetensors", dtype=storage)
    sae = load_compact(path)  # values as the file stores them
    model = build_onnx(sae, "autoencoder", dense_output=True, storage_dtype=storage)
    onnx.checker.check_model(model, full_check=True)
    stored = {t.name: t.data_type for t in model.graph.initializer}
    expected = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
                "bfloat16": onnx.TensorProto.BFLOAT16, "int8": onnx.TensorProto.INT8}[storage]
    assert stored["values"] == expected  # stored representation kept, dequantised in-graph
    x = np.random.default_rng(1).standard_normal((7, M)).astype(np.float32) * 2
    for batch in (x[:1], x):  # one row takes the If's single-row branch
        out = run(model, activations=batch)
        ref_idx, ref_vals, ref_recon = float64_sae(sae, batch)
        assert_codes_match(out["top_indices"], out["top_values"], ref_idx, ref_vals, 1e-5)
        assert rel_err(out["reconstruction"], ref_recon) < 1e-5
        dense = np.zeros((len(batch), N))
        np.put_along_axis(dense, ref_idx, ref_vals, 1)
        assert out["codes"].shape == (len(batch), N)
        assert rel_err(out["codes"], dense) < 1e-5


@pytest.mark.parametrize("layout", [EncodeLayout(), EncodeLayout(chunk=100, group=1),
                                    EncodeLayout(chunk=64, group=4, single_row_branch=False)])
def test_every_encode_formulation_agrees(float64_sae, layout):
    sae = make_sae("topk_relu")
    model = build_onnx(sae, layout=layout)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(2).standard_normal((5, M)).astype(np.float32)
    out = run(model, activations=x)
    assert_codes_match(out["top_indices"], out["top_values"], *float64_sae(sae, x)[:2], 1e-5)


def test_group_max_falls_back_when_groups_do_not_fit(float64_sae):
    """n not a multiple of the group (or n/G < k): plain TopK over all latents, still exact."""
    sae = make_sae("relu_topk", n=100)
    model = build_onnx(sae)
    assert "group=1" in read_onnx_metadata(model)["layout"]
    x = np.random.default_rng(3).standard_normal((4, M)).astype(np.float32)
    out = run(model, activations=x)
    assert_codes_match(out["top_indices"], out["top_values"], *float64_sae(sae, x)[:2], 1e-5)


def test_decode_graph_matches_model_decode():
    sae = make_sae("signed_topk", "untied", normalize=True)
    model = build_onnx(sae, "decode")
    onnx.checker.check_model(model, full_check=True)
    x = torch.randn(6, M)
    values, indices = sae.encode(x)
    out = run(model, top_indices=indices.numpy(), top_values=values.detach().numpy())
    # float64 reference of the decoder (normalised space, like model.decode)
    dec = np.zeros((N, M))
    dec[np.arange(N)[:, None], sae.indices.numpy()] = sae.values.detach().double().numpy()
    want = np.einsum("bk,bkm->bm", values.detach().double().numpy(), dec[indices.numpy()]) \
        + sae.b_dec.detach().double().numpy()
    assert rel_err(out["reconstruction"], want) < 1e-5


def test_float16_graph_within_1e2(float64_sae):
    sae = make_sae("topk_relu", "untied", normalize=True)
    model = build_onnx(sae, "autoencoder", dtype="float16")
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    x = np.random.default_rng(4).standard_normal((6, M)).astype(np.float16)
    out = run(model, activations=x)
    assert out["top_values"].dtype == np.float16
    # reference on the float16-rounded weights and inputs: only output rounding remains
    rounded = make_sae("topk_relu", "untied", normalize=True)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    ref_idx, ref_vals, ref_recon = float64_sae(rounded, x.astype(np.float32))
    assert_codes_match(out["top_indices"], out["top_values"], ref_idx, ref_vals, 1e-2)
    assert rel_err(out["reconstruction"], ref_recon) < 1e-2


def test_sequence_inputs_keep_their_axes(float64_sae):
    sae = make_sae("topk_relu")
    model = build_onnx(sae, "autoencoder", seq=True)
    onnx.checker.check_model(model, full_check=True)
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[:2]] == ["batch", "seq"]
    x = np.random.default_rng(5).standard_normal((2, 3, M)).astype(np.float32)
    out = run(model, activations=x)
    assert out["top_indices"].shape == (2, 3, K) and out["reconstruction"].shape == (2, 3, M)
    ref_idx, ref_vals, ref_recon = float64_sae(sae, x.reshape(-1, M))
    assert_codes_match(out["top_indices"], out["top_values"], ref_idx, ref_vals, 1e-5)
    assert rel_err(out["reconstruction"].reshape(-1, M), ref_recon) < 1e-5


@pytest.mark.parametrize("activation", ["topk_relu", "relu_topk", "signed_topk", "abs_topk"])
def test_dense_topk_sae_exports_with_the_same_contract(float64_sae, activation):
    torch.manual_seed(0)
    dense = TopKSAE(M, 256, K, activation=activation, normalize_input=activation == "topk_relu")
    with torch.no_grad():
        dense.b_enc.normal_(0, 0.3)
        dense.b_dec.normal_(0, 0.3)
    model = build_onnx(dense, "autoencoder")
    onnx.checker.check_model(model, full_check=True)
    assert read_onnx_metadata(model)["kind"] == "dense"
    x = np.random.default_rng(6).standard_normal((5, M)).astype(np.float32)
    out = run(model, activations=x)
    ref_idx, ref_vals, ref_recon = float64_sae(dense, x)
    assert_codes_match(out["top_indices"], out["top_values"], ref_idx, ref_vals, 1e-5)
    assert rel_err(out["reconstruction"], ref_recon) < 1e-5


def test_model_uses_custom_domain_functions_and_explicit_versions():
    model = build_onnx(make_sae(normalize=True), "autoencoder")
    assert model.ir_version == 10
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18), ("ai.saecompress", 1)}
    assert {f.name for f in model.functions} == {"ExpanderEncode", "ExpanderDecode", "LayerNorm"}
    assert {n.op_type for n in model.graph.node if n.domain == "ai.saecompress"} == \
        {"ExpanderEncode", "ExpanderDecode", "LayerNorm"}
    assert "mask_indices" in {t.name for t in model.graph.initializer}  # self-contained file

    def walk(nodes):  # every node, also those inside If / Loop branches
        for node in nodes:
            yield node
            for attr in node.attribute:
                for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from walk(graph.node)

    encode = next(f for f in model.functions if f.name == "ExpanderEncode")
    nodes = list(walk(encode.node))
    constants = {node.output[0]: onnx.numpy_helper.to_array(node.attribute[0].t)
                 for node in nodes if node.op_type == "Constant"}
    topks = [node for node in nodes if node.op_type == "TopK"]
    assert len(topks) >= 2  # the single-row branch and the batched branch each select
    for node in topks:  # K is a 1-D int64 Constant of shape [1]
        k = constants[node.input[1]]
        assert k.dtype == np.int64 and k.shape == (1,), node.name
    assert K in {int(constants[node.input[1]][0]) for node in topks}


def test_export_onnx_from_a_compact_file_writes_atomically(tmp_path):
    src = save_compact(make_sae("topk_relu"), tmp_path / "sae.safetensors")
    out = export_onnx(str(src), tmp_path / "out" / "sae.onnx")
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["sae.onnx"]
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert read_onnx_metadata(model)["graph"] == "encode"


@pytest.mark.parametrize("kwargs,needle", [({"graph": "both"}, "unknown graph"),
                                           ({"dtype": "int8"}, "unknown ONNX dtype"),
                                           ({"opset": 13}, "opset 13")])
def test_bad_arguments_are_clean_errors(tmp_path, kwargs, needle):
    with pytest.raises(SaeCompressError, match=needle):
        export_onnx(make_sae(), tmp_path / "x.onnx", **kwargs)
    assert not list(tmp_path.iterdir())


def test_corrupt_source_is_a_clean_error(tmp_path):
    bad = tmp_path / "sae.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(SaeCompressError, match="sae.safetensors"):
        export_onnx(str(bad), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_cli(tmp_path):
    src = save_compact(make_sae("relu_topk", normalize=True), tmp_path / "sae.safetensors", dtype="int8")
    out = tmp_path / "sae.onnx"
    result = CliRunner().invoke(cli, ["export", str(src), str(out), "--graph", "autoencoder",
                                      "--dtype", "float16", "--dense-output"])
    assert result.exit_code == 0, result.output
    [summary] = json.loads(result.output)["hookpoints"]
    assert summary["file_bytes"] == out.stat().st_size
    names = [o.name for o in session(onnx.load(out)).get_outputs()]
    assert names == ["reconstruction", "top_indices", "top_values", "codes"]
    bad = CliRunner().invoke(cli, ["export", str(tmp_path / "missing.safetensors"), str(out)])
    assert bad.exit_code == 2 and "error:" in bad.output


def test_export_cli_from_a_dense_sparsify_folder(tmp_path):
    """A dense source in a library layout exports as MatMul + TopK with the same contract."""
    from safetensors.torch import save_file

    folder = tmp_path / "sae" / "layers.0"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(256, M, generator=g)
    W_enc, b_enc, b_dec = torch.randn(M, 256, generator=g), torch.randn(256, generator=g), torch.randn(M, generator=g)
    save_file({"encoder.weight": W_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": b_dec},
              str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 256 // M,
                                                 "num_latents": 256, "k": K, "d_in": M,
                                                 "normalize_decoder": True, "skip_connection": False,
                                                 "transcode": False, "multi_topk": False}))
    out = tmp_path / "dense.onnx"
    result = CliRunner().invoke(cli, ["export", str(folder), str(out), "--graph", "autoencoder"])
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    assert read_onnx_metadata(model)["kind"] == "dense" and not model.functions
    x = np.random.default_rng(7).standard_normal((4, M)).astype(np.float32)
    got = run(model, activations=x)
    pre = np.maximum((x.astype(np.float64) - b_dec.double().numpy()) @ W_enc.double().numpy()
                     + b_enc.double().numpy(), 0)  # sparsify: ReLU, then TopK
    top = np.argsort(-pre, 1)[:, :K]
    vals = np.take_along_axis(pre, top, 1)
    recon = np.einsum("bk,bkm->bm", vals, W_dec.double().numpy()[top]) + b_dec.double().numpy()
    assert_codes_match(got["top_indices"], got["top_values"], top, vals, 1e-5)
    assert rel_err(got["reconstruction"], recon) < 1e-5
