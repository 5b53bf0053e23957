"""Compact format v1: bit-exact round trips, size bound, canonical bytes, bad files, the info CLI."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from saecompress import ExpanderSAE, SaeCompressError, convert, load, load_compact, read_compact_metadata, save_compact
from saecompress.cli.main import cli
from saecompress.compact import STORAGE_DTYPES, compact_size_bound, quantize_int8
from saecompress.formats import read_sae
from saecompress.sources import load_source, save


def random_sae(encoder="tied", m=40, n=300, d=6, k=9, seed=4, **kw) -> ExpanderSAE:
    sae = ExpanderSAE(m, n, d, k, seed=seed, encoder=encoder, **kw)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


@pytest.mark.parametrize("encoder", ["tied", "untied"])
def test_float32_round_trip_is_bit_exact(tmp_path, encoder):
    sae = random_sae(encoder, activation="topk_relu", normalize_input=True)
    source = {"library": "test", "hookpoint": "layers.3"}
    path = save_compact(sae, tmp_path / "a.safetensors", metadata={"fvu": 0.123}, source=source)
    loaded = load_compact(path)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert (loaded.activation, loaded.encoder, loaded.normalize_input) == ("topk_relu", encoder, True)
    meta = read_compact_metadata(path)
    assert loaded.mask_seed == 4 and meta["source"] == source
    assert meta["user"] == {"fvu": 0.123}
    save_compact(loaded, tmp_path / "b.safetensors", metadata=meta["user"], source=meta["source"])
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jumprelu_threshold_round_trips_bit_exactly_in_float32(tmp_path, dtype):
    threshold = torch.rand(300, generator=torch.Generator().manual_seed(1)) + 1 / 3  # not a bf16 number
    sae = random_sae("untied", k=300, activation="jumprelu", threshold=threshold)
    assert sae.threshold.dtype == torch.float32 and sae.to(torch.bfloat16).threshold.dtype == torch.float32
    path = save_compact(sae, tmp_path / "a.safetensors", dtype=dtype)
    loaded = load_compact(path)
    assert loaded.activation == "jumprelu" and loaded.threshold.dtype == torch.float32
    assert torch.equal(loaded.threshold, threshold)
    save_compact(loaded, tmp_path / "b.safetensors", dtype=dtype)
    assert path.read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    x = torch.randn(50, 40)
    fired = (loaded.encode(x, dense=True) != 0).sum(-1)
    assert 0 < int(fired.max()) <= loaded.k and int(fired.min()) < int(fired.max())  # a varying L0


def test_nan_threshold_is_refused(tmp_path):
    sae = random_sae(activation="jumprelu", threshold=torch.ones(300))
    path = save_compact(sae, tmp_path / "a.safetensors")
    bad = _rewrite(path, tmp_path / "bad.safetensors", tensors={"threshold": torch.full((300,), float("nan"))})
    result = CliRunner().invoke(cli, ["info", str(bad)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "threshold contains NaN" in result.output


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_every_dtype_round_trips_bit_exactly_and_within_the_size_bound(tmp_path, dtype):
    sae = random_sae("tied", m=64, n=2000, d=7)
    first = save_compact(sae, tmp_path / "a.safetensors", dtype=dtype)
    loaded = load_compact(first)
    assert read_compact_metadata(first)["dtype"] == dtype
    second = save_compact(loaded, tmp_path / "b.safetensors", dtype=dtype)
    assert first.read_bytes() == second.read_bytes()
    assert first.stat().st_size <= compact_size_bound(2000, 64, 7, dtype)
    rel = (loaded.values - sae.values).norm() / sae.values.norm()
    assert rel < {"float32": 1e-12, "float16": 1e-3, "bfloat16": 8e-3, "int8": 1e-2}[dtype]


def test_models_carry_no_file_state(tmp_path, dense_io):
    """Where a model came from and how a file stores it travel beside it (``sources.Loaded``), never on it."""
    path = save_compact(random_sae(), tmp_path / "s.safetensors", dtype="bfloat16", metadata={"fvu": 0.5},
                        source={"library": "test"})
    folder = dense_io.write_saelens(tmp_path / "dense", dense_io.weights(), dtype=torch.bfloat16)
    dense, provenance = read_sae(folder)
    compact = load_source(path)
    for model in (load_compact(path), compact.model, dense, load(folder), convert(dense, 3), random_sae().to_dense()):
        assert not [name for name in ("provenance", "metadata", "storage_dtype") if hasattr(model, name)], model
    assert (compact.storage_dtype, compact.user, compact.provenance) == ("bfloat16", {"fvu": 0.5}, {"library": "test"})
    assert provenance["library"] == "saelens" and provenance["source_dtype"] == "bfloat16"
    assert load_source(folder).provenance == provenance


def test_a_model_made_from_a_source_is_written_with_its_facts(tmp_path, dense_io):
    """``sources.save`` (train --init, finetune) keeps the origin's storage dtype and records its source."""
    src = save_compact(random_sae(), tmp_path / "a.safetensors", dtype="bfloat16",
                       source={"library": "test", "path": str(tmp_path / "private")})
    origin = load_source(src)
    meta = read_compact_metadata(save(origin.model, tmp_path / "b.safetensors", {"x": 1}, origin))
    assert (meta["dtype"], meta["source"], meta["user"]) == ("bfloat16", {"library": "test", "file": "private"}, {"x": 1})
    assert read_compact_metadata(save(origin.model, tmp_path / "c.safetensors", {}))["dtype"] == "float32"
    dense = load_source(dense_io.write_saelens(tmp_path / "dense", dense_io.weights()))
    cfg = (save(dense.model, tmp_path / "out", {"y": 2}, dense) / "cfg.json").read_text()
    assert str(tmp_path) not in cfg
    written = json.loads(cfg)["metadata"]
    assert (written["saecompress"], written["library"], written["file"]) == ({"y": 2}, "saelens", "dense")


def test_int8_quantisation_is_idempotent():
    values = torch.randn(500, 7) * torch.rand(500, 1) * 10
    q, scale = quantize_int8(values)
    q2, scale2 = quantize_int8(q.float() * scale[:, None])
    assert torch.equal(q, q2) and torch.equal(scale, scale2)
    assert int(q.abs().max()) == 127


def test_explicit_indices_are_stored_and_checked(tmp_path):
    gen = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(50, generator=gen)[:4] for _ in range(120)])
    sae = ExpanderSAE(50, 120, 4, 5, indices=indices)
    path = save_compact(sae, tmp_path / "x.safetensors")
    loaded = load_compact(path)
    assert loaded.mask_seed is None and torch.equal(loaded.indices, indices)
    assert read_compact_metadata(path)["mask"] == "explicit"


def test_seed_file_stores_no_indices(tmp_path):
    path = save_compact(random_sae(), tmp_path / "s.safetensors")
    header = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert set(header) == {"__metadata__", "values", "b_enc", "b_dec"}


def _rewrite(path: Path, out: Path, *, meta=None, tensors=None, drop=()):
    """Re-save a compact file with edited metadata/tensors (what a lying file looks like)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    metadata.update(meta or {})
    data.update(tensors or {})
    save_file(data, str(out), metadata=metadata)
    return out


@pytest.fixture
def good_file(tmp_path):
    return save_compact(random_sae(), tmp_path / "good.safetensors")


BAD_CASES = {
    "truncated": (lambda p, o: o.write_bytes(p.read_bytes()[:-100]) and o, "truncated or corrupt"),
    "not safetensors": (lambda p, o: o.write_bytes(b"hello world, not a tensor file") and o, "not a readable safetensors"),
    "other format": (lambda p, o: _rewrite(p, o, meta={"format": "other"}), "not a compact saecompress file"),
    "future version": (lambda p, o: _rewrite(p, o, meta={"format_version": "2"}), "unknown format version"),
    "shape lie": (lambda p, o: _rewrite(p, o, meta={"n": "301"}), "metadata says"),
    "hash mismatch": (lambda p, o: _rewrite(p, o, meta={"mask_seed": "5"}), "hash mismatch"),
    "nan values": (lambda p, o: _rewrite(p, o, tensors={"values": torch.full((300, 6), float("nan"))}), "NaN"),
    "missing tensor": (lambda p, o: _rewrite(p, o, drop=("b_dec",)), "missing b_dec"),
    "wrong dtype": (lambda p, o: _rewrite(p, o, tensors={"b_enc": torch.zeros(300, dtype=torch.float64)}), "metadata says"),
    "unknown activation": (lambda p, o: _rewrite(p, o, meta={"activation": "gated"}), "unknown activation 'gated'"),
    "jumprelu without threshold": (lambda p, o: _rewrite(p, o, meta={"activation": "jumprelu"}), "missing threshold"),
    "threshold of a top-k file": (lambda p, o: _rewrite(p, o, tensors={"threshold": torch.ones(300)}),
                                  "unexpected threshold"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_files_fail_with_one_clear_line(tmp_path, good_file, case):
    make, message = BAD_CASES[case]
    bad = make(good_file, tmp_path / "bad.safetensors")
    with pytest.raises(SaeCompressError, match=message) as err:
        load_compact(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    result = CliRunner().invoke(cli, ["info", str(bad)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "Traceback" not in result.output


def test_failed_save_leaves_no_partial_file(tmp_path):
    sae = random_sae()
    with torch.no_grad():
        sae.values[0, 0] = float("inf")
    with pytest.raises(SaeCompressError, match="NaN or Inf"):
        save_compact(sae, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_info_cli_reports_sizes(tmp_path):
    path = save_compact(random_sae(m=2048, n=4096, d=7, k=32), tmp_path / "s.safetensors")
    result = CliRunner().invoke(cli, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    [facts] = json.loads(result.output)["hookpoints"]
    for key in ("m", "n", "d", "k", "activation", "dtype", "mask_seed", "file_bytes", "learned_values",
                "dense_values", "compression_ratio"):
        assert key in facts
    assert facts["learned_values"] == 4096 * 7 + 4096 + 2048
    assert facts["dense_values"] == 2 * 2048 * 4096 + 2048 + 4096
    assert facts["file_bytes"] == path.stat().st_size
    assert facts["compression_ratio"] == pytest.approx(4 * facts["dense_values"] / facts["file_bytes"], rel=1e-3)
    assert facts["compression_ratio"] > 200
    table = CliRunner().invoke(cli, ["info", str(path)])
    assert "expander-v1 seed 4" in table.output and "compression" in table.output


def test_console_script_help_version_and_debug(tmp_path):
    exe = [sys.executable, "-m", "saecompress"]
    assert "Commands" in subprocess.run(exe + ["--help"], capture_output=True, text=True, check=True).stdout
    assert "saecompress" in subprocess.run(exe + ["--version"], capture_output=True, text=True, check=True).stdout
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    plain = subprocess.run(exe + ["info", str(bad)], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run(exe + ["--debug", "info", str(bad)], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_a_dense_sae_stored_at_a_dtype_and_its_bytes(tmp_path, dtype):
    """``stored_copy`` of a TopKSAE keeps each latent's W_dec row and W_enc column as the compact scheme does
    (int8: within half a step of a float64 per-latent scale); ``dense_bytes`` is its weights' payload."""
    from saecompress.compact import dense_bytes, stored_copy
    from saecompress.models import TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(12, 40, 3)
    with torch.no_grad():
        sae.W_enc.mul_(torch.rand(40) * 5)  # per-latent scales that differ
    stored = stored_copy(sae, dtype)
    for original, kept in ((sae.W_dec.double(), stored.W_dec.double()), (sae.W_enc.T.double(), stored.W_enc.T.double())):
        step = original.abs().amax(1, keepdim=True) / 127
        if dtype == "int8":
            assert bool(((kept - original).abs() <= step * 0.5 * (1 + 1e-4)).all())
        else:
            assert torch.equal(kept, original.to(getattr(torch, dtype)).double())
    assert torch.equal(stored.b_enc, sae.b_enc) and torch.equal(stored.b_dec, sae.b_dec)
    assert (dtype == "float32") == torch.equal(stored.W_dec, sae.W_dec)
    save(stored, tmp_path / "dense", {})
    weights = tmp_path / "dense" / "sae_weights.safetensors"
    header = struct.unpack("<Q", weights.read_bytes()[:8])[0]
    payload = weights.stat().st_size - 8 - header  # float32 tensors W_enc, W_dec, b_enc, b_dec
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}[dtype]
    assert dense_bytes(12, 40, "float32") == payload
    assert dense_bytes(12, 40, dtype) == payload - 2 * 12 * 40 * (4 - itemsize) + (2 * 4 * 40 if dtype == "int8" else 0)
