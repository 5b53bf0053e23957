"""Tiny transformers language models built in-process (no downloads), shared by the LM tests."""

import random
import string

import torch

from saecompress.lm import token_contexts

HIDDEN = 32
CHARS = string.ascii_lowercase + " .,\n"


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def tiny_config(arch: str):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=40, bos_token_id=0, eos_token_id=1)
    if arch == "llama":
        return LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, **common)
    return GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=128, **common)


def texts(n_docs=6, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "quiet", "dog", "ran", "far", "zebra"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 90))) + ".\n" for _ in range(n_docs)]


def save_tiny(folder, arch, massive_char=None):
    """Save a tiny model + tokenizer, briefly trained on ``texts()`` so its predictions carry information."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    tokenizer = tiny_tokenizer()
    ids = torch.stack(list(token_contexts(tokenizer, texts(), 64)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    if massive_char is not None:  # plant a massive-activation token: a huge embedding row
        with torch.no_grad():
            model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(massive_char)] *= 1e4
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
