"""Parity of the text decoder with transformers' Gemma3ForCausalLM on a tiny random checkpoint
that reaches every path: both layer types, window 8 < the 40-token prompt, GQA 2:1, linear RoPE
scaling on the full layers, random (1 + w) norms. The checkpoint is written by transformers'
save_pretrained (sharded) and loaded by g3export's loader."""

import numpy as np
import torch

from g3export.modeling.weights import build_model
from g3export.runtimes.generate import generate
from g3export.runtimes.reference import TorchSession

PROMPT_LEN, DECODE = 40, 20


def test_prefill_and_decode_logits_and_greedy_tokens(hf_tiny_causal):
    hf, path = hf_tiny_causal
    ours = build_model(checkpoint=path, all_logits=True)
    # sqrt(64) = 8 is exact in bf16, so HF's fp32 embed scale equals our bf16-rounded one here.
    assert ours.config.text.embed_scale == hf.model.embed_tokens.embed_scale.item() == 8.0
    torch.manual_seed(1)
    ids = torch.randint(3, 512, (1, PROMPT_LEN))
    with torch.no_grad():
        hf_out = hf.generate(ids, max_new_tokens=DECODE, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        hf_prefill = hf(ids).logits[0]
    hf_tokens = hf_out.sequences[0, PROMPT_LEN:].tolist()
    hf_step_logits = torch.stack([l[0] for l in hf_out.logits])  # [DECODE, V]

    session = TorchSession(ours, 128)
    prefill = session.forward(ids.numpy(), 0)  # last position; check every position below
    logits_all, _ = ours(ids, torch.tensor([0]), [torch.zeros_like(c) for c in session.caches])
    np.testing.assert_allclose(logits_all[0].numpy(), hf_prefill.numpy(), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(prefill[0], hf_prefill[-1].numpy(), atol=2e-5, rtol=1e-4)

    # decode step by step with the static cache, comparing every step's logits
    ours.all_logits = False
    tokens, step_logits = [], [prefill[0]]
    session = TorchSession(ours, 128)
    logits = session.forward(ids.numpy(), 0)
    for i in range(DECODE):
        tok = int(np.argmax(logits[0]))
        tokens.append(tok)
        if i + 1 < DECODE:
            logits = session.forward(np.array([[tok]]), PROMPT_LEN + i)
            step_logits.append(logits[0])
    np.testing.assert_allclose(np.stack(step_logits), hf_step_logits.numpy(), atol=2e-5, rtol=1e-4)
    assert tokens == hf_tokens
    # and the shared generation loop, prefilling in chunks that wrap the ring, gives the same
    r = generate(TorchSession(ours, 128), ids[0].tolist(), DECODE, stop_ids=[], chunk_size=7)
    assert r.token_ids == hf_tokens
