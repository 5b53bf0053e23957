"""Scale-out: data-parallel training on 1 vs 2 ranks, and training from a live LM vs harvest-then-train.

ranks   Tokens/s of file-based training (``train``) on 1 rank and on 2 ranks (gloo), one torch thread per
        rank, both started by ``launch.run_ranks``. Each configuration trains a short and a long run in
        alternated rounds; tokens/s is Δtokens / Δseconds of the medians, so process start, set-up and the
        final evaluation cancel out.
stream  Seconds to train one SAE on the same tokens of an LM's layer: ``acts`` (harvest to shards) then
        ``train --acts``, against ``train --model`` (``stream.train_streaming``, no files), rounds alternated.

CE evaluation with and without the prefix skip is ``benchmarks/ce_prefix.py``.

    python benchmarks/scale.py --model SmolLM2-135M-Instruct.Q4_1.gguf --layer 15 --text corpus/
    python benchmarks/scale.py --quick       # tiny sizes and an in-process Llama (what the tests run)
"""

from __future__ import annotations

import argparse
import statistics
import string
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saecompress.launch import run_ranks
from saecompress.lm import harvest, load_model
from saecompress.stream import StreamConfig, train_streaming
from saecompress.texts import read_texts, text_files
from saecompress.train import TrainConfig, train

from common import print_table


def planted_rows(rows: int, m: int, seed: int = 0) -> np.ndarray:
    """Rows with a sparse structure (sparse codes over 4m random directions) and uneven dims, as residuals have."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((4 * m, m)) * rng.lognormal(0, 1, m)
    codes = rng.standard_normal((rows, 4 * m)) * (rng.random((rows, 4 * m)) < 8 / (4 * m))
    return (codes @ basis + rng.standard_normal(m)).astype(np.float32)


def ranks_table(acts: Path, m: int, cfg: TrainConfig, short: int, long: int, rounds: int, folder: Path) -> None:
    """Tokens/s of 1 and 2 ranks of one thread each."""
    times: dict[tuple[int, int], list[float]] = {}
    for _ in range(rounds):
        for steps in (short, long):
            for nproc in (1, 2):
                run = TrainConfig(**{**cfg.__dict__, "tokens": steps * cfg.batch_size})
                start = time.perf_counter()
                run_ranks(nproc, train, acts, folder / f"r{nproc}-{steps}.safetensors", run, progress=False, threads=1)
                times.setdefault((nproc, steps), []).append(time.perf_counter() - start)
    rate = {nproc: (long - short) * cfg.batch_size / (statistics.median(times[nproc, long])
                                                      - statistics.median(times[nproc, short]))
            for nproc in (1, 2)}
    print(f"data parallel, file-based: rows of width m={m}, n={cfg.n}, d={cfg.d}, k={cfg.k}, "
          f"batch {cfg.batch_size}; {short} and {long} steps, median of {rounds} alternated rounds, 1 thread per rank")
    print_table(["ranks", "tokens/s", "speed-up"], [[n, rate[n], rate[n] / rate[1]] for n in (1, 2)])


def stream_table(model, tokenizer, texts: list[str], layer: int, cfg: TrainConfig, stream: StreamConfig,
                 rounds: int, folder: Path) -> None:
    """Harvest-then-train against training from the live model, on the same tokens."""
    held = stream.held_out
    times: dict[str, list[float]] = {"acts + train --acts": [], "train --model": []}
    for r in range(rounds):
        start = time.perf_counter()
        acts = folder / f"acts-{r}"
        harvest(model, tokenizer, texts, layer, stream.site, tokens=cfg.tokens + held, out=acts,
                context=stream.context, batch=stream.lm_batch, progress=False)
        train(acts, folder / f"file-{r}.safetensors", TrainConfig(**{**cfg.__dict__, "held_out_rows": held}),
              progress=False)
        times["acts + train --acts"].append(time.perf_counter() - start)
        start = time.perf_counter()
        train_streaming(model, tokenizer, texts, folder / f"live-{r}", cfg, stream, progress=False)
        times["train --model"].append(time.perf_counter() - start)
    base = statistics.median(times["acts + train --acts"])
    print(f"\none SAE at layer {layer}: {cfg.tokens:,} training tokens + {held:,} held-out rows, n={cfg.n}, d={cfg.d}, "
          f"{torch.get_num_threads()} threads, median of {rounds} alternated rounds")
    print_table(["run", "seconds", "vs harvest-then-train"],
                [[name, statistics.median(t), statistics.median(t) / base] for name, t in times.items()])


def _tiny_model():
    """A tiny random Llama and a character tokenizer (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = {c: i + 3 for i, c in enumerate(string.ascii_lowercase + " .")}
    core = Tokenizer(models.WordLevel(vocab={"<s>": 0, "</s>": 1, "<unk>": 2, **chars}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(chars) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval(), tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="causal LM for the stream table (folder, hub id or .gguf)")
    p.add_argument("--text", action="append", help="text files or folders for the stream table")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--m", type=int, default=576, help="row width of the ranks table's synthetic rows")
    p.add_argument("--n", type=int, default=4608)
    p.add_argument("--d", type=int, default=7)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=131072, help="training tokens of the stream table")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", choices=("ranks", "stream"), help="print one of the two tables")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    steps = (10, 60)
    if a.quick:
        a.m, a.n, a.d, a.k, a.tokens, a.rounds, steps = 32, 256, 4, 8, 4096, 1, (2, 200)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        acts = folder / "rows.npy"
        np.save(acts, planted_rows(32768 if not a.quick else 4096, a.m))
        cfg = TrainConfig(d=a.d, n=a.n, k=a.k, batch_size=1024 if not a.quick else 256, held_out_rows=1024)
        if a.only != "stream":
            ranks_table(acts, a.m, cfg, *steps, a.rounds, folder)
        if a.only == "ranks":
            return
        if a.quick:
            model, tokenizer = _tiny_model()
            texts = [" ".join("the cat sat on a mat and ran far" for _ in range(40))] * 20
            layer, stream = 1, StreamConfig(layers=(1,), context=64, lm_batch=4, window=64, held_out=512)
        elif a.model and a.text:
            model, tokenizer = load_model(a.model)
            texts = list(read_texts(text_files(a.text)))
            layer, stream = a.layer, StreamConfig(layers=(a.layer,), held_out=8192)
        else:
            print("\n(stream table: give --model and --text)")
            return
        cfg = TrainConfig(d=a.d, n=a.n, k=a.k, tokens=a.tokens, batch_size=cfg.batch_size, held_out_rows=0)
        stream_table(model, tokenizer, texts, layer, cfg, stream, a.rounds, folder)


if __name__ == "__main__":
    main()
