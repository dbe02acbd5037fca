"""How many matrix multiplications a model launches: on a GPU, thin matmuls cost launches and memory
traffic more than FLOPs, so the count is pinned, not just the FLOPs.

matmul_calls() compiles the model with a counting backend (Dynamo full graph, then AOTAutograd's
aten-level forward and backward graphs) and counts the calls of MATMULS in each. Attention itself
(one fused scaled-dot-product op) is not a matmul call here. A residual operator's count is pinned by
adding it to FORWARD below.
"""
import collections

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from model import GPT, GPTConfig

MATMULS = ('mm', 'addmm', 'bmm', 'baddbmm', 'matmul', 'linear')   # aten op names


def matmul_calls(model, idx, targets=None):
    """{'forward': n, 'backward': m}: the matmul calls in the compiled graphs of model(idx, targets)
    (backward only when targets are given and the loss is back-propagated)."""
    counts = collections.Counter()

    def counter(graph):
        def compiler(gm, example_inputs):
            for node in gm.graph.nodes:
                packet = getattr(node.target, 'overloadpacket', None)
                if node.op == 'call_function' and getattr(packet, '__name__', None) in MATMULS:
                    counts[graph] += 1
            return make_boxed_func(gm.forward)
        return compiler
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True,
                             backend=aot_autograd(fw_compiler=counter('forward'), bw_compiler=counter('backward')))
    _, loss, _ = compiled(idx, targets, return_logits=targets is None)
    if targets is not None:
        loss.backward()
    torch._dynamo.reset()
    return dict(forward=counts['forward'], backward=counts['backward'])


# matmul calls of the compiled forward of a 2-layer model (4 sublayers). Vanilla: per block qkv, the
# attention output, fc and the MLP output, then the head: 4 x 2 + 1. The ledger adds four per sublayer
# (Ledger.gates: one batched product down, one up; P down and up): 9 + 4 x 4. Computed one map at a
# time, as the equations read, it was 53 (eleven per sublayer).
FORWARD = {'vanilla': 9, 'ledger': 25}


@pytest.mark.parametrize('residual', sorted(FORWARD))
def test_matmul_calls_of_the_compiled_model(residual):
    """The forward count is pinned per operator; each forward matmul has two in the backward (the
    gradients of its input and of its weight; the token ids need none)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, residual=residual,
                          ledger_rank=8))
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    calls = matmul_calls(model, idx, idx)
    assert calls == dict(forward=FORWARD[residual], backward=2 * FORWARD[residual])


def test_the_counter_sees_every_kind_of_matmul():
    """Control: a module with one of each (F.linear with and without bias, @ on 2-D and 3-D, bmm,
    baddbmm) counts 6, and the same module without them counts 0."""
    class Six(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4))
            self.b = torch.nn.Parameter(torch.randn(4))

        def forward(self, x, targets=None, return_logits=True):
            a = torch.nn.functional.linear(x, self.w, self.b) + torch.nn.functional.linear(x, self.w)
            m = x[0] @ self.w
            batched = x @ self.w
            y = torch.bmm(batched, x.transpose(1, 2)) + torch.baddbmm(x[:, :, :1], x, x.transpose(1, 2)[:, :, :1])
            return None, a.sum() + m.sum() + y.sum(), {}

    class Zero(Six):
        def forward(self, x, targets=None, return_logits=True):
            return None, (x * self.w[0] + self.b).sum(), {}
    x = torch.randn(2, 3, 4)
    assert matmul_calls(Six(), x)['forward'] == 6
    assert matmul_calls(Zero(), x)['forward'] == 0
