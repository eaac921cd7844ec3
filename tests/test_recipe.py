"""The frozen ViLT and the training recipe as the official code runs them (common.py, data.py): each piece against
its oracle — HF's own ViltLayer, a brute-force attention, the official formulas written out here from reading
the official code (YiLunLee/missing_aware_prompts 9aa5381, zhao-yh20/MemPrompt 342739e)."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
from common import load_vilt

TOL = 1e-5


def vilt_with_layers(config=None):
    from transformers import ViltConfig, ViltModel
    torch.manual_seed(0)
    model = ViltModel(config or ViltConfig(num_hidden_layers=1, vocab_size=100))
    return common.FrozenViLT(model, None, {"backbone": "vilt"})


def randomise_norms(bb):
    """Random-init LayerNorms are the identity (weight 1, bias 0); trained ones are not: give them random affines."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in bb.vilt.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return bb


def random_bias(B, L, seed=1):                                      # a key mask with padding in every row but the first
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, L, generator=g) > 0.3).long()
    mask[:, 0] = 1
    return mask, common.FrozenViLT.attention_bias(mask, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Item 8: the block through scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["tiny", "real"])
def test_sdpa_block_equals_hf_vilt_layer(size):
    """bb.block (SDPA over the layer's own modules) equals HF's eager ViltLayer on the same input and mask, fp32."""
    bb = randomise_norms(load_vilt("tiny-vilt") if size == "tiny" else vilt_with_layers())
    torch.manual_seed(2)
    B, L = 3, 37
    x = torch.randn(B, L, bb.width)
    mask, bias = random_bias(B, L)
    with torch.no_grad():
        for i in range(bb.num_layers):
            ref = bb.vilt.encoder.layer[i](x, bias)[0]
            assert (bb.block(i, x, bias) - ref).abs().max() <= TOL
    assert not torch.equal(bb.block(0, x, bias), bb.block(0, x, random_bias(B, L, seed=3)[1]))   # the mask is used


def brute_force_prefix_attention(layer, x, bias, K_p, V_p):
    """softmax(Q [K_p; K]^T / sqrt(d) + [0; bias]) [V_p; V] per head, in explicit loops over batch and heads."""
    attn = layer.attention.attention
    H, d = attn.num_attention_heads, attn.attention_head_size
    h = layer.layernorm_before(x)
    q, k, v = attn.query(h), torch.cat([K_p, attn.key(h)], 1), torch.cat([V_p, attn.value(h)], 1)
    full_bias = torch.cat([torch.zeros(x.shape[0], K_p.shape[1]), bias[:, 0, 0]], 1)     # (B, P + L)
    out = torch.zeros_like(q)
    for b in range(x.shape[0]):
        for j in range(H):
            cols = slice(j * d, (j + 1) * d)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(d) + full_bias[b]
            out[b, :, cols] = scores.softmax(-1) @ v[b, :, cols]
    x = x + layer.attention.output.dense(out)
    return x + layer.output.dense(layer.intermediate(layer.layernorm_after(x)))


@pytest.mark.parametrize("size", ["tiny", "real"])
def test_sdpa_block_kv_prefix_equals_brute_force(size):
    """kv_prefix: raw key/value rows prepended after the frozen projections, split per head, seen by every query."""
    bb = randomise_norms(load_vilt("tiny-vilt") if size == "tiny" else vilt_with_layers())
    torch.manual_seed(4)
    B, L, P = 2, 19, 5
    x, K_p, V_p = torch.randn(B, L, bb.width), torch.randn(B, P, bb.width), torch.randn(B, P, bb.width)
    _, bias = random_bias(B, L)
    with torch.no_grad():
        ours = bb.block(0, x, bias, kv_prefix=(K_p, V_p))
        ref = brute_force_prefix_attention(bb.vilt.encoder.layer[0], x, bias, K_p, V_p)
    assert ours.shape == x.shape and (ours - ref).abs().max() <= TOL
    assert (ours - bb.block(0, x, bias)).abs().max() > 1e-3                      # the prefix changes the output


MUTATIONS = [
    {"file": "common.py", "old": "attn_mask=bias.to(q.dtype))", "new": "attn_mask=None)",
     "why": "SDPA block ignores the key mask"},
    {"file": "common.py", "old": "k, v = torch.cat([K_p.to(k.dtype), k], 1), torch.cat([V_p.to(v.dtype), v], 1)",
     "new": "k, v = torch.cat([K_p.to(k.dtype), k], 1), torch.cat([K_p.to(v.dtype), v], 1)",
     "why": "the value prefix is the key prefix"},
    {"file": "common.py", "old": "bias = torch.cat([bias.new_zeros(*bias.shape[:-1], K_p.shape[1]), bias], -1)",
     "new": "bias = torch.cat([bias, bias.new_zeros(*bias.shape[:-1], K_p.shape[1])], -1)",
     "why": "the prefix's zero bias is put after the tokens' keys (masks the wrong keys)"},
    {"file": "common.py", "old": "return x + layer.output.dense(layer.intermediate(layer.layernorm_after(x)))",
     "new": "return x + layer.output.dense(layer.intermediate(layer.layernorm_before(x)))",
     "why": "MLP pre-norm uses the attention LayerNorm"},
]
