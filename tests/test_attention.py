"""The attention variants that let a head do nothing (docs/reference.md §1.6): identities between them,
explicit path = fast path, causality, gradients to every new parameter, torch.compile, the probe's
do-nothing channels by hand, and checkpoints that resume exactly and probe by name. Off (every
flag at its default) is the model of before: tests/test_model.py's golden logits (to a stated
tolerance; bitwise checks only compare two computations in one process, e.g. n_registers=0 against
the default model)."""
import json
import os

import pytest
import torch

import probe
from lab import measure
import train
from lab.report import attention_label
from lab.weightings import ATTENTION_VARIANTS
from model import GPT, GPTConfig, Observer

V, BLOCK = 64, 16
VARIANTS = {name: flags for name, flags in ATTENTION_VARIANTS.items() if flags}   # every one but plain softmax
FAST = ['attn_bias', 'plus_one', 'gate_headwise', 'gate_elementwise', 'registers']   # SDPA unless observed


def make(seed=0, residual='vanilla', **flags):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=V, residual=residual,
                         ledger_rank=8, **flags)).eval()


def tokens(B=2, T=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


class Watch(Observer):
    """Asks for the explicit attention path and keeps what it hands over."""
    attention = True

    def __init__(self):
        self.att, self.extra = {}, {}

    def on_attention(self, layer, q, k, v, att, extra=None):
        self.att[layer], self.extra[layer] = att, extra


def test_plus_one_is_attn_bias_with_zero_slot():
    """Softmax plus one = an extra key and value fixed at 0: the same model with attn_bias and k' = v' = 0
    gives the same logits, on the fast path and on the explicit one."""
    bias, plus = make(attn_bias=True), make(attn_softmax='plus_one')
    with torch.no_grad():
        for sub in bias.sublayers[::2]:
            sub.fn.slot.zero_()
    plus.load_state_dict({k: v for k, v in bias.state_dict().items() if not k.endswith('.slot')})
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(bias(x)[0], plus(x)[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(bias(x, observer=Watch())[0], plus(x, observer=Watch())[0], atol=1e-6, rtol=0)
        assert (bias(x)[0] - make()(x)[0]).abs().max() > 1e-3      # control: a slot is not nothing


def test_clipped_with_gamma_0_zeta_1_is_softmax():
    clipped = make(attn_softmax='clipped', clip_gamma=0.0, clip_zeta=1.0)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(clipped(x)[0], make()(x)[0], atol=1e-5, rtol=0)
        assert (make(attn_softmax='clipped', clip_gamma=-0.2)(x)[0] - make()(x)[0]).abs().max() > 1e-4   # control


@pytest.mark.parametrize('kind', ['headwise', 'elementwise'])
def test_a_gate_forced_open_is_no_gate(kind):
    gated = make(attn_gate=kind)
    for sub in gated.sublayers[::2]:                 # sigmoid(100) is 1.0 in fp32
        out = sub.fn.gate.out_features
        sub.fn.gate = torch.nn.Linear(32, out)
        torch.nn.init.zeros_(sub.fn.gate.weight)
        torch.nn.init.constant_(sub.fn.gate.bias, 100.0)
    plain = make()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if '.gate.' not in k})
    x = tokens()
    with torch.no_grad():
        assert torch.equal(gated(x)[0], plain(x)[0])
        assert (make(attn_gate=kind)(x)[0] - plain(x)[0]).abs().max() > 1e-3    # control: its own gate is not open


def test_no_registers_is_the_default_model():
    x = tokens()
    with torch.no_grad():
        assert torch.equal(make(n_registers=0)(x)[0], make()(x)[0])
        assert (make(n_registers=1)(x)[0] - make()(x)[0]).abs().max() > 1e-4   # control


@pytest.mark.parametrize('name', FAST)
@pytest.mark.parametrize('residual', ['vanilla', 'ledger'])
def test_the_explicit_path_equals_the_fast_path(name, residual):
    model = make(residual=residual, **VARIANTS[name])
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x, observer=Watch())[0], model(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_causality_and_gradients_of_every_variant(name):
    """Logits at t do not change when tokens after t change; every new parameter gets a gradient."""
    model = make(**VARIANTS[name])
    a = tokens(1, 12)
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % V
    with torch.no_grad():
        la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[:, :6], lb[:, :6], atol=1e-6, rtol=0)
    assert (la[:, 6:] - lb[:, 6:]).abs().max() > 1e-4
    model.train()
    _, loss, _ = model(tokens(), tokens(seed=1))
    loss.backward()
    new = {n: p for n, p in model.named_parameters()
           if n == 'registers' or '.slot' in n or '.gate.' in n or '.weighting.' in n}
    assert bool(new) == (name in ('attn_bias', 'registers', 'sink_logit') or name.startswith('gate'))
    for n, p in new.items():
        assert p.grad is not None and p.grad.abs().max() > 0, n


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_every_variant_compiles_fullgraph(name):
    """torch.compile(fullgraph=True) (aot_eager, as tests/test_model.py) matches eager, forward and backward."""
    model = make(residual='ledger', **VARIANTS[name]).train()
    x, y = tokens(2, 8), tokens(2, 8, seed=1)
    logits, loss, _ = model(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    logits_c, loss_c, _ = torch.compile(model, fullgraph=True, backend='aot_eager')(x, y)
    loss_c.backward()
    torch._dynamo.reset()
    torch.testing.assert_close(logits_c, logits, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_the_probe_measures_the_do_nothing_channels_by_hand():
    """With q = 0 every query attends uniformly to what it sees. Query t (0-based) of a plus_one model
    sees t + 1 keys and the zero slot: the slot gets 1/(t + 2); with 3 registers, the registers get
    3/(t + 4); a relu row with q = 0 has total weight 0 (the head does nothing)."""
    def q_zero(model):
        with torch.no_grad():
            for sub in model.sublayers[::2]:
                sub.fn.qkv.weight[:32].zero_()
        return model
    T = 10
    t = torch.arange(T, dtype=torch.float64)
    x = tokens(3, T)
    for flags, channel, want in ((dict(attn_softmax='plus_one'), 'slot', (1 / (t + 2)).mean()),
                                 (dict(n_registers=3), 'registers', (3 / (t + 4)).mean()),
                                 (dict(attn_softmax='relu'), 'total', torch.tensor(0.0))):
        result, _ = measure.measure(q_zero(make(**flags)), x, x)
        d = result['attention']['do_nothing']
        assert list(d) == [channel]
        for row in d[channel]['mean']:
            assert row == pytest.approx([float(want)] * 2, abs=1e-6), (flags, row)
        assert d[channel]['trigger'] is None                        # no task on these tokens
    assert make()(x)[0] is not None and measure.measure(make(), x, x)[0]['attention']['do_nothing'] is None


def test_registers_are_not_in_the_statistics_but_have_their_own_rows():
    """Position 0 of every statistic is the first token of the input, not a register; the register
    slots are reported apart, per sublayer and register."""
    model = make(n_registers=2)
    x = tokens(2, 12)
    watch = Watch()
    with torch.no_grad():
        model(x, observer=watch)
    assert watch.att[0].shape == (2, 2, 12, 12)                       # data queries x data keys
    torch.testing.assert_close(watch.att[0].sum(-1) + watch.extra[0]['registers'], torch.ones(2, 2, 12))
    result, _ = measure.measure(model, x, x)
    regs = result['streams']['h']['registers']
    assert len(regs['max_abs']) == 4 and len(regs['max_abs'][0]) == 2
    assert result['streams']['h']['per_sublayer']['start_mass'][0] > 0


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    from conftest import write_random_shards
    return write_random_shards(tmp_path_factory.mktemp('data'), 'text', V, 6000, 2000)


@pytest.fixture
def in_process():
    """train() sets torch's deterministic-algorithms flag on the CPU; put it back afterwards."""
    state = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_a_variant_resumes_exactly_and_probes_by_name(name, data_root, tmp_path, capsys, in_process):
    flags = [f'--{k}={v}' for k, v in VARIANTS[name].items()]
    base = [f'--data_root={data_root}', '--dataset=text', '--n_layer=2', '--n_head=2', '--n_embd=16',
            f'--vocab_size={V}', '--block_size=16', '--batch_size=4', '--total_batch_size=64', '--eval_interval=2',
            '--eval_iters=1', '--stats_seqs=2', '--warmup_iters=1', '--device=cpu', '--compile=False',
            '--residual=ledger', '--ledger_rank=4'] + flags
    assert train.main(base + [f'--out_dir={tmp_path / "whole"}', '--max_iters=4']) == 0
    assert train.main(base + [f'--out_dir={tmp_path / "cut"}', '--max_iters=2']) == 0
    assert train.main([f'--out_dir={tmp_path / "cut"}', '--init_from=resume', '--max_iters=4']) == 0
    whole, cut = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True)['model'] for d in ('whole', 'cut'))
    assert whole.keys() == cut.keys()
    for k in whole:
        assert torch.equal(whole[k], cut[k]), k
    capsys.readouterr()
    assert probe.main([str(tmp_path / 'cut' / 'ckpt.pt'), '--out', str(tmp_path / 'p'), '--num_seqs', '2']) == 0
    text = capsys.readouterr().out
    label = attention_label(VARIANTS[name])
    assert f'attention {label}' in text
    r = json.loads((tmp_path / 'p' / 'probe.json').read_text())['checkpoints'][0]
    assert r['kind'] == f'ledger, attention {label}'
    assert (r['attention']['do_nothing'] is None) == (name in ('clipped',))
    assert os.path.getsize(tmp_path / 'p' / 'cut_alpha1.png') > 1000


@pytest.mark.parametrize('flags, words', [
    (dict(attn_softmax='softmax1'), 'attn_softmax'),
    (dict(attn_gate='channel'), 'attn_gate'),
    (dict(attn_softmax='clipped', clip_gamma=0.1), 'clip_gamma <= 0'),
    (dict(attn_softmax='clipped', clip_zeta=0.9), 'clip_zeta >= 1'),
    (dict(attn_bias=True, attn_softmax='plus_one'), 'both add a slot'),
    (dict(n_registers=-1), 'n_registers must be >= 0'),
])
def test_bad_variant_flags_are_config_errors(flags, words, one_line_error, capsys):
    with pytest.raises(ValueError, match=words):
        GPTConfig(**flags)
    assert train.main([f'--{k}={v}' for k, v in flags.items()]) == 2
    one_line_error(capsys.readouterr().err, 'train.py', words)


def test_a_sink_logit_at_minus_infinity_is_softmax_and_at_zero_is_plus_one():
    """gpt-oss's learnt sink logit per head: a_ij = exp(s_ij) / (exp(z_h) + sum_j' exp(s_ij')), the
    same model as softmax when z_h -> -inf and as softmax plus one at z_h = 0 (its init); in between
    the head's rows sum to 1 / (1 + exp(z_h) / sum exp(s)) < 1, and z_h learns."""
    sink = make(attn_softmax='sink_logit')
    plus = make(attn_softmax='plus_one')
    plain = make()
    state = {k: v for k, v in sink.state_dict().items() if not k.endswith('weighting.logit')}
    plus.load_state_dict(state)
    plain.load_state_dict(state)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(sink(x)[0], plus(x)[0], atol=1e-6, rtol=0)          # z = 0
        for sub in sink.sublayers[::2]:
            sub.fn.weighting.logit.fill_(-1e4)
        torch.testing.assert_close(sink(x)[0], plain(x)[0], atol=1e-6, rtol=0)         # z -> -inf
        scores = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(2))
        for sub in sink.sublayers[::2]:
            sub.fn.weighting.logit.copy_(torch.tensor([0.5, -1.0]).view(2, 1, 1))
        mask = torch.ones(5, 5, dtype=torch.bool).tril()
        got = sink.sublayers[0].fn.weighting(scores.clone(), mask).double()
        e = scores.double().exp() * mask
        want = e / (torch.tensor([0.5, -1.0], dtype=torch.float64).exp().view(2, 1, 1) + e.sum(-1, keepdim=True))
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
    sink.train()
    _, loss, _ = sink(tokens(), tokens(seed=1))
    loss.backward()
    assert sink.sublayers[0].fn.weighting.logit.grad.abs().max() > 0


def test_softpick_against_its_formula_with_rows_of_zeros():
    """Softpick: a_ij = relu(exp(s_ij) - 1) / (sum_j' |exp(s_ij') - 1| + eps) over the visible keys, in
    float64 by hand on random non-zero scores with a causal mask; masked entries 0, and a row whose
    scores are all negative is all zeros (the head does nothing)."""
    from lab.weightings import WEIGHTINGS
    from model import attention_mask
    weighting = WEIGHTINGS['softpick'](GPTConfig(n_layer=1, n_head=2, n_embd=8))
    scores = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(4)) * 2
    scores[0, 0, 3, :4] = -torch.rand(4) - 0.1               # row 3 sees keys 0..3, all negative
    mask = attention_mask(6, 0, 'cpu')
    got = weighting(scores.clone(), mask).double()
    e = (scores.double().exp() - 1) * mask
    want = torch.relu(e) / (e.abs().sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    assert (got[..., ~mask] == 0).all() and (got[0, 0, 3] == 0).all()
    assert ((got > 0) & mask).any() and (got.sum(-1) <= 1 + 1e-6).all()
