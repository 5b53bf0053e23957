"""Training from a live LM (``train --model``): the same model as ``acts`` + ``train --acts`` on the same rows, bit for
bit; several hookpoints from one pass, laid out as ``push`` uploads; ``--resume``; what is refused."""

import json

import pytest
import torch
from click.testing import CliRunner

from saecompress.cli.main import cli
from saecompress.compact import load_compact, read_compact_metadata
from saecompress.errors import SaeCompressError
from saecompress.lm import harvest, load_model, token_contexts
from saecompress.launch import run_ranks
from saecompress.stream import StreamConfig, train_from_files, train_streaming, window_rows
from saecompress.train import TrainConfig, train

CONTEXT, LM_BATCH, WINDOW = 32, 4, 16


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"d": 4, "n": 96, "k": 6, "batch_size": 64, "tokens": 64 * 6, "held_out_rows": 0,
                          "checkpoint_every": 4, **kw})


def stream(**kw) -> StreamConfig:
    return StreamConfig(**{"layers": (1,), "context": CONTEXT, "lm_batch": LM_BATCH, "window": WINDOW,
                           "held_out": 0, **kw})


def model_of(path):
    loaded = load_compact(path)
    return loaded[0] if isinstance(loaded, tuple) else loaded


def test_streaming_trains_what_harvest_then_train_trains(tiny_llama, tiny_lm, tmp_path, one_thread):
    model, tokenizer = load_model(tiny_llama)
    texts = tiny_lm.texts(n_docs=20)
    first = list(token_contexts(tokenizer, texts, CONTEXT))[:WINDOW]
    rows = window_rows(model, first, stream())[0].shape[0]  # the first window's kept rows
    assert rows >= 6 * 64
    harvest(model, tokenizer, texts, 1, tokens=rows, out=tmp_path / "acts", context=CONTEXT, batch=LM_BATCH,
            progress=False)
    from_file, _ = train(tmp_path / "acts", tmp_path / "file.safetensors", cfg(), progress=False)
    results = train_streaming(model, tokenizer, texts, tmp_path / "live", cfg(), stream(), progress=False)
    from_stream = model_of(tmp_path / "live" / "blocks.1.hook_resid_post" / "expander.safetensors")
    for name, value in from_file.state_dict().items():
        assert torch.equal(value, from_stream.state_dict()[name]), name
    assert results["blocks.1.hook_resid_post"]["training"]["tokens"] == 6 * 64


def test_several_hookpoints_resume_and_push_layout(tiny_llama, tiny_lm, tmp_path, one_thread):
    model, tokenizer = load_model(tiny_llama)
    texts = tiny_lm.texts(n_docs=40)
    run = dict(cfg=cfg(tokens=64 * 20), stream=stream(layers=(0, 1), held_out=256))
    whole = train_streaming(model, tokenizer, texts, tmp_path / "whole", progress=False, **run)
    assert train_streaming(model, tokenizer, texts, tmp_path / "parts", progress=False, stop_after=9, **run) == {}
    assert (tmp_path / "parts" / "train.ckpt").is_file() and not any((tmp_path / "parts").rglob("*.safetensors"))
    resumed = train_streaming(model, tokenizer, texts, tmp_path / "parts", progress=False, resume=True, **run)
    assert set(whole) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    for name in whole:  # past window boundaries: 20 steps are more than one window's batches
        a = model_of(tmp_path / "whole" / name / "expander.safetensors")
        b = model_of(tmp_path / "parts" / name / "expander.safetensors")
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()), name
        assert resumed[name]["held_out"]["fvu"] == whole[name]["held_out"]["fvu"] < 1
        meta = read_compact_metadata(tmp_path / "whole" / name / "expander.safetensors")
        assert json.dumps(meta).count(name) >= 1
    layer0 = window_rows(model, list(token_contexts(tokenizer, texts, CONTEXT))[:WINDOW], stream(layers=(0, 1)))
    assert layer0[0].shape[1] == layer0[1].shape[1] and not torch.equal(layer0[0][:10], layer0[1][:10])


def test_cli_from_a_live_model_and_what_it_refuses(tiny_llama, tiny_lm, tmp_path, one_thread):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(tiny_lm.texts(n_docs=30)))
    base = ["train", "--model", str(tiny_llama), "--text", str(text), "--context", "32", "--lm-batch", "4",
            "--window", "16", "--d", "4", "--n", "64", "--k", "4", "--batch-size", "64", "--tokens", "640",
            "--held-out", "128"]
    result = CliRunner().invoke(cli, base + ["--layers", "0,1", "--out", str(tmp_path / "saes")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "blocks.0.hook_resid_post" in result.output
    for layer in (0, 1):
        assert (tmp_path / "saes" / f"blocks.{layer}.hook_resid_post" / "expander.safetensors").is_file()
    refusals = [
        (base + ["--layers", "0,0", "--out", str(tmp_path / "x")], "twice"),
        (base + ["--layers", "0", "--distribute-hookpoints", "--out", str(tmp_path / "x")], "--nproc"),
        (base + ["--layers", "0", "--window", "6", "--out", str(tmp_path / "x")], "multiple of --lm-batch"),
        (base + ["--layers", "zero", "--out", str(tmp_path / "x")], "layer numbers"),
        (base + ["--layers", "7", "--out", str(tmp_path / "x")], "layer"),
        (base + ["--layers", "0", "--out", str(tmp_path)], "holds the input"),
        (["train", "--acts", str(text), "--layers", "0", "--out", str(tmp_path / "y.safetensors")], "--layers"),
        (["train", "--d", "4", "--out", str(tmp_path / "y.safetensors")], "--acts"),
    ]
    for argv, words in refusals:
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 2 and words in result.output, (argv, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_text_that_runs_out_is_said(tiny_llama, tiny_lm, tmp_path, one_thread):
    model, tokenizer = load_model(tiny_llama)
    results = train_streaming(model, tokenizer, tiny_lm.texts(n_docs=4), tmp_path / "out", cfg(tokens=64 * 400),
                              stream(), progress=False)
    assert results["blocks.1.hook_resid_post"]["training"]["text_ran_out"]
    assert results["blocks.1.hook_resid_post"]["training"]["tokens"] < 64 * 400
    with pytest.raises(SaeCompressError, match="resume"):
        train_streaming(model, tokenizer, tiny_lm.texts(), tmp_path / "none", cfg(), stream(), resume=True)


def test_two_processes_hookpoint_parallel_and_data_parallel(tiny_llama, tiny_lm, tmp_path):
    """Each rank runs the LM on its share of the contexts. Hookpoint parallel: each hookpoint trained and written
    once, by its own rank, exactly as one process trains it; data parallel: what one process trains, written by
    rank 0."""
    text = tmp_path / "corpus.txt"
    text.write_text("".join(tiny_lm.texts(n_docs=40)))
    run = dict(cfg=cfg(tokens=64 * 12), stream=stream(layers=(0, 1), held_out=256))
    one = train_from_files(str(tiny_llama), None, [text], tmp_path / "one", progress=False, **run)
    parts = run_ranks(2, train_from_files, str(tiny_llama), None, [text], tmp_path / "two", progress=False,
                      distribute=True, threads=1, **run)
    assert [set(part) for part in parts] == [{"blocks.0.hook_resid_post"}, {"blocks.1.hook_resid_post"}]
    for name in one:
        a = model_of(tmp_path / "one" / name / "expander.safetensors")
        b = model_of(tmp_path / "two" / name / "expander.safetensors")
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()), name
    assert sorted(p.name for p in (tmp_path / "two").glob("*.ckpt")) == ["train.ckpt", "train.rank1.ckpt"]

    parts = run_ranks(2, train_from_files, str(tiny_llama), None, [text], tmp_path / "dp", progress=False,
                      threads=1, **run)
    assert parts[1] == {} and set(parts[0]) == set(one)
    for name in one:  # the one-process run's steps, within float rounding
        a = model_of(tmp_path / "one" / name / "expander.safetensors")
        b = model_of(tmp_path / "dp" / name / "expander.safetensors")
        for key, value in a.state_dict().items():
            assert float((value.double() - b.state_dict()[key].double()).abs().max()) <= 1e-4 * float(
                value.abs().max().clamp_min(1)), (name, key)
        assert parts[0][name]["held_out"]["fvu"] == pytest.approx(one[name]["held_out"]["fvu"], rel=1e-3)


def test_acts_sharded_over_two_processes(tiny_llama, tiny_lm, tmp_path):
    """Each rank harvests every other LM batch; one manifest lists both ranks' shards; together the rows are the
    rows one process harvests (the whole text: more tokens are asked than it has)."""
    from saecompress.activations import open_activations
    from saecompress.lm.harvest import harvest_files

    text = tmp_path / "corpus.txt"
    text.write_text("".join(tiny_lm.texts(n_docs=12)))
    run = dict(tokens=100_000, context=CONTEXT, batch=LM_BATCH, shard_rows=200, progress=False)
    one = harvest_files(str(tiny_llama), None, [text], 1, "resid", out=tmp_path / "one", **run)
    two = run_ranks(2, harvest_files, str(tiny_llama), None, [text], 1, "resid", out=tmp_path / "two", threads=1,
                    **run)
    assert two[1] == {} and two[0]["processes"] == 2
    assert {shard["file"].split("-")[1] for shard in two[0]["shards"]} == {"r0", "r1"}
    assert two[0]["num_rows"] == one["num_rows"] and two[0]["tokens_seen"] == one["tokens_seen"]
    a = open_activations(tmp_path / "one").read(0, one["num_rows"])
    b = open_activations(tmp_path / "two").read(0, one["num_rows"])
    assert torch.equal(a[a[:, 0].argsort()], b[b[:, 0].argsort()])
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_hookpoint_parallel_run_resumes_from_its_checkpoints(tiny_llama, tiny_lm, tmp_path):
    """Stopped at a window end (each rank writes its own checkpoint there) and resumed with the same number of
    processes: the files of an uninterrupted run, bit for bit."""
    text = tmp_path / "corpus.txt"
    text.write_text("".join(tiny_lm.texts(n_docs=40)))
    run = dict(cfg=cfg(tokens=64 * 20), stream=stream(layers=(0, 1), held_out=128), progress=False, distribute=True,
               threads=1)
    args = (str(tiny_llama), None, [text])
    run_ranks(2, train_from_files, *args, tmp_path / "whole", **run)
    assert run_ranks(2, train_from_files, *args, tmp_path / "parts", stop_after=5, **run) == [{}, {}]
    assert {p.name for p in (tmp_path / "parts").glob("*.ckpt")} == {"train.ckpt", "train.rank1.ckpt"}
    assert not any((tmp_path / "parts").rglob("*.safetensors"))
    run_ranks(2, train_from_files, *args, tmp_path / "parts", resume=True, **run)
    for name in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        a = model_of(tmp_path / "whole" / name / "expander.safetensors")
        b = model_of(tmp_path / "parts" / name / "expander.safetensors")
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items()), name


def test_cli_lines_on_two_processes(tiny_llama, tiny_lm, tmp_path):
    """`train --model … --nproc 2 --distribute-hookpoints` and `acts … --nproc 2` as a user types them."""
    import subprocess
    import sys

    text = tmp_path / "corpus.txt"
    text.write_text("".join(tiny_lm.texts(n_docs=30)))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    common = ["--model", str(tiny_llama), "--text", str(text), "--context", "32", "--nproc", "2"]
    train_args = ["train", *common, "--lm-batch", "4", "--window", "16", "--layers", "0,1", "--distribute-hookpoints",
                  "--d", "4", "--n", "64", "--k", "4", "--batch-size", "64", "--tokens", "640", "--held-out", "128",
                  "--out", str(tmp_path / "saes")]
    acts_args = ["acts", *common, "--batch", "4", "--layer", "1", "--tokens", "1000", "--out", str(tmp_path / "acts")]
    out = {}
    for args in (train_args, acts_args):
        done = subprocess.run([sys.executable, "-m", "saecompress", *args], capture_output=True, text=True,
                              timeout=240, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        out[args[0]] = done.stdout
    assert {line.split(":")[0] for line in out["train"].splitlines()} == {
        f"wrote {tmp_path / 'saes'}/blocks.{layer}.hook_resid_post" for layer in (0, 1)}  # each hookpoint once
    for layer in (0, 1):
        assert (tmp_path / "saes" / f"blocks.{layer}.hook_resid_post" / "expander.safetensors").is_file()
    assert "1,000 rows" in out["acts"]
    assert json.loads((tmp_path / "acts" / "manifest.json").read_text())["processes"] == 2
