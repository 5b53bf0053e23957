"""CE evaluation with and without skipping the blocks before the site (``lm.Prefix``), rounds alternated.

Per batch of contexts a CE evaluation runs one clean pass and one spliced pass per variant (zero, mean,
each SAE). With the clean pass's ``Prefix``, a spliced pass starts at the site's block. Prints the median
seconds of a whole evaluation (clean pass + ``--variants`` spliced passes) both ways, and the ratio.

    python benchmarks/ce_prefix.py --model SmolLM2-135M-Instruct.Q4_1.gguf --layer 15
    python benchmarks/ce_prefix.py --quick      # a tiny in-process Llama (what the tests run)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saecompress.lm import clean_pass, decoder_layers, load_model, site_module, spliced_pass

from common import print_table


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="causal LM (folder, hub id or .gguf)")
    p.add_argument("--layer", type=int, default=None, help="block of the site [default: the middle one]")
    p.add_argument("--site", default="resid")
    p.add_argument("--contexts", type=int, default=4, help="contexts per batch")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--variants", type=int, default=4, help="spliced passes per batch (zero, mean, SAEs)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        model, vocab = _tiny_llama(), 512
        a.context, a.rounds = 64, 2
    else:
        if not a.model:
            p.error("give --model (or --quick)")
        model, tokenizer = load_model(a.model)
        vocab = len(tokenizer)
    layers = len(decoder_layers(model))
    layer = a.layer if a.layer is not None else layers // 2
    module = site_module(model, layer, a.site)
    ids = torch.randint(0, vocab, (a.contexts, a.context), generator=torch.Generator().manual_seed(0))

    def evaluation(skip: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            _, act, prefix = clean_pass(model, module, ids, prefix_layer=layer if skip else None)
            for variant in range(a.variants):
                spliced_pass(model, module, ids, act * (variant / a.variants), prefix)
        return time.perf_counter() - start

    evaluation(True)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(a.rounds):
        for skip in (False, True):
            times[skip].append(evaluation(skip))
    full, skipped = statistics.median(times[False]), statistics.median(times[True])
    print(f"{a.contexts} contexts of {a.context} tokens, site {a.site} of block {layer} (of {layers}), "
          f"{a.variants} spliced variants, {torch.get_num_threads()} threads, median of {a.rounds} alternated rounds")
    print_table(["evaluation", "seconds", "speed-up"],
                [["every pass from the embeddings", full, 1.0], ["spliced passes from the site's block", skipped,
                                                                 full / skipped]])


if __name__ == "__main__":
    main()
