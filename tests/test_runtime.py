"""The onnxruntime Monitor and the ``monitor`` CLI: parity, alerts, providers, bad inputs."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

from saecompress import ExpanderSAE, SaeCompressError
from saecompress.cli.main import cli
from saecompress.compact import save_compact
from saecompress.exporters.onnx import export_onnx
from saecompress.runtime import CPU, CUDA, Alert, Monitor, choose_providers

M, N, D, K = 32, 256, 4, 6
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    model = ExpanderSAE(M, N, D, K, activation="topk_relu", normalize_input=True)
    with torch.no_grad():
        model.b_enc.normal_(0, 0.3)
        model.b_dec.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def files(sae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runtime")
    compact = save_compact(sae, folder / "sae.safetensors")
    return {"compact": compact,
            "encode": export_onnx(sae, folder / "enc.onnx", "encode"),
            "autoencoder": export_onnx(sae, folder / "ae.onnx", "autoencoder"),
            "seq": export_onnx(sae, folder / "seq.onnx", "autoencoder", seq=True),
            "fp16": export_onnx(sae, folder / "fp16.onnx", "autoencoder", dtype="float16")}


def acts(rows=10, seed=1):
    return np.random.default_rng(seed).standard_normal((rows, M)).astype(np.float32) * 3


def assert_same_sets(got, want):
    for g, w in zip(got.reshape(-1, K).tolist(), want.reshape(-1, K).tolist()):
        assert set(g) == set(w)


@pytest.mark.parametrize("which", ["compact", "encode", "autoencoder", "seq", "fp16", "object"])
def test_encode_matches_the_torch_model_from_every_kind_of_model(sae, files, which):
    mon = Monitor(sae if which == "object" else files[which], threads=1, batch_size=4)
    # the provider the session really runs on, the first usable one (CUDA on a GPU install, else CPU)
    assert mon.provider == mon.session.get_providers()[0] in choose_providers()
    x = acts(10)
    indices, values = mon.encode(x)
    ref_values, ref_indices = sae.encode(torch.from_numpy(x))
    assert indices.shape == (10, K) and values.dtype == np.float32
    assert_same_sets(indices, ref_indices.numpy())
    tol = 1e-2 if which == "fp16" else 1e-5
    got = np.sort(values, 1)
    want = np.sort(ref_values.detach().numpy(), 1)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol
    if which != "encode":
        recon = mon.reconstruct(x[None])  # leading axes are kept: [1, 10, m]
        want = sae(torch.from_numpy(x)).detach().numpy()
        assert recon.shape == (1, 10, M)
        assert np.linalg.norm(recon[0] - want) / np.linalg.norm(want) < tol


def test_batches_do_not_change_results(files):
    x = acts(23)
    small = Monitor(files["compact"], batch_size=3).encode(x)
    large = Monitor(files["compact"], batch_size=512).encode(x)
    np.testing.assert_array_equal(small[0], large[0])
    np.testing.assert_allclose(small[1], large[1], rtol=1e-6)


def test_nan_and_inf_rows_are_skipped_and_reported(files):
    mon = Monitor(files["autoencoder"])
    x = acts(6)
    x[1, 3], x[4, 0] = np.nan, np.inf
    indices, values = mon.encode(x)
    assert mon.skipped_rows.tolist() == [1, 4]
    assert (indices[[1, 4]] == -1).all() and np.isnan(values[[1, 4]]).all()
    assert (indices[[0, 2, 3, 5]] >= 0).all()
    clean_indices, _ = mon.encode(x[[0, 2, 3, 5]])
    np.testing.assert_array_equal(indices[[0, 2, 3, 5]], clean_indices)
    recon = mon.reconstruct(x)
    assert np.isnan(recon[1]).all() and np.isfinite(recon[0]).all()
    all_bad = np.full((2, M), np.nan, dtype=np.float32)
    assert (mon.encode(all_bad)[0] == -1).all()


def test_watch_and_scan_raise_alerts_at_thresholds(files):
    mon = Monitor(files["compact"])
    x = acts(12)
    indices, values = mon.encode(x)
    feature = int(indices[0, 0])
    threshold = float(np.median(values[indices == feature])) if (indices == feature).sum() > 1 else 0.0
    mon.watch({feature: threshold, int(indices[2, 1]): 0.0})
    alerts = mon.scan(x)
    expected = {(r, int(indices[r, s]), float(values[r, s])) for r in range(12) for s in range(K)
                if (indices[r, s] == feature and values[r, s] >= threshold)
                or (indices[r, s] == indices[2, 1] and values[r, s] >= 0.0)}
    assert {(a.row, a.feature, a.value) for a in alerts} == expected
    assert all(isinstance(a, Alert) for a in alerts) and alerts
    assert [a.row for a in alerts] == sorted(a.row for a in alerts)


def test_bad_inputs_are_clean_errors(files, tmp_path):
    mon = Monitor(files["encode"])
    with pytest.raises(SaeCompressError, match="hidden size|expects"):
        mon.encode(np.zeros((3, M + 1), dtype=np.float32))
    with pytest.raises(SaeCompressError, match="dtype"):
        mon.encode(np.ones((3, M), dtype=np.int32))
    with pytest.raises(SaeCompressError, match="no reconstruction output"):
        mon.reconstruct(acts(2))
    with pytest.raises(SaeCompressError, match="no features are watched"):
        mon.scan(acts(2))
    with pytest.raises(SaeCompressError, match="does not exist"):
        mon.watch({N: 1.0})
    with pytest.raises(SaeCompressError, match="finite"):
        mon.watch({1: float("nan")})
    corrupt = tmp_path / "bad.onnx"
    corrupt.write_bytes(files["encode"].read_bytes()[:1000])
    with pytest.raises(SaeCompressError, match="bad.onnx"):
        Monitor(corrupt)
    with pytest.raises(SaeCompressError, match="no such ONNX file"):
        Monitor(tmp_path / "missing.onnx")
    decode = export_onnx(files["compact"].__str__(), tmp_path / "dec.onnx", "decode")
    with pytest.raises(SaeCompressError, match="decode-only"):
        Monitor(decode)


def test_provider_choice():
    assert choose_providers(available=[CPU]) == [CPU]
    assert choose_providers(available=[CUDA, CPU]) == [CUDA, CPU]  # onnxruntime-gpu installed
    assert choose_providers([CPU], available=[CUDA, CPU]) == [CPU]
    with pytest.raises(SaeCompressError, match="onnxruntime-gpu"):
        choose_providers([CUDA], available=[CPU])


def test_requesting_cuda_without_it_is_a_clean_error(files):
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(SaeCompressError, match="CUDAExecutionProvider"):
        Monitor(files["encode"], providers=[CUDA])


def test_monitor_cli_on_npy_and_safetensors_files(files, tmp_path):
    x = acts(5)
    x[2, 0] = np.nan
    np.save(tmp_path / "acts.npy", x)
    save_file({"activations": x}, str(tmp_path / "acts.safetensors"))
    for name in ("acts.npy", "acts.safetensors"):
        result = CliRunner().invoke(cli, ["monitor", str(files["autoencoder"]), "--input",
                                          str(tmp_path / name), "--top", "3", "--jsonl"])
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert [line["row"] for line in lines] == [0, 1, 3, 4]
        assert all(len(line["features"]) == 3 for line in lines)
        assert '"skipped"' in result.stderr and CPU in result.stderr
    indices, values = Monitor(files["autoencoder"]).encode(x)
    assert lines[0]["features"][0][0] == int(indices[0, np.argmax(values[0])])


def test_monitor_cli_reads_a_stream_of_npy_arrays_on_stdin(files):
    x1, x2 = acts(3, seed=2), acts(4, seed=3)
    indices, values = Monitor(files["compact"]).encode(np.concatenate([x1, x2]))
    feature = int(indices[5, 0])
    buffer = io.BytesIO()
    for array in (x1, x2):
        np.save(buffer, array)
    stream = buffer.getvalue()
    result = subprocess.run([sys.executable, "-m", "saecompress", "monitor", str(files["compact"]),
                             "--input", "-", "--watch", f"{feature}:0", "--jsonl"],
                            input=stream, capture_output=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr.decode()
    alerts = [json.loads(line) for line in result.stdout.decode().splitlines()]
    want = [(r, float(values[r][indices[r] == feature][0])) for r in range(7) if feature in indices[r]]
    assert [a["row"] for a in alerts] == [row for row, _ in want]
    assert [a["value"] for a in alerts] == pytest.approx([value for _, value in want])
    assert {a["feature"] for a in alerts} == {feature}
    assert b"7 rows" in result.stderr
    garbage = subprocess.run([sys.executable, "-m", "saecompress", "monitor", str(files["compact"]),
                              "--input", "-"], input=b"not an npy", capture_output=True, timeout=120, cwd=ROOT)
    assert garbage.returncode == 2 and b"error: stdin" in garbage.stderr


def test_monitor_cli_bad_watch_and_wrong_width(files, tmp_path):
    np.save(tmp_path / "wide.npy", np.ones((2, M + 3), dtype=np.float32))
    result = CliRunner().invoke(cli, ["monitor", str(files["encode"]), "--input", str(tmp_path / "wide.npy")])
    assert result.exit_code == 2 and "expects" in result.output
    np.save(tmp_path / "ok.npy", acts(2))
    result = CliRunner().invoke(cli, ["monitor", str(files["encode"]), "--input", str(tmp_path / "ok.npy"),
                                      "--watch", "12:abc"])
    assert result.exit_code == 2 and "FEATURE:THRESHOLD" in result.output


@pytest.mark.parametrize("activation", ["signed_topk", "jumprelu"])
def test_torch_backend_gives_what_onnxruntime_gives(tmp_path, activation):
    """``Monitor(backend="torch")``: the SAE itself on torch, with the graphs' outputs (unfired slots -1 / 0, overflow)."""
    torch.manual_seed(3)
    threshold = torch.rand(96) * 0.3 if activation == "jumprelu" else None
    sae = ExpanderSAE(24, 96, 5, 6, activation=activation, encoder="untied", threshold=threshold)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
    save_compact(sae, tmp_path / "sae.safetensors")
    x = np.random.default_rng(4).standard_normal((70, 24)).astype(np.float32)
    x[5] = np.inf
    onnx_mon = Monitor(tmp_path / "sae.safetensors", batch_size=32)
    torch_mon = Monitor(tmp_path / "sae.safetensors", backend="torch", batch_size=32)
    assert torch_mon.provider == "torch:cpu" and (torch_mon.m, torch_mon.n, torch_mon.k) == (24, 96, 6)
    (i1, v1), (i2, v2) = onnx_mon.encode(x), torch_mon.encode(x)
    for row in range(70):
        assert dict(zip(i1[row], v1[row].round(4))) == pytest.approx(dict(zip(i2[row], v2[row].round(4))),
                                                                     abs=1e-3) or row == 5
    np.testing.assert_array_equal(torch_mon.skipped_rows, [5])
    np.testing.assert_array_equal(onnx_mon.overflow, torch_mon.overflow)
    if activation == "jumprelu":
        assert torch_mon.overflow.sum() > 0 and (i2 == -1).any()
    np.testing.assert_allclose(onnx_mon.reconstruct(x), torch_mon.reconstruct(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(SaeCompressError, match="not an ONNX graph"):
        Monitor(tmp_path / "x.onnx", backend="torch")
    with pytest.raises(SaeCompressError, match="device="):
        Monitor(tmp_path / "sae.safetensors", device="cpu")
    with pytest.raises(SaeCompressError, match="not a torch device"):
        Monitor(tmp_path / "sae.safetensors", backend="torch", device="nope")
