"""GGUF models: a tiny llama written as a GGUF file with the ``gguf`` package (as llama.cpp's converter
lays it out) loads through ``lm.load_model`` and the ``acts`` command, with the original's activations."""

import json
import string

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saecompress.cli.main import cli
from saecompress.lm import capture, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path) -> None:
    """``model`` (a transformers Llama) as a float32 GGUF file with a sentencepiece-style character vocab."""
    import gguf

    cfg = model.config
    sd = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = ["<s>", "</s>", "<unk>"] + ["▁" if c == " " else c for c in string.ascii_lowercase + " .,\n"]
    tokens += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3, 3, 2] + [1] * (len(tokens) - 3))  # control, control, unknown, normal
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}."
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", sd[layer + theirs + ".weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[layer + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[layer + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_llama_loads_with_the_original_activations(tiny_llama, tiny_lm, tmp_path):
    original, _ = load_model(tiny_llama)
    path = tmp_path / "model" / "tiny.gguf"
    path.parent.mkdir()
    write_gguf(original, path)
    model, tokenizer = load_model(path)
    assert tokenizer.bos_token_id == 0 and tokenizer.convert_ids_to_tokens([3, 4]) == ["a", "b"]
    ids = torch.randint(3, 33, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    for layer in (0, 1):
        torch.testing.assert_close(capture(model, ids, layer, "resid"), capture(original, ids, layer, "resid"),
                                   rtol=1e-5, atol=1e-5)
    # the same file through the CLI: as a path, and as a folder plus --gguf-file
    text = tmp_path / "text.txt"
    text.write_text("".join(tiny_lm.texts(4)))
    for model_args in ([str(path)], [str(path.parent), "--gguf-file", path.name]):
        out = tmp_path / f"acts-{len(model_args)}"
        result = CliRunner().invoke(cli, ["acts", "--model", *model_args, "--text", str(text), "--layer", "1",
                                          "--tokens", "100", "--context", "32", "--out", str(out)])
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["num_rows"] == 100 and manifest["m"] == tiny_lm.HIDDEN
