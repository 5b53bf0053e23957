"""ONNX export and the monitor for threshold SAEs (``jumprelu``, ``batchtopk``): the top ``max_l0``
of the thresholded code, index -1 where fewer fire, the ``overflow`` output, θ compared in float32.

The reference is the torch model itself in float64 (``ExpanderSAE`` / ``TopKSAE`` ``encode`` with
k = max_l0; θ stays float32 and is promoted, not rounded). Thresholds are set from the data so
that rows fire around k latents: some rows fire fewer (-1 slots), some more (overflow).
"""

import copy
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
from saecompress.formats.saelens import save_dense
from saecompress.exporters.onnx import EncodeLayout, build_onnx, export_onnx, read_onnx_metadata
from saecompress.models import ExpanderSAE, TopKSAE
from saecompress.runtime import Monitor

M, N, D, K = 48, 512, 5, 8


def inputs(rows: int = 24, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, M)).astype(np.float32) * 2


def make_sae(activation: str, kind: str = "seed", encoder: str = "tied", k: int = K, seed: int = 0):
    """A threshold SAE whose θ puts a typical row at about k firing latents on :func:`inputs`."""
    torch.manual_seed(seed)
    if kind == "dense":
        sae = TopKSAE(M, N, k, activation=activation)
    else:
        indices = torch.stack([torch.randperm(M)[:D] for _ in range(N)]) if kind == "explicit" else None
        sae = ExpanderSAE(M, N, D, k, seed=seed, activation=activation, encoder=encoder, indices=indices)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        pre = sae.pre_activations(torch.from_numpy(inputs()))
        rate = k / N  # each latent fires on about this fraction of rows
        theta = torch.quantile(pre, 1 - rate, dim=0)
        if activation == "batchtopk":
            theta = torch.full((N,), float(torch.quantile(pre.flatten(), 1 - rate)))
        sae.threshold.copy_(theta)
    return sae.requires_grad_(False)


def reference(sae, x: np.ndarray, max_l0: int):
    """Float64 torch: ``(code [B, n], overflow [B], reconstruction [B, m])`` with k = max_l0."""
    ref = copy.deepcopy(sae).double().requires_grad_(False)
    ref.k = max_l0
    xt = torch.from_numpy(x).double()
    code = ref.encode(xt, dense=True).numpy()
    pre = ref.pre_activations(xt)
    fired = ((torch.relu(pre) * (pre > ref.threshold)) > 0).sum(1).numpy()
    return code, np.maximum(fired - max_l0, 0), ref(xt).numpy()


def run(model: onnx.ModelProto, **feeds) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def rel_err(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, dtype=np.float64) - want) / np.linalg.norm(want))


def check_codes(indices, values, code, tol=1e-5):
    """Slots that fired hold their latent and value; the others index -1, value 0; each latent once."""
    indices, values = indices.reshape(len(code), -1), values.reshape(len(code), -1)
    assert indices.dtype == np.int64
    assert ((indices == -1) == (values == 0)).all()
    for row in range(len(code)):
        kept = indices[row][indices[row] >= 0]
        assert len(set(kept.tolist())) == len(kept)
        assert set(kept.tolist()) == set(np.flatnonzero(code[row]).tolist()), f"row {row}"
    got = np.zeros_like(code)
    rows = np.nonzero(indices >= 0)
    got[rows[0], indices[rows]] = values[rows]
    assert rel_err(got, code) < tol


CASES = [  # (activation, mask kind, encoder, storage dtype)
    ("jumprelu", "seed", "tied", "float32"),
    ("jumprelu", "explicit", "untied", "bfloat16"),
    ("batchtopk", "seed", "untied", "float32"),
    ("batchtopk", "explicit", "tied", "bfloat16"),
    ("jumprelu", "seed", "untied", "bfloat16"),
]


@pytest.mark.parametrize("activation,kind,encoder,storage", CASES)
def test_expander_threshold_graph_matches_torch(tmp_path, activation, kind, encoder, storage):
    sae = load_compact(save_compact(make_sae(activation, kind, encoder), tmp_path / "sae.safetensors",
                                    dtype=storage))  # the values the file stores
    model = build_onnx(sae, "autoencoder", dense_output=True, storage_dtype=storage)
    onnx.checker.check_model(model, full_check=True)
    meta = read_onnx_metadata(model)
    assert meta["max_l0"] == meta["k"] == str(K) and "group=16" in meta["layout"]
    theta = next(t for t in model.graph.initializer if t.name == "threshold")
    assert theta.data_type == onnx.TensorProto.FLOAT
    x = inputs()
    code, spilled, recon = reference(sae, x, K)
    assert (spilled > 0).any() and ((code > 0).sum(1) < K).any()  # both overflow and -1 slots occur
    for rows in (slice(0, 1), slice(None)):  # one row takes the If's single-row branch
        out = run(model, activations=x[rows])
        check_codes(out["top_indices"], out["top_values"], code[rows])
        np.testing.assert_array_equal(out["overflow"], spilled[rows])
        assert rel_err(out["codes"], code[rows]) < 1e-5
        assert rel_err(out["reconstruction"], recon[rows]) < 1e-5


@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_dense_and_ungrouped_threshold_graphs_match_torch(activation):
    x = inputs()
    expander = make_sae(activation, encoder="untied")
    for sae, layout in ((make_sae(activation, "dense"), EncodeLayout()),
                        (expander, EncodeLayout(chunk=100, group=1)),
                        (expander, EncodeLayout(chunk=64, group=4, single_row_branch=False))):
        model = build_onnx(sae, "autoencoder", layout=layout)
        onnx.checker.check_model(model, full_check=True)
        code, spilled, recon = reference(sae, x, K)
        for rows in (slice(0, 1), slice(None)):
            out = run(model, activations=x[rows])
            check_codes(out["top_indices"], out["top_values"], code[rows])
            np.testing.assert_array_equal(out["overflow"], spilled[rows])
            assert rel_err(out["reconstruction"], recon[rows]) < 1e-5


@pytest.mark.parametrize("kind", ["seed", "dense"])
def test_small_max_l0_counts_overflow_like_numpy(kind):
    """max_l0 = 2 below the typical L0: most rows overflow; counted against numpy on the float64 code."""
    sae = make_sae("jumprelu", kind)
    model = build_onnx(sae, "encode", max_l0=2, seq=True)
    assert read_onnx_metadata(model)["max_l0"] == "2"
    x = inputs()
    code, _, _ = reference(sae, x, N)  # the full thresholded code
    fired = (code > 0).sum(1)
    out = run(model, activations=x.reshape(4, 6, M))
    assert out["overflow"].shape == (4, 6) and out["top_indices"].shape == (4, 6, 2)
    np.testing.assert_array_equal(out["overflow"].reshape(-1), np.maximum(fired - 2, 0))
    assert (out["overflow"] > 0).mean() > 0.5
    top2 = np.sort(code, 1)[:, ::-1][:, :2]  # the two largest code values of each row
    np.testing.assert_allclose(np.sort(out["top_values"].reshape(-1, 2), 1)[:, ::-1], top2, rtol=1e-5)


def test_bf16_threshold_sae_compares_theta_in_float32(tmp_path):
    """θ just below a latent's pre-activation fires in float32; rounded to bfloat16 it would not."""
    sae = load_compact(save_compact(make_sae("jumprelu"), tmp_path / "sae.safetensors", dtype="bfloat16"))
    x = inputs(1)
    pre = sae.double().pre_activations(torch.from_numpy(x).double())[0].detach().numpy()
    sae.float()
    theta = (pre * (1 - 2.0**-12)).astype(np.float32)  # 2.4e-4 below pre: far beyond float32 error
    rounds_up = (pre > 0.1) & (torch.from_numpy(theta).bfloat16().double().numpy() > pre)
    assert rounds_up.sum() >= 3
    with torch.no_grad():
        sae.threshold.copy_(torch.from_numpy(np.where(rounds_up, theta, np.float32(1e6))))
    model = build_onnx(sae, "encode", storage_dtype="bfloat16", max_l0=int(rounds_up.sum()) + 1)
    out = run(model, activations=x)
    kept = out["top_indices"][0]
    assert set(kept[kept >= 0].tolist()) == set(np.flatnonzero(rounds_up).tolist())
    assert out["overflow"][0] == 0


def test_decode_ignores_unused_slots():
    """-1 slots (even with a value) add nothing, for the expander function and the dense Gather."""
    for sae in (make_sae("jumprelu", encoder="untied"), make_sae("batchtopk", "dense")):
        values, indices = sae.encode(torch.from_numpy(inputs()))
        values, indices = values.numpy().copy(), indices.numpy().copy()
        unused = values == 0
        assert unused.any()
        want = sae.decode(torch.from_numpy(values), torch.from_numpy(indices)).numpy()
        indices[unused], values[unused] = -1, 5.0
        out = run(build_onnx(sae, "decode"), top_indices=indices, top_values=values)
        assert rel_err(out["reconstruction"], want) < 1e-5


def test_max_l0_refusals(tmp_path):
    uncapped = make_sae("jumprelu", "dense", k=N)  # as read from a dense file: no cap known
    with pytest.raises(SaeCompressError, match="--max-l0"):
        build_onnx(uncapped, "encode")
    assert read_onnx_metadata(build_onnx(uncapped, "encode", max_l0=16))["max_l0"] == "16"
    assert read_onnx_metadata(build_onnx(uncapped, "decode"))["k"] == str(N)  # decode needs no cap
    with pytest.raises(SaeCompressError, match="between 1 and"):
        build_onnx(make_sae("jumprelu"), max_l0=N + 1)
    topk = ExpanderSAE(M, N, D, K)
    with pytest.raises(SaeCompressError, match="drop --max-l0"):
        build_onnx(topk, max_l0=4)
    path = export_onnx(make_sae("jumprelu"), tmp_path / "sae.onnx")
    with pytest.raises(SaeCompressError, match="max_l0 is fixed"):
        Monitor(path, max_l0=4)
    with pytest.raises(SaeCompressError, match="--max-l0"):
        Monitor(uncapped)


def test_monitor_counts_overflow_rows(tmp_path):
    sae = make_sae("batchtopk", encoder="untied")
    x = inputs()
    code, spilled, _ = reference(sae, x, 4)
    mon = Monitor(sae, max_l0=4, batch_size=5)
    assert mon.k == 4 and mon.variable_count
    x_bad = x.copy()
    x_bad[3, 0] = np.nan  # skipped rows never overflow
    indices, values = mon.encode(x_bad)
    good = np.arange(len(x)) != 3
    check_codes(indices[good], values[good], code[good])
    np.testing.assert_array_equal(mon.overflow, np.where(good, spilled, 0))
    assert mon.overflow_rows == int((spilled[good] > 0).sum()) > 0
    assert mon.overflow_latents == int(spilled[good].sum())
    mon.encode(x)
    assert mon.overflow_rows == int((spilled[good] > 0).sum()) + int((spilled > 0).sum())

    src = save_compact(sae, tmp_path / "sae.safetensors")
    np.save(tmp_path / "acts.npy", x)
    result = CliRunner().invoke(cli, ["monitor", str(src), "--input", str(tmp_path / "acts.npy"),
                                      "--max-l0", "4", "--top", "6", "--jsonl"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["row"] for line in lines] == list(range(len(x)))
    for line, row in zip(lines, code):
        assert [f for f, _ in line["features"]] == list(np.argsort(-row)[:min(4, (row > 0).sum())])
        assert line.get("overflow", 0) == spilled[line["row"]]
    summary = json.loads(result.stderr.strip().splitlines()[-1])["summary"]
    assert summary == {"rows": len(x), "skipped": 0, "max_l0": 4, "overflow_rows": int((spilled > 0).sum()),
                       "overflow_latents": int(spilled.sum())}
    assert f"{int((spilled > 0).sum())} over max_l0=4" in result.stderr


def test_export_cli_takes_max_l0(tmp_path):
    src = save_compact(make_sae("jumprelu", encoder="untied"), tmp_path / "sae.safetensors", dtype="bfloat16")
    out = tmp_path / "sae.onnx"
    result = CliRunner().invoke(cli, ["export", str(src), str(out), "--graph", "autoencoder",
                                      "--dtype", "float16", "--max-l0", "12"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["hookpoints"][0]["max_l0"] == 12
    model = onnx.load(out)
    assert read_onnx_metadata(model)["max_l0"] == "12"
    assert [o.name for o in model.graph.output] == ["reconstruction", "top_indices", "top_values", "overflow"]
    assert next(t for t in model.graph.initializer if t.name == "threshold").data_type == onnx.TensorProto.FLOAT
    got = run(model, activations=inputs().astype(np.float16))
    assert got["top_values"].dtype == np.float16 and got["overflow"].dtype == np.int64
    assert ((got["top_indices"] == -1) == (got["top_values"] == 0)).all() and (got["overflow"] > 0).any()
    bad = CliRunner().invoke(cli, ["export", str(src), str(tmp_path / "x.onnx"), "--max-l0", "9999"])
    assert bad.exit_code == 2 and "error: --max-l0 9999" in bad.output and not (tmp_path / "x.onnx").exists()


def test_export_takes_the_cap_from_acts(tmp_path):
    """--acts: max_l0 is the 99.9th percentile of the per-row L0 there; refused with --max-l0 or a top-k SAE."""
    sae = make_sae("jumprelu", "dense", k=N)  # no cap, as read from a dense file
    x = inputs(rows=400, seed=3)
    np.save(tmp_path / "acts.npy", x)
    pre = sae.pre_activations(torch.from_numpy(x)).double()
    fired = ((pre > sae.threshold.double()) & (pre > 0)).sum(1).numpy()
    want = int(np.quantile(fired, 0.999, method="higher"))
    src = tmp_path / "dense"
    save_dense(sae, src)
    out = tmp_path / "sae.onnx"
    result = CliRunner().invoke(cli, ["export", str(src), str(out), "--acts", str(tmp_path / "acts.npy")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["hookpoints"][0]["max_l0"] == want < N
    assert read_onnx_metadata(onnx.load(out))["max_l0"] == str(want)
    topk = save_compact(ExpanderSAE(M, N, D, K), tmp_path / "topk.safetensors")
    for source, extra, message in ((src, ["--max-l0", "4"], "not both"), (topk, [], "drop --acts")):
        bad = CliRunner().invoke(cli, ["export", str(source), str(tmp_path / "x.onnx"), "--acts",
                                       str(tmp_path / "acts.npy"), *extra])
        assert bad.exit_code == 2 and message in bad.output and not (tmp_path / "x.onnx").exists(), bad.output
