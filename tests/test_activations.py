"""Activation files: formats, streaming, shuffling, splits, writers and bad input."""

import json
import struct

import numpy as np
import pytest
import torch

from saecompress.activations import ShardWriter, open_activations, write_activations
from saecompress.errors import SaeCompressError


def rows_with_ids(n: int, m: int = 8, seed: int = 0) -> np.ndarray:
    """Random rows whose column 0 is the row id (exact in float32)."""
    x = np.random.default_rng(seed).standard_normal((n, m)).astype(np.float32)
    x[:, 0] = np.arange(n)
    return x


@pytest.mark.parametrize("suffix,dtype", [(".npy", torch.float16), (".npy", torch.float32), (".npy", torch.float64),
                                          (".safetensors", torch.float16), (".safetensors", torch.bfloat16),
                                          (".safetensors", torch.float32)])
def test_single_file_roundtrip(tmp_path, suffix, dtype):
    x = torch.randn(37, 5).to(dtype)
    path = write_activations(tmp_path / f"a{suffix}", x)
    src = open_activations(path)
    assert (src.m, src.num_rows) == (5, 37)
    got = torch.cat(list(src.iter_batches(10)))
    assert got.dtype == torch.float32
    assert torch.equal(got, x.float())


def test_safetensors_from_safetensors_library_any_tensor_name(tmp_path):
    from safetensors.numpy import save_file

    x = np.random.default_rng(1).standard_normal((20, 6)).astype(np.float32)
    save_file({"resid": x.astype(np.float64)}, str(tmp_path / "one.safetensors"))
    assert np.array_equal(open_activations(tmp_path / "one.safetensors").read(0, 20).numpy(), x)
    save_file({"activations": x, "other": x[:2]}, str(tmp_path / "two.safetensors"))
    assert np.array_equal(open_activations(tmp_path / "two.safetensors").read(3, 7).numpy(), x[3:7])


def test_directory_without_manifest_reads_shards_in_name_order(tmp_path):
    x = rows_with_ids(100)
    np.save(tmp_path / "b.npy", x[60:])
    write_activations(tmp_path / "a.safetensors", torch.from_numpy(x[:60]))
    src = open_activations(tmp_path)
    assert src.num_rows == 100 and src.manifest == {}
    assert np.array_equal(torch.cat(list(src.iter_batches(7))).numpy(), x)
    # reads crossing the shard boundary
    assert np.array_equal(src.read(55, 65).numpy(), x[55:65])


def test_shard_writer_manifest_and_views(tmp_path):
    x = rows_with_ids(1000)
    with ShardWriter(tmp_path / "acts", 8, shard_rows=300) as w:
        for piece in np.array_split(x, 7):
            w.add(torch.from_numpy(piece))
        w.close({"layer": 3, "site": "resid"})
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [300, 300, 300, 100]
    assert manifest["num_rows"] == 1000 and manifest["m"] == 8 and manifest["layer"] == 3
    src = open_activations(tmp_path / "acts")
    assert src.manifest["site"] == "resid"
    assert np.array_equal(src.read(0, 1000).numpy(), x)
    train, held = src.split(250)
    assert (train.num_rows, held.num_rows) == (750, 250)
    assert np.array_equal(held.read(0, 250).numpy(), x[750:])
    ids = torch.cat(list(train.iter_batches(64, shuffle=True)))[:, 0].int().tolist()
    assert sorted(ids) == list(range(750))  # the training view never yields held-out rows
    with pytest.raises(SaeCompressError):
        src.split(1000)


def test_shard_writer_is_atomic(tmp_path):
    out = tmp_path / "acts"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, 4, shard_rows=10) as w:
            w.add(torch.randn(35, 4))  # three shards written to the temporary folder
            raise RuntimeError("interrupted")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with ShardWriter(out, 4) as w:
        w.add(torch.randn(5, 4))
        w.close()
    with pytest.raises(SaeCompressError, match="already exists"):
        ShardWriter(out, 4)
    with ShardWriter(out, 4, overwrite=True) as w:
        w.add(torch.randn(9, 4))
        w.close()
    assert open_activations(out).num_rows == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts"]


@pytest.mark.parametrize("n,batch,buffer,chunk", [(1000, 64, 256, 50), (1003, 100, 200, 1024), (997, 33, 100, 7),
                                                 (2000, 128, None, 1024), (5, 2, 4, 1)])
def test_shuffle_visits_every_row_exactly_once(tmp_path, n, batch, buffer, chunk):
    x = rows_with_ids(n)
    with ShardWriter(tmp_path / "acts", 8, shard_rows=333) as w:
        w.add(torch.from_numpy(x))
        w.close()
    src = open_activations(tmp_path / "acts")
    epoch = list(src.iter_batches(batch, shuffle=True, seed=3, buffer_rows=buffer, chunk_rows=chunk))
    assert all(len(b) == batch for b in epoch[:-1]) and 0 < len(epoch[-1]) <= batch
    got = torch.cat(epoch).numpy()
    order = got[:, 0].astype(int)
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(got, x[order])  # rows stay intact
    if n > 10:
        assert order.tolist() != list(range(n))
        again = torch.cat(list(src.iter_batches(batch, shuffle=True, seed=3, buffer_rows=buffer, chunk_rows=chunk)))
        other = torch.cat(list(src.iter_batches(batch, shuffle=True, seed=4, buffer_rows=buffer, chunk_rows=chunk)))
        assert torch.equal(again, torch.from_numpy(got))
        assert not torch.equal(other, torch.from_numpy(got))
    full = list(src.iter_batches(batch, shuffle=True, drop_last=True, buffer_rows=buffer, chunk_rows=chunk))
    assert all(len(b) == batch for b in full) and sum(map(len, full)) == n // batch * batch


def test_shuffle_mixes_across_the_dataset(tmp_path):
    n = 4096
    write_activations(tmp_path / "a.npy", torch.from_numpy(rows_with_ids(n)))
    first = next(open_activations(tmp_path / "a.npy").iter_batches(256, shuffle=True, buffer_rows=1024, chunk_rows=64))
    ids = first[:, 0]
    # the first batch draws from many chunks spread over the whole file, not one contiguous stretch
    assert len(set((ids // 64).int().tolist())) >= 8
    assert float(ids.max() - ids.min()) > n / 2


def test_nan_rows_are_rejected_with_file_and_row(tmp_path):
    x = rows_with_ids(50)
    x[17, 3] = np.nan
    np.save(tmp_path / "bad.npy", x)
    src = open_activations(tmp_path / "bad.npy")
    assert np.array_equal(src.read(0, 17).numpy(), x[:17])  # rows before are fine
    with pytest.raises(SaeCompressError, match=r"bad\.npy: row 17 contains NaN"):
        list(src.iter_batches(8))
    with pytest.raises(SaeCompressError, match="row 17"):
        src.check()


def test_bad_files(tmp_path):
    good = write_activations(tmp_path / "good.safetensors", torch.randn(64, 8))
    data = good.read_bytes()

    (tmp_path / "trunc.safetensors").write_bytes(data[:-100])
    with pytest.raises(SaeCompressError, match="truncated"):
        open_activations(tmp_path / "trunc.safetensors")

    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(SaeCompressError, match="garbage.safetensors"):
        open_activations(tmp_path / "garbage.safetensors")

    np.save(tmp_path / "good.npy", np.ones((64, 8), np.float32))
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:200])
    with pytest.raises(SaeCompressError, match="trunc.npy"):
        open_activations(tmp_path / "trunc.npy")

    np.save(tmp_path / "scalar.npy", np.float32(1.0))
    with pytest.raises(SaeCompressError, match=r"\[\.\.\., m\]"):
        open_activations(tmp_path / "scalar.npy")

    np.save(tmp_path / "ints.npy", np.ones((4, 4), np.int32))
    with pytest.raises(SaeCompressError, match="not floating point"):
        open_activations(tmp_path / "ints.npy")

    header = json.dumps({"activations": {"dtype": "I32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "ints.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(SaeCompressError, match="dtype I32"):
        open_activations(tmp_path / "ints.safetensors")

    (tmp_path / "acts.txt").write_text("1 2 3")
    with pytest.raises(SaeCompressError, match="unknown activation file type"):
        open_activations(tmp_path / "acts.txt")

    with pytest.raises(SaeCompressError, match="no such"):
        open_activations(tmp_path / "missing.npy")


def test_bad_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaeCompressError, match="no activation shards"):
        open_activations(tmp_path / "empty")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.ones((3, 4), np.float32))
    np.save(mixed / "b.npy", np.ones((3, 5), np.float32))
    with pytest.raises(SaeCompressError, match="different widths"):
        open_activations(mixed)

    with ShardWriter(tmp_path / "acts", 4, shard_rows=10) as w:
        w.add(torch.randn(25, 4))
        w.close()
    (tmp_path / "acts" / "shard-00001.safetensors").unlink()
    with pytest.raises(SaeCompressError, match="shard-00001.safetensors.*missing"):
        open_activations(tmp_path / "acts")

    manifest = tmp_path / "acts" / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(SaeCompressError, match="unreadable manifest"):
        open_activations(tmp_path / "acts")


def test_manifest_row_count_mismatch(tmp_path):
    with ShardWriter(tmp_path / "acts", 4, shard_rows=10) as w:
        w.add(torch.randn(15, 4))
        w.close()
    write_activations(tmp_path / "acts" / "shard-00001.safetensors", torch.randn(3, 4))
    with pytest.raises(SaeCompressError, match="has 3 rows but manifest.json says 5"):
        open_activations(tmp_path / "acts")
