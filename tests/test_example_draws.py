"""Draws inside the model are per example: an example's masks depend on its seed alone, not on the pass,
chunk or cut token width it is trained in."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpfl_bench.example_draws import ExampleDraws
from dpfl_bench.privacy.randomness import Randomness


def per_example(draw, x, seeds, **widths):
    with ExampleDraws(seeds, **widths):
        return draw(x)


def test_dropout_masks_are_the_examples_own_in_any_pass():
    x = torch.ones(6, 5, 7)
    together = per_example(lambda t: F.dropout(t, 0.3), x, [10, 11, 12, 13, 14, 15])
    in_pairs = torch.cat([per_example(lambda t: F.dropout(t, 0.3), x[i : i + 2], [10 + i, 11 + i]) for i in (0, 2, 4)])
    assert torch.equal(together, in_pairs)
    assert not torch.equal(together[0], together[1]), "each example its own mask"
    assert torch.equal(per_example(nn.Dropout(0.3), x, list(range(10, 16))), together), "nn.Dropout is F.dropout"
    kept = together[together != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.7))
    assert 0.2 < 1 - len(kept) / together.numel() < 0.4


def test_a_token_dimension_cut_to_the_longest_example_keeps_each_positions_mask():
    x = torch.ones(2, 8, 3)
    wide = per_example(lambda t: F.dropout(t, 0.5), x, [1, 2], token_widths=(8, 16))
    narrow = per_example(lambda t: F.dropout(t, 0.5), x[:, :5], [1, 2], token_widths=(5, 16))
    assert torch.equal(wide[:, :5], narrow)
    scores = torch.ones(2, 4, 8, 8)  # attention weights: both token dimensions are cut
    wide = per_example(lambda t: F.dropout(t, 0.5), scores, [1, 2], token_widths=(8, 16))
    narrow = per_example(lambda t: F.dropout(t, 0.5), scores[:, :, :5, :5], [1, 2], token_widths=(5, 16))
    assert torch.equal(wide[:, :, :5, :5], narrow)


def test_an_inner_dimension_as_small_as_the_cut_width_keeps_each_positions_mask_too():
    x = torch.ones(2, 8, 5)  # features (5) no wider than the padded width: the canonical shape widens them too
    wide = per_example(lambda t: F.dropout(t, 0.5), x[:, :6], [1, 2], token_widths=(6, 8))
    narrow = per_example(lambda t: F.dropout(t, 0.5), x[:, :5], [1, 2], token_widths=(5, 8))
    assert torch.equal(wide[:, :5], narrow)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_uniforms_lie_in_0_1_at_every_precision_and_look_uniform(dtype):
    u = per_example(lambda t: torch.rand(t.shape, dtype=dtype), torch.empty(4, 50_000), [7, 8, 9, 10])
    assert u.dtype == dtype and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.double().mean()) - 0.5) < 0.01 and abs(float(u.double().var()) - 1 / 12) < 0.005
    if dtype == torch.float64:  # finer than float32's 24 bits
        assert bool(((u * 2**24) % 1 != 0).any())
    rows = u.double() - 0.5
    assert abs(float((rows[0] * rows[1]).mean())) < 0.003, "examples' draws are not correlated"


def test_drop_connect_and_stochastic_depth_draws_are_per_example():
    def drop_connect(t):  # efficientnet_lite_pytorch's draw
        return torch.floor(0.8 + torch.rand([t.shape[0], 1, 1, 1], dtype=t.dtype, device=t.device))

    def stochastic_depth(t):  # timm's draw
        return t.new_empty(t.shape[0], 1, 1, 1).bernoulli_(0.8)

    x = torch.ones(4, 2, 3, 3)
    for draw in (drop_connect, stochastic_depth, torch.rand_like):
        together = per_example(draw, x, [5, 6, 7, 8])
        alone = torch.cat([per_example(draw, x[i : i + 1], [5 + i]) for i in range(4)])
        assert torch.equal(together, alone), draw.__name__


def test_draws_not_split_by_example_come_from_torchs_generator():
    torch.manual_seed(3)
    expected = torch.rand(3, 2)
    torch.manual_seed(3)
    with ExampleDraws([1, 2]):
        assert torch.equal(torch.rand(3, 2), expected)  # 3 rows cannot be split between 2 examples
        assert torch.equal(F.dropout(expected, 0.5, training=False), expected)


@pytest.mark.parametrize("mask", ["none", "bool", "bool-a-row-sees-nothing", "float", "causal"])
def test_attention_with_dropout_is_attention_with_per_example_masks(mask):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4)  # 4 queries, 6 keys
    masks = {"none": {}, "bool": {"attn_mask": torch.rand(3, 1, 4, 6) > 0.3}, "float": {"attn_mask": torch.randn(3, 1, 4, 6)},
             "causal": {"is_causal": True}, "bool-a-row-sees-nothing": {"attn_mask": torch.rand(3, 1, 4, 6) > 0.3}}[mask]
    if mask.startswith("bool"):
        masks["attn_mask"][..., 0] = True  # every query sees a key
    if mask == "bool-a-row-sees-nothing":
        masks["attn_mask"][1, :, 2] = False  # torch gives such a query 0
    exact = F.scaled_dot_product_attention(q, k, v, **masks)
    with ExampleDraws([1, 2, 3]):
        nearly_no_dropout = F.scaled_dot_product_attention(q, k, v, dropout_p=1e-9, **masks)
    with ExampleDraws([1, 2, 3]):
        with_dropout = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, **masks)
    torch.testing.assert_close(nearly_no_dropout, exact)
    with ExampleDraws([2]):
        second_alone = F.scaled_dot_product_attention(q[1:2], k[1:2], v[1:2], dropout_p=0.5,
                                                      **{n: t[1:2] if torch.is_tensor(t) else t for n, t in masks.items()})
    torch.testing.assert_close(with_dropout[1:2], second_alone)
    assert not torch.allclose(with_dropout, exact)


def test_example_seeds_are_distinct_per_client_step_and_position():
    randomness = Randomness(0)
    seeds = [randomness.example_seeds(r, c, s, 4) for r in range(2) for c in range(2) for s in range(2)]
    flat = [x for group in seeds for x in group]
    assert len(set(flat)) == len(flat)
    assert randomness.example_seeds(1, 1, 1, 6)[:4] == randomness.example_seeds(1, 1, 1, 4)
    assert Randomness(1).example_seeds(0, 0, 0, 4) != seeds[0]


def test_splitmix_gives_the_reference_bits():
    """The int64 version against plain uint64 arithmetic: the same bits on any device that wraps."""
    from dpfl_bench.example_draws import _splitmix

    def reference(z):
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % 2**64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB % 2**64
        return z ^ (z >> 31)

    values = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15, 123456789123456789]
    signed = torch.tensor([v - 2**64 if v >= 2**63 else v for v in values], dtype=torch.int64)
    assert [v % 2**64 for v in _splitmix(signed).tolist()] == [reference(v) for v in values]


def test_batch_major_draws_and_draws_after_a_fallback_are_per_example():
    def draws(t):  # Swin-like windows: [examples * 4 windows, tokens, features]; then a draw that falls back
        first = F.dropout(t, 0.5)
        torch.rand(5)  # 5 rows cannot be split between the examples of a pass
        return first, F.dropout(t, 0.5)

    x = torch.ones(3 * 4, 6, 2)
    together = per_example(draws, x, [4, 5, 6])
    alone = [per_example(draws, x[4 * i : 4 * i + 4], [4 + i]) for i in range(3)]
    for k in range(2):
        assert torch.equal(together[k], torch.cat([a[k] for a in alone]))
