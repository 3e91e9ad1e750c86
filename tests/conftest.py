"""Shared fixtures: tiny random Hugging Face checkpoints written with save_pretrained, so every
parity test compares g3export with transformers' own Gemma 3 on files transformers wrote."""

import os

import pytest
import torch

# No GPU (CI, dev machines): Triton kernels run under Triton's interpreter. It must be set before
# triton is first imported, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference (pip install -e .[dev])")


def tiny_text_config(**overrides):
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
              sliding_window_pattern=3, max_position_embeddings=256, query_pre_attn_scalar=16,
              rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=10000.0,
              eos_token_id=[1, 106], attn_implementation="eager")
    kw.update(overrides)
    return transformers.Gemma3TextConfig(**kw)


def randomize_norms(model, std=0.3):
    """HF initialises RMSNorm weights to 0; random values exercise the (1 + w) path."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(0, std)


@pytest.fixture(scope="session")
def hf_tiny_causal(tmp_path_factory):
    """(HF model, checkpoint dir): Gemma3ForCausalLM, both layer types, window 8, GQA 2:1,
    linear RoPE x8 on the full layers, saved in several shards."""
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(tiny_text_config()).eval()
    randomize_norms(model)
    path = tmp_path_factory.mktemp("hf_tiny_causal")
    model.save_pretrained(path, max_shard_size="100KB")
    return model, path
