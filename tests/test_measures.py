"""What the probe measures beyond the census, on tiny CPU models whose answer is known by construction.
Also: float64 models run an observed forward."""
import numpy as np
import pytest
import torch

from lab import measure
from model import GPT, GPTConfig

V = 256


def tokens(n=4, t=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, t), generator=g)

# ----------------------------------------------------------------------------------------------
# float64 models


@pytest.mark.parametrize('softmax', ['softmax', 'clipped', 'sigmoid', 'relu'])
def test_a_float64_model_runs_observed_and_matches_float32(softmax):
    """model.Attention.explicit returns the model's dtype: a float64 model runs every observed forward
    (lab.measure.measure: explicit attention, every observer hook) and the explicit weightings."""
    torch.manual_seed(0)
    m32 = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=V, attn_softmax=softmax)).eval()
    m64 = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=V, attn_softmax=softmax)).eval()
    m64.load_state_dict(m32.state_dict())
    m64.double()
    x = tokens(n=2, t=20)
    y = torch.roll(x, -1, 1)
    with torch.no_grad():
        l32, l64 = m32(x)[0], m64(x)[0]
    assert l64.dtype == torch.float64
    torch.testing.assert_close(l64.float(), l32, rtol=1e-4, atol=1e-5)
    r32, _ = measure.measure(m32, x, y)
    r64, _ = measure.measure(m64, x, y)
    assert r64['val_loss'] == pytest.approx(r32['val_loss'], rel=1e-5)
    np.testing.assert_allclose(r64['attention']['alpha1'], r32['attention']['alpha1'], rtol=1e-4, atol=1e-6)
