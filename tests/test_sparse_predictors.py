"""`sparse_predictors.py`: the two learned predictors. Their attention is the original's eager product in SDPA's
fused kernel, they stay float32 under dtype casts, and they return two logits per token."""

import torch

from dynamic_llava.sparse_predictors import (
    ImageScorePredictor,
    OutputTextScorePredictor,
    PredictorAttention,
    run_predictor,
)


def test_predictor_attention_equals_the_original_eager_softmax_product():
    torch.manual_seed(0)
    attention = PredictorAttention(d_model=16, nhead=2)
    x = torch.randn(3, 11, 16)
    n, t, d = x.shape
    q, k, v = attention.qkv(x).reshape(n, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4).unbind(0)
    eager = ((q @ k.transpose(-2, -1)) * attention.scale).softmax(-1) @ v  # the original's formula
    expected = attention.proj(eager.transpose(1, 2).reshape(n, t, d))
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-6)


def test_predictor_attention_gradients_reach_every_input_token():
    torch.manual_seed(0)
    attention = PredictorAttention(d_model=8, nhead=2)
    x = torch.randn(1, 5, 8, requires_grad=True)
    attention(x)[0, 0].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()  # unmasked: the first token's output depends on every token


def test_predictors_return_two_logits_per_token_and_stay_float32_under_half():
    image = ImageScorePredictor(hidden_size=24, d_model=16, nhead=2, dim_feedforward=32, num_layers=1).half()
    text = OutputTextScorePredictor(hidden_size=24, d_model=16).bfloat16()
    assert {p.dtype for p in (*image.parameters(), *text.parameters())} == {torch.float32}
    hidden = torch.randn(2, 7, 24, dtype=torch.float16)
    assert run_predictor(image, hidden).shape == (2, 7, 2)
    assert run_predictor(text, hidden).dtype == torch.float32
