"""The generation loop, chunking and sampling, on the tiny preset through the reference session."""

import numpy as np
import pytest
import torch

from g3export.modeling.cache import kv_layout
from g3export.modeling.config import preset
from g3export.modeling.text import Gemma3Model
from g3export.runtimes.generate import GenerationError, generate, prefill_chunks
from g3export.runtimes.reference import TorchSession
from g3export.runtimes.sampling import Sampler, SamplingConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Gemma3Model(preset("tiny")).eval()
    with torch.no_grad():  # weights of a scale that makes greedy outputs vary
        for name, p in m.named_parameters():
            p.normal_(0, 0.3 if "norm" in name else 0.1)
    return m


def test_chunks_cover_the_prompt_and_never_split_an_image():
    img = 99
    ids = [1, 2, 3] + [img] * 5 + [4, 5] + [img] * 3 + [6]
    for size in range(1, 16):
        chunks = prefill_chunks(ids, size, img)
        assert [i for s, e in chunks for i in range(s, e)] == list(range(len(ids)))
        for s, e in chunks:
            # an image run is either wholly inside a chunk or wholly outside it
            for run in ((3, 8), (10, 13)):
                assert e <= run[0] or s >= run[1] or (s <= run[0] and e >= run[1]), (size, chunks)
            assert e - s <= size or all(ids[i] == img for i in range(s, e)) or e - s <= 5


def test_chunked_generation_equals_one_chunk(model):
    prompt = list(range(5, 45))
    a = generate(TorchSession(model, 128), prompt, 20, stop_ids=[], chunk_size=512)
    b = generate(TorchSession(model, 128), prompt, 20, stop_ids=[], chunk_size=7)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20


def test_reference_session_equals_no_cache_recompute(model):
    """Greedy decode with the static cache equals recomputing the whole sequence every step."""
    prompt = list(range(10, 50))
    r = generate(TorchSession(model, 128), prompt, 12, stop_ids=[])
    seq = list(prompt)
    for _ in range(12):
        s = TorchSession(model, 128)
        seq.append(int(np.argmax(s.forward(np.array([seq]), 0))))
    assert r.token_ids == seq[len(prompt):]


def test_stop_token_ends_generation(model):
    prompt = list(range(5, 25))
    first = generate(TorchSession(model, 64), prompt, 8, stop_ids=[]).token_ids
    k = next(i for i in range(1, 8) if first[i] not in first[:i])
    r = generate(TorchSession(model, 64), prompt, 8, stop_ids=[first[k]])
    assert r.token_ids == first[:k + 1] and r.stop_reason == "stop_token"


def test_prompt_longer_than_context_is_refused(model):
    with pytest.raises(GenerationError, match="context holds 16"):
        generate(TorchSession(model, 16), list(range(1, 20)), 4)
    with pytest.raises(GenerationError, match="out of range"):
        generate(TorchSession(model, 16), [1, 2, 100000], 4)


def test_generation_stops_at_the_context_end(model):
    r = generate(TorchSession(model, 16), list(range(1, 12)), 50, stop_ids=[])
    assert r.stop_reason == "max_context" and 11 + len(r.token_ids) == 17  # last token needs no slot


def test_kv_bytes_follow_the_layout(model):
    s = TorchSession(model, 100)
    t = model.config.text
    # 2 sliding-window layers per full layer in the tiny preset: W slots vs 100 slots
    assert s.kv_bytes == kv_layout(t, 100).bytes
    assert s.kv_bytes < kv_layout(t, 100, all_global=True).bytes


def test_sampling_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda cfg: {int(Sampler(SamplingConfig(greedy=False, seed=s, **cfg))(logits)[0])
                         for s in range(200)}
    assert draws(dict(top_k=2)) == {0, 1}
    assert draws(dict(top_p=0.7)) == {0, 1}       # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert draws(dict(top_p=0.5)) == {0}
    assert draws(dict()) == {0, 1, 2, 3}
    assert Sampler(SamplingConfig())(logits).tolist() == [0]
    same = [int(Sampler(SamplingConfig(greedy=False, seed=7))(logits)[0]) for _ in range(3)]
    assert len(set(same)) == 1
    with pytest.raises(ValueError):
        SamplingConfig(temperature=0)
