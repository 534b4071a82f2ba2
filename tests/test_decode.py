"""Decoding a token at a time: the experts laid out output x input (EMO.for_decoding) and moe_mlp_decode compute
what the training layout and the loop path do.

    python -m pytest tests/test_decode.py -q
"""

import pytest
import torch

from kernels import moe_mlp_decode, moe_mlp_loop
from model import EMO, ModelConfig
from tests.test_kernels import problem


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_layout_and_path_compute_what_the_training_layout_does(dtype):
    """EMO.for_decoding stores the experts output x input (the same values) and a few tokens without gradient
    take moe_mlp_decode: the logits equal the training layout's, and greedy decoding with the KV cache gives the
    same tokens."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, eos_id=63, seq_len=32, n_layer=2, n_head=2, d_model=32, n_experts=8,
                      top_k=3, expert_hidden=16)
    trained = EMO(cfg).to(dtype).eval()
    decoding = EMO(cfg).to(dtype).eval()
    decoding.load_state_dict(trained.state_dict())
    decoding.for_decoding()
    moe = decoding.layers[0].moe
    assert moe.decoding and moe.w_up_gate.stride()[1:] == (1, 32) and torch.equal(moe.w_up_gate,
                                                                                   trained.layers[0].moe.w_up_gate)
    idx = torch.randint(0, 63, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(decoding(idx), trained(idx), rtol=1e-5 if dtype == torch.float32 else 2e-2,
                                   atol=1e-5 if dtype == torch.float32 else 2e-2)
    if dtype == torch.float32:
        assert torch.equal(decoding.generate(idx, 8, temperature=0), trained.generate(idx, 8, temperature=0))


def test_decode_path_equals_the_loop():
    for N in (0, 1, 2, 5):
        x, w_up_gate, w_down, weights, experts = (t.detach() for t in problem(N, 16, 24, 8, 3, seed=N))
        torch.testing.assert_close(moe_mlp_decode(x, w_up_gate, w_down, weights, experts),
                                   moe_mlp_loop(x, w_up_gate, w_down, weights, experts), rtol=1e-5, atol=1e-6)
