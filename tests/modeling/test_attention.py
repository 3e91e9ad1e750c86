"""The attention op and the ring cache, checked with sentinel values.

Keys are all zero, so every visible key gets the same score and the output is the mean of the
visible values; each value is a one-hot of its position (mod D). Reading the output back tells
exactly which positions a query saw, which is compared with the rule of GEMMA3_SPEC §2 / §3c
written here independently as a set comprehension.
"""

import pytest
import torch

from g3export.modeling.attention import attention_reference

D = 64  # one-hot width: larger than any window + chunk used below


def run_sequence(n_tokens, chunks, window, slots, groups=None, heads=2, kv_heads=1):
    """Feed positions 0..n-1 through the op in the given chunk sizes; return what each query saw."""
    # Empty slots hold a large sentinel: a query that read one would show it in its output.
    kc = torch.zeros((1, kv_heads, slots, D))
    vc = torch.full((1, kv_heads, slots, D), 1000.0)
    seen = {}
    start = 0
    for t in chunks:
        pos = torch.arange(start, start + t)
        q = torch.zeros(1, heads, t, D)
        k = torch.zeros(1, kv_heads, t, D)
        v = torch.nn.functional.one_hot(pos % D, D).float()[None, None].expand(1, kv_heads, t, D)
        g = torch.full((1, t), -1, dtype=torch.int64) if groups is None else groups[:, start:start + t]
        out, kc, vc = attention_reference(q, k, v, kc, vc, torch.tensor([start]), g, window, 1.0)
        assert out.max() <= 1.0, "a query read an empty slot"
        for i in range(t):
            row = out[0, 0, i]
            vis = (row > 0).nonzero().flatten().tolist()
            assert torch.allclose(row[vis], torch.full((len(vis),), 1.0 / len(vis))), "not uniform"
            seen[start + i] = {int(x) for x in vis}
        start += t
    return seen, kc, vc


def expected(i, window, image_of=None):
    image_of = image_of or {}
    vis = set()
    for j in range(max([i, *image_of]) + 1):
        same_image = j in image_of and i in image_of and image_of[i] == image_of[j]
        if (j <= i or same_image) and (window == 0 or j > i - window):
            vis.add(j % D)
    return vis


@pytest.mark.parametrize("chunks", [[1] * 30, [5, 5, 5, 5, 5, 5], [3, 11, 1, 1, 14], [30]])
def test_sliding_ring_sees_exactly_the_window(chunks):
    w = 8
    seen, kc, vc = run_sequence(30, chunks, window=w, slots=w)
    for i, s in seen.items():
        assert s == expected(i, w), f"query {i}"
    # After the run, slot s holds the latest position congruent to s mod W.
    held = vc[0, 0].argmax(-1).tolist()
    assert held == [max(p for p in range(30) if p % w == s) % D for s in range(w)]


def test_full_layer_sees_everything_before():
    seen, _, _ = run_sequence(40, [7, 13, 1, 1, 18], window=0, slots=48)
    for i, s in seen.items():
        assert s == expected(i, 0)


def test_decode_far_past_the_window():
    w, n = 8, 1000
    # one long chunk (longer than the ring: only its last W keys may be kept), then decode
    seen, _, _ = run_sequence(n + 20, [n] + [1] * 20, window=w, slots=w)
    for i in range(n, n + 20):
        assert seen[i] == {j % D for j in range(i - w + 1, i + 1)}


def test_image_block_is_bidirectional_and_per_image():
    # tokens 4..7 are image 0 and 10..13 image 1, all in one chunk; window 8
    groups = torch.full((1, 20), -1, dtype=torch.int64)
    groups[0, 4:8] = 0
    groups[0, 10:14] = 1
    image_of = {**{p: 0 for p in range(4, 8)}, **{p: 1 for p in range(10, 14)}}
    seen, _, _ = run_sequence(20, [20], window=8, slots=8, groups=groups)
    for i, s in seen.items():
        assert s == expected(i, 8, image_of), f"query {i}"
    assert 7 in seen[4]           # the first image token sees the image's last token
    assert 10 not in seen[7]      # never a later image
    assert 13 in seen[10] and 4 not in seen[13] - {4}  # second image bidirectional; window cut


def test_gqa_heads_use_their_kv_head():
    torch.manual_seed(0)
    b, h, kv, t, d, s = 1, 4, 2, 5, 8, 16
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    z = torch.zeros(b, kv, s, d)
    g = torch.full((b, t), -1)
    out, _, _ = attention_reference(q, k, v, z, z, torch.tensor([0]), g, 0, 0.5)
    for head in range(h):
        kh, vh = k[:, head // 2], v[:, head // 2]
        sc = (q[:, head] @ kh.transpose(-1, -2)) * 0.5
        sc = sc.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(out[:, head], sc.softmax(-1) @ vh)
