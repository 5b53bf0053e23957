"""The torch-free runtime (``saecompress[runtime]``): ``monitor`` on an .onnx file, ``info`` and ``pull`` run in a
process where torch cannot be imported, and never import it; commands that need torch say so in one line."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from saecompress.activations import ShardWriter
from saecompress.compact import save_compact
from saecompress.exporters.onnx import export_onnx
from saecompress.hub.push import push
from saecompress.models import ExpanderSAE
from saecompress.runtime import Monitor

M, N = 16, 64
# Run the CLI (or a snippet) with torch unimportable, then check it was never imported.
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
import atexit
atexit.register(lambda: print("torch imported" if "torch" in sys.modules else "torch never imported",
                              file=sys.stderr))
"""
CLI = NO_TORCH + "from saecompress.cli.main import main\nsys.argv[0] = 'saecompress'\nmain()\n"


def no_torch(args: list[str], env: dict | None = None, stdin: bytes | None = None, code: str = CLI):
    done = subprocess.run([sys.executable, "-c", code, *args], input=stdin, capture_output=True, timeout=120,
                          env=env)
    assert done.stderr.decode().rstrip().endswith("torch never imported"), done.stderr.decode()[-2000:]
    return done


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    sae = ExpanderSAE(M, N, 4, 4, activation="jumprelu", encoder="untied", threshold=torch.rand(N) * 0.1)
    with torch.no_grad():
        sae.b_dec.normal_()
    save_compact(sae, tmp_path / "sae.safetensors", dtype="bfloat16")
    export_onnx(tmp_path / "sae.safetensors", tmp_path / "sae.onnx", graph="autoencoder")
    x = np.random.default_rng(0).standard_normal((40, M)).astype(np.float32)
    x[3] = np.nan
    np.save(tmp_path / "acts.npy", x)
    with ShardWriter(tmp_path / "shards", M, dtype="bfloat16", shard_rows=16) as writer:
        writer.add(torch.from_numpy(np.nan_to_num(x)))
        writer.close()
    return tmp_path, x


def test_monitor_on_an_onnx_file_without_torch(files):
    folder, x = files
    with_torch = Monitor(folder / "sae.onnx").encode(x)
    done = no_torch(["monitor", str(folder / "sae.onnx"), "--input", str(folder / "acts.npy"), "--jsonl"])
    assert done.returncode == 0, done.stderr.decode()
    rows = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert len(rows) == 39  # the NaN row is skipped and counted
    assert rows[0]["features"] and all(row["row"] != 3 for row in rows)
    stream = io.BytesIO()
    for chunk in (x[:20], x[20:]):
        np.save(stream, chunk)
    piped = no_torch(["monitor", str(folder / "sae.onnx"), "--input", "-", "--jsonl"], stdin=stream.getvalue())
    assert piped.returncode == 0 and piped.stdout == done.stdout
    shards = no_torch(["monitor", str(folder / "sae.onnx"), "--input", str(folder / "shards"), "--top", "3"])
    assert shards.returncode == 0, shards.stderr.decode()
    code = NO_TORCH + f"""
import numpy as np
from saecompress import Monitor
values, indices = Monitor({str(folder / 'sae.onnx')!r}).encode(np.load({str(folder / 'acts.npy')!r}))
np.save(sys.stdout.buffer, indices)
"""
    library = no_torch([], code=code)
    assert library.returncode == 0, library.stderr.decode()
    np.testing.assert_array_equal(np.load(io.BytesIO(library.stdout)), with_torch[1])


def test_info_and_pull_without_torch(files, hub, tmp_path):
    folder, _ = files
    done = no_torch(["info", str(folder / "sae.safetensors"), "--json"])
    assert done.returncode == 0, done.stderr.decode()
    facts = json.loads(done.stdout)["hookpoints"][0]
    assert facts["dtype"] == "bfloat16" and facts["activation"] == "jumprelu" and facts["threshold_max"] > 0
    (folder / "up" / "layers.1").mkdir(parents=True)
    (folder / "up" / "layers.1" / "sae.safetensors").write_bytes((folder / "sae.safetensors").read_bytes())
    push(folder / "up", "alice/runtime", endpoint=hub.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_XET": "1"}
    pulled = no_torch(["pull", "alice/runtime/layers.1", "--local-dir", str(tmp_path / "dl")], env=env)
    assert pulled.returncode == 0, pulled.stderr.decode()
    path = tmp_path / "dl" / "layers.1" / "expander.safetensors"
    assert pulled.stdout.decode().split() == [str(path)]
    assert path.read_bytes() == (folder / "sae.safetensors").read_bytes()
    (folder / "bad.safetensors").write_bytes(path.read_bytes()[:-8])  # truncated: the numpy checks see it
    bad = no_torch(["info", str(folder / "bad.safetensors")])
    assert bad.returncode == 2 and bad.stderr.decode().startswith("error: ")


def test_a_command_that_needs_torch_says_so(files):
    folder, _ = files
    for args in (["train", "--acts", str(folder / "acts.npy"), "--out", str(folder / "x.safetensors")],
                 ["monitor", str(folder / "sae.safetensors"), "--input", str(folder / "acts.npy")]):
        done = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, timeout=120)
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 2 and lines[0].startswith("error: this command needs torch"), lines
        assert "saecompress[cpu]" in lines[0] and "Traceback" not in done.stderr.decode()
