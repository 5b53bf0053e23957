"""The core/edge split: an acyclic import graph, no reaching into private names, one metrics record."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub import hf_hub_download
from hub_server import HubServer

import saecompress
from saecompress.cli.main import cli
from saecompress.compact import read_compact_metadata
from saecompress.errors import SaeCompressError, first_line

PACKAGE = Path(saecompress.__file__).parent
REAL_ACTS = Path(__file__).parent / "fixtures" / "smollm2-l15-new-testament-512.safetensors"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their own name)."""
    found = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def imports(name: str, file: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` of every import in ``file``, module- or function-level, inside the package."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            names = [alias.name for alias in node.names]
            found += [(f"{base}.{n}", []) for n in names if f"{base}.{n}" in known]
            found.append((base, [n for n in names if f"{base}.{n}" not in known]))
    return [(module, names) for module, names in found if module in known]


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {module for module, _ in imports(name, file, known)} - {name} for name, file in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [node, dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"saecompress.errors", "saecompress._lazy"} <= graph["saecompress"], "the graph reader missed imports"
    assert {"saecompress.compact_format", "saecompress.arrays"} <= graph["saecompress.sources"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# Underscore modules that are package-wide helpers by design (the underscore keeps them out of the API).
SHARED_HELPERS = {"saecompress._io", "saecompress._json", "saecompress._version"}


def test_no_module_imports_another_modules_private_name():
    """No ``from x import _name``; a private module only from its own package (or a shared helper)."""
    known = modules()
    reached = []
    for name, file in known.items():
        for module, names in imports(name, file, known):
            reached += [f"{name} imports {module}.{n}" for n in names
                        if module != name and n.startswith("_") and not n.startswith("__")]
            private = module.rpartition(".")[2].startswith("_")
            if private and module not in SHARED_HELPERS and module.rpartition(".")[0] not in (name, name.rpartition(".")[0]):
                reached.append(f"{name} imports {module}")
    assert not reached, "\n".join(reached)


def test_first_line_of_an_error():
    assert first_line(ValueError("\n  bad header  \nmore")) == "bad header"
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(OSError()) == "OSError"


def test_monitor_reports_an_onnxruntime_error_with_an_empty_message(tmp_path, monkeypatch):
    """onnxruntime may raise with an empty message: one SaeCompressError naming the type, not an IndexError."""
    import onnxruntime

    from saecompress.runtime import Monitor

    def refuse(*args, **kwargs):
        raise RuntimeError("")

    model = tmp_path / "m.onnx"
    model.write_bytes(b"not onnx")
    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    with pytest.raises(SaeCompressError, match=r"onnxruntime cannot load this model \(RuntimeError\)"):
        Monitor(model)


def test_the_model_card_shows_the_metrics_convert_writes(isolated_hf, tmp_path):
    """A file made by `convert --acts` carries one `metrics` record, and its pushed model card shows it."""
    from saecompress.demo import DEFAULT_SAE

    out = tmp_path / "sae.safetensors"
    runner = CliRunner()
    done = runner.invoke(cli, ["convert", str(DEFAULT_SAE), str(out), "--acts", str(REAL_ACTS), "--json"])
    assert done.exit_code == 0, done.output
    [report] = json.loads(done.stdout)["hookpoints"]
    record = read_compact_metadata(out)["user"]["metrics"]
    assert record["fvu"] == report["fvu"] and record["l0"] == report["l0"] and record["num_rows"] == 512
    with HubServer(tmp_path / "server") as server:
        pushed = runner.invoke(cli, ["push", "alice/converted", str(out), "--endpoint", server.url])
        assert pushed.exit_code == 0, pushed.output
        card = Path(hf_hub_download("alice/converted", "README.md", endpoint=server.url)).read_text()
    header = next(line for line in card.splitlines() if line.startswith("| hookpoint | file"))
    row = next(line for line in card.splitlines() if "expander.safetensors" in line and line.startswith("| `"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert float(cells["fvu"]) == pytest.approx(report["fvu"], rel=1e-3)
    assert float(cells["l0"]) == pytest.approx(report["l0"], rel=1e-3)
    assert np.isfinite(float(cells["dead_fraction"]))


def random_expander(m: int = 16, n: int = 64, d: int = 4, *, untied: bool = True):
    import torch

    from saecompress.models import ExpanderSAE

    torch.manual_seed(0)
    sae = ExpanderSAE(m, n, d, k=4, seed=3, encoder="untied" if untied else "tied")
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return sae


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_stored_copy_is_what_a_file_gives_back(tmp_path, dtype):
    """Fidelity at the stored precision is measured in memory, bit-identical to a save and reload."""
    import torch

    from saecompress.compact import load_compact, save_compact, stored_copy

    sae = random_expander()
    copy = stored_copy(sae, dtype)
    loaded = load_compact(save_compact(sae, tmp_path / "s.safetensors", dtype=dtype))
    for name, value in loaded.state_dict().items():
        assert torch.equal(copy.state_dict()[name], value), name
    assert (dtype == "float32") == torch.equal(copy.values, sae.values)


def test_atomic_directory(tmp_path):
    from saecompress._io import AtomicDirectory

    out = tmp_path / "out"
    with pytest.raises(RuntimeError), AtomicDirectory(out) as staging:
        (staging / "a").write_text("partial")
        raise RuntimeError("stop")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with AtomicDirectory(out) as staging:
        (staging / "a").write_text("1")
        assert not out.exists()
    assert (out / "a").read_text() == "1" and (out.stat().st_mode & 0o777) == 0o777 & ~current_umask()
    (out / "keep").write_text("mine")
    with AtomicDirectory(out, merge=True) as staging:
        (staging / "a").write_text("2")
    assert (out / "a").read_text() == "2" and (out / "keep").read_text() == "mine"
    with AtomicDirectory(out) as staging:
        (staging / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_choices_and_sizes_have_one_spelling():
    from saecompress.errors import check_choice
    from saecompress.units import human_bytes

    check_choice("mask", "topd", ("expander", "topd"))
    with pytest.raises(SaeCompressError, match=r"^unknown mask 'x'; use one of expander, topd$"):
        check_choice("mask", "x", ("expander", "topd"))
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**20, 3 * 2**40)] == \
        ["0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3072.0 GiB"]


def test_compression_ratio_means_one_thing(tmp_path):
    """convert's report, info and the model card compare the file with the dense float32 SAE;
    ``source_ratio`` compares it with the source's bytes."""
    from saecompress.compact import dense_values
    from saecompress.convert import convert_path
    from saecompress.demo import DEFAULT_SAE
    from saecompress.info import describe

    out = tmp_path / "sae.safetensors"
    [report] = convert_path(DEFAULT_SAE, out, progress=False)
    [facts] = describe(out)
    size = out.stat().st_size
    assert report.compression_ratio == pytest.approx(4 * dense_values(report.m, report.n) / size)
    assert facts["compression_ratio"] == pytest.approx(report.compression_ratio, abs=0.01)
    assert report.source_ratio == pytest.approx(report.source_bytes / size)


def test_text_input_has_a_library_home(tmp_path):
    from saecompress.texts import read_texts, text_files

    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_bytes(b"first \xff")
    (tmp_path / ".hidden").write_text("no")
    files = text_files([str(tmp_path)])
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    assert list(read_texts(files)) == ["first \ufffd", "second"]
    with pytest.raises(SaeCompressError, match="no such text file"):
        text_files([str(tmp_path / "missing.txt")])


def test_batch_means_contexts_and_batch_size_rows(tmp_path):
    """``--batch`` counts contexts wherever it is shown; rows per step are ``--batch-size`` (train keeps
    ``--batch`` as a hidden older name and refuses both at once)."""
    import re

    from saecompress.activations import write_activations

    runner = CliRunner()
    for command in ("acts", "eval", "finetune", "train", "monitor"):
        text = runner.invoke(cli, [command, "--help"], terminal_width=200).output
        if "--batch " in text:
            assert re.search(r"--batch INTEGER RANGE\s+Contexts", text), command
    assert "--batch-size" in runner.invoke(cli, ["train", "--help"]).output
    acts = write_activations(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32))
    both = runner.invoke(cli, ["train", "--acts", str(acts), "--out", str(tmp_path / "o.safetensors"), "--n", "16",
                               "--batch", "8", "--batch-size", "16"])
    assert both.exit_code == 2 and "--batch is the older name of --batch-size" in both.output
    assert not (tmp_path / "o.safetensors").exists()


def test_train_writes_the_metrics_record_the_card_reads(tmp_path):
    from saecompress.activations import write_activations
    from saecompress.hub.card import metrics
    from saecompress.train import TrainConfig, train

    rows = np.random.default_rng(1).normal(size=(600, 8)).astype(np.float32)
    acts = write_activations(tmp_path / "a.npy", rows)
    out = tmp_path / "sae.safetensors"
    _, result = train(acts, out, TrainConfig(d=3, n=16, k=2, tokens=512, batch_size=128, held_out_rows=88),
                      progress=False)
    meta = read_compact_metadata(out)
    assert meta["user"]["metrics"]["fvu"] == result["held_out"]["fvu"]
    assert metrics(meta) == {k: v for k, v in sorted(result["held_out"].items())}


def test_the_onnx_builder_takes_models_only(tmp_path):
    from saecompress.exporters.onnx import build_onnx

    with pytest.raises(SaeCompressError, match="takes an ExpanderSAE or TopKSAE"):
        build_onnx(str(tmp_path / "sae.safetensors"))
