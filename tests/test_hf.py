"""hf.py: any Hugging Face causal LM read by the probe (docs/reference.md §4.9). CPU, offline: tiny random
models built from each family's transformers config (LLaMA, Mistral, Qwen2, Qwen3, GPT-NeoX/Pythia parallel and
sequential, OPT pre- and post-norm, GPT-2, Phi), checked against what transformers itself computes; tiny
tokenizers trained on the spot; revisions served from a local hub cache with HF_HUB_OFFLINE=1.

transformers is a test-only dependency (.ci/run installs it): this file skips when it is missing, except under
CI (env CI set), where a missing transformers is a failure.
"""
import copy
import json
import os
import sys
import time

import numpy as np
import pytest
import torch

from lab import hf, measure
import probe
from keytree import check_keys, documented_keys
from lab.gpt2 import load_gpt2
from model import GPT, GPTConfig

if os.environ.get('CI'):
    import transformers  # CI must run these tests: a missing transformers fails, it does not skip
else:
    transformers = pytest.importorskip('transformers')

V, CTX, D, L, H = 320, 64, 32, 2, 4
N, T = 3, 20
BOS_ID, CH = 5, 7          # the planted outlier: token BOS_ID, always at position 0, channel CH


def family_config(family):
    t, common = transformers, dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                                   max_position_embeddings=CTX)
    llama_like = dict(common, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=False)
    return {
        'llama': lambda: t.LlamaConfig(**llama_like),
        'mistral': lambda: t.MistralConfig(**llama_like, sliding_window=8),         # a window shorter than T
        'qwen2': lambda: t.Qwen2Config(**llama_like),
        'qwen3': lambda: t.Qwen3Config(**llama_like, head_dim=8),                   # QK-norm
        'gpt_neox': lambda: t.GPTNeoXConfig(**common, intermediate_size=64, rotary_pct=0.25),   # Pythia: parallel
        'gpt_neox_seq': lambda: t.GPTNeoXConfig(**common, intermediate_size=64, use_parallel_residual=False),
        'opt': lambda: t.OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=D),
        'opt_post': lambda: t.OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=D, do_layer_norm_before=False),
        'gpt2': lambda: t.GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=CTX),
        'phi': lambda: t.PhiConfig(**common, intermediate_size=64, partial_rotary_factor=0.5),   # parallel, one norm
    }[family]()


FAMILIES = ['llama', 'mistral', 'qwen2', 'qwen3', 'gpt_neox', 'gpt_neox_seq', 'opt', 'opt_post', 'gpt2', 'phi']


def tiny_lm(family, seed=0, plant=None, token=BOS_ID):
    """A random transformers causal LM (eval): matrices N(0, 0.1), norm weights 1 + N(0, 0.2), biases
    N(0, 0.2), so that nothing is trivially 0 or 1. plant: embedding[token, CH] = plant."""
    torch.manual_seed(seed)
    lm = transformers.AutoModelForCausalLM.from_config(family_config(family)).eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
            else:
                p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.2 * torch.randn_like(p))
        if plant is not None:
            lm.get_input_embeddings().weight[token, CH] = plant
    return lm


def tokens(n=N, t=T, seed=0):
    """Random ids, BOS_ID at position 0 and nowhere else."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(BOS_ID + 1, V, (n, t + 1), generator=g)
    x[:, 0] = BOS_ID
    return x[:, :-1], x[:, 1:]


def reference(lm):
    """An untouched copy of lm with transformers' own eager attention, and hooks that record what each
    block computes: its input, attention output, attention input, MLP input, the post-norm mid stream."""
    ref = copy.deepcopy(lm)
    ref.set_attn_implementation('eager')
    layers_path, attn_name, mlp_name, mid = hf.layout(ref.config)
    rec = {}

    def keep(key, i, pick):
        return lambda mod, args, kwargs, *out: rec.__setitem__((key, i), pick(args, kwargs, out).detach().clone())

    for i, block in enumerate(hf._get(ref, layers_path)):
        first = lambda a, k, o: a[0] if a else k['hidden_states']
        block.register_forward_pre_hook(keep('in', i, first), with_kwargs=True)
        block.register_forward_hook(keep('out', i, lambda a, k, o: o[0][0] if isinstance(o[0], tuple) else o[0]),
                                    with_kwargs=True)
        attn = getattr(block, attn_name)
        attn.register_forward_pre_hook(keep('u_attn', i, first), with_kwargs=True)
        attn.register_forward_hook(keep('attn', i, lambda a, k, o: o[0][0]), with_kwargs=True)
        hf._get(block, mlp_name).register_forward_pre_hook(keep('u_mlp', i, first), with_kwargs=True)
        if mid.startswith('post:'):
            hf._get(block, mid[5:]).register_forward_hook(keep('mid', i, lambda a, k, o: o[0]), with_kwargs=True)
    return ref, rec


class Recorder(measure.Capture):
    """Capture, plus the attention probabilities the adapter hands to on_attention."""
    attention = True

    def __init__(self):
        super().__init__()
        self.att = {}

    def on_attention(self, layer, q, k, v, att, extra=None, visible0=None):
        assert q.shape == k.shape == v.shape and q.shape[1] == H      # k, v per query head (GQA repeated)
        self.att[layer] = att.detach().clone()
        self.visible0 = visible0

# -----------------------------------------------------------------------------
# the adapter computes what transformers computes


@pytest.mark.parametrize('family', FAMILIES)
def test_streams_inputs_logits_and_attention_equal_transformers(family):
    lm = tiny_lm(family)
    ref, rec = reference(lm)
    model = hf.wrap(lm)
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd, model.config.block_size,
            model.config.vocab_size, model.config.residual) == (L, H, D, CTX, V, 'vanilla')
    assert model.config.qk_norm == (family == 'qwen3') and model.config.parallel == (family in ('gpt_neox', 'phi'))
    assert model.config.norm_position == ('post' if family == 'opt_post' else 'pre')
    x, y = tokens()
    obs = Recorder()
    with torch.no_grad():
        logits, loss, aux = model(x, y, observer=obs)
        out = ref(x, output_hidden_states=True, output_attentions=True)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, out.logits, **close)
    want_loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    assert aux == {} and abs(loss.item() - want_loss.item()) < 1e-5
    h = obs.streams['h']
    assert sorted(h) == list(range(2 * L)) and sorted(obs.inputs) == list(range(2 * L))
    for i in range(L):
        mid = rec[('mid', i)] if family == 'opt_post' else rec[('in', i)] + rec[('attn', i)]   # §4.9's attn row
        torch.testing.assert_close(h[2 * i], mid, **close)
        torch.testing.assert_close(h[2 * i + 1], rec[('out', i)], **close)
        if i < L - 1:                                      # the last hidden state is after the final norm
            torch.testing.assert_close(h[2 * i + 1], out.hidden_states[i + 1], **close)
        torch.testing.assert_close(obs.inputs[2 * i], rec[('u_attn', i)], **close)
        torch.testing.assert_close(obs.inputs[2 * i + 1], rec[('u_mlp', i)].view(N, T, D), **close)
        torch.testing.assert_close(obs.att[i], out.attentions[i], **close)   # the probabilities transformers returns
    sees0 = torch.arange(T) < (8 if family == 'mistral' else T)   # the queries whose mask lets them see key 0
    if family == 'mistral':                                # the sliding window reached the probe's maps
        assert obs.att[0][:, :, 8:, 0].abs().max() == 0 and obs.att[0][:, :, :8, 0].min() > 0
        assert torch.equal(obs.visible0, sees0.expand(N, T))
    else:
        assert obs.visible0 is None
    result, _ = measure.measure(model, x, y)
    for i in range(L):
        want = out.attentions[i][..., 0][..., sees0]       # alpha_1: the mean of A[t, 0] over the queries that see key 0
        np.testing.assert_allclose(result['attention']['alpha1'][i], want.mean(-1).mean(0).numpy(), atol=1e-6)
    assert abs(result['val_loss'] - loss.item()) < 1e-5


def test_alpha1_of_a_sliding_window_averages_the_queries_that_see_key_0():
    """A tiny Mistral with a window of 8 at T = 42: only queries 0..7 can see position 0. alpha_1 is the mean
    of A[t, 0] over them (Gu et al.: over the queries that attend causally to the key), checked by hand from
    transformers' eager attention (output_attentions) and the window; the mean over all 42 queries (the
    probe before) is 0 for 34 of them by construction and would report about 8/42 of it."""
    lm = tiny_lm('mistral')
    assert lm.config.sliding_window == 8
    ref, _ = reference(lm)
    model = hf.wrap(lm)
    x, y = tokens(t=42)
    with torch.no_grad():
        out = ref(x, output_attentions=True)
    t = torch.arange(42)
    sees0 = (t - 0) < lm.config.sliding_window           # the window of query t holds keys t-7..t
    result, _ = measure.measure(model, x, y)
    a = result['attention']
    for i in range(L):
        a0 = out.attentions[i][..., 0].double()                                      # (N, H, T)
        assert a0[..., ~sees0].abs().max() == 0 and a0[..., sees0].min() > 0
        want = a0[..., sees0].mean(-1).mean(0).numpy()
        np.testing.assert_allclose(a['alpha1'][i], want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a['alpha1_prefix'][i], want, rtol=1e-5, atol=1e-7)   # T < 64: the same queries
        old = a0.mean(-1).mean(0).numpy()                                            # the mean over all queries
        np.testing.assert_allclose(old, want * 8 / 42, rtol=1e-6)
        assert old.max() < 0.1 < 0.3 < want.min()          # random weights: ~0.06 before, ~0.33 now


@pytest.mark.parametrize('family', FAMILIES)
def test_super_weight_fp16_and_sink_kinds_of_every_family(family):
    """The super-weight search reads each family's MLP down-projection (hf.DOWN_PROJ): its candidates equal
    a computation by hand from the reference model's own down-projection; fp16 and the sink kinds are there."""
    lm = tiny_lm(family, plant=1e4)
    ref, _ = reference(lm)
    model = hf.wrap(lm)
    x, y = tokens()
    result, obs = measure.measure(model, x, y)
    sw = result['super_weight']
    assert sw['note'] is None and [c['sublayer'] for c in sw['candidates']] == [1, 3]
    layers_path = hf.layout(lm.config)[0]
    for c in sw['candidates']:
        block = hf._get(ref, layers_path)[c['sublayer'] // 2]
        down = hf._get(block, hf.DOWN_PROJ[lm.config.model_type])
        seen = {}
        handle = down.register_forward_hook(lambda m, a, o: seen.update(inp=a[0].reshape(N, T, -1), out=o.reshape(N, T, -1)))
        with torch.no_grad():
            ref(x)
        handle.remove()
        out, inp = seen['out'].abs(), seen['inp'].abs()
        b, t, i = np.unravel_index(int(out.argmax()), out.shape)
        assert (c['seq'], c['position'], c['row'], c['column']) == (b, t, i, int(inp[b, t].argmax()))
        w = down.weight if isinstance(down, torch.nn.Linear) else down.weight.T       # GPT-2's Conv1D: (in, out)
        assert c["weight"] == pytest.approx(float(w.detach()[i, c["column"]]), rel=1e-6)
        assert c['in_max'] == pytest.approx(float(inp.max()), rel=1e-6)
    cap = measure.Capture()
    with torch.no_grad():
        model(x, observer=cap)
    top = max(float(t.abs().max()) for t in cap.streams['h'].values())
    f = result['fp16']
    assert f['max_abs'] == pytest.approx(top, rel=1e-6) and f['headroom'] == pytest.approx(65504 / top, rel=1e-6)
    if family != 'opt_post':                               # post-norm: the stream is normalised after each sublayer
        assert f['max_abs'] > 9e3 and (f['position'], f['channel']) == (0, CH)
    assert set(result['attention']['sink_kinds']) == {'thresholds', 'heads'}
    assert np.array(result['attention']['erank']).shape == (L, H)
    if family == 'opt':        # its MLP runs on (B*T, d): W8A8's one scale per sequence must not see the batch
        losses = []
        for bs in (1, N):
            act = measure.QuantizedInputs(8)
            with measure.w8a8(model, act):
                loss, count, _, _ = measure.run_passes(model, x, y, measure.Measure(False, False, edit=act), bs)
            losses.append(loss / count)
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize('family', ['llama', 'gpt_neox', 'opt', 'gpt2', 'phi'])
def test_planted_outlier_is_found_at_its_position_and_channel(family):
    x, y = tokens()
    census = {}
    for plant in (None, 1e4):
        census[plant] = measure.measure(hf.wrap(tiny_lm(family, plant=plant)), x, y)[0]['streams']['h']['summary']
    assert census[None]['largest_massive'] is None               # control: the random model has none
    s = census[1e4]
    assert (s['largest_massive']['position'], s['largest_massive']['channel']) == (0, CH)
    assert s['massive_channels'] == [[CH, N * 2 * L]] and s['massive_positions'] == [[0, N * 2 * L]]
    assert s['emergence_sublayer'] == 0 and s['pos0_massive_channels'] == [CH]


@pytest.mark.parametrize('family', ['llama', 'opt', 'gpt_neox'])
def test_interventions_apply_where_the_block_holds_the_stream(family):
    lm = tiny_lm(family, plant=1e4)
    ref, rec = reference(lm)
    model = hf.wrap(lm)
    x, y = tokens()
    layers_path, attn_name, mlp_name, mid = hf.layout(lm.config)
    block0 = hf._get(ref, layers_path)[0]

    def ref_logits(hook_on, kind, fn):
        handle = getattr(hook_on, f'register_forward_{kind}')(fn)
        try:
            with torch.no_grad():
                return ref(x).logits
        finally:
            handle.remove()

    def zero_at_0(t):
        t = t.clone()
        t.view(N, T, D)[:, 0, CH] = 0
        return t

    entries = {'h': (torch.arange(N), torch.zeros(N, dtype=torch.long), torch.full((N,), CH), torch.zeros(N))}
    # the block output (mlp row s = 1): every family holds it
    with torch.no_grad():
        got = model(x, observer=measure.Intervention(1, entries))[0]
    want = ref_logits(block0, 'hook', lambda m, a, o: zero_at_0(o[0] if isinstance(o, tuple) else o))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # soften the MLP's input at position 0: every family hands it over
    with torch.no_grad():
        got = model(x, observer=measure.Intervention(1, soften_k=1))[0]

    def soften(m, args):
        u = args[0].clone().view(N, T, D)
        top = u[:, 0].abs().argmax(-1)
        u[torch.arange(N), 0, top] = 0
        return (u.view(args[0].shape),) + args[1:]
    torch.testing.assert_close(got, ref_logits(hf._get(block0, mlp_name), 'pre_hook', soften), atol=1e-5, rtol=1e-5)
    # the stream after attention (attn row s = 0): held by sequential blocks, only a partial sum in parallel ones
    result, obs = measure.measure(model, x, y)
    iv = measure.run_interventions(model, x, y, result, obs)
    assert iv['zero']['sublayer'] == 0 and iv['soften']['val_loss'] is not None
    if family == 'gpt_neox':
        for name in ('zero', 'mean'):
            assert iv[name]['val_loss'] is None and iv[name]['target'].startswith('does not apply: a parallel block')
        with pytest.raises(ValueError, match='parallel block'):     # and never a silent wrong number
            model(x, observer=measure.Intervention(0, entries))
        return

    def attn_zeroing(m, a, o):                 # h + a' = 0 at (0, CH): a' = -h there
        a = o[0].clone()
        a.view(N, T, D)[:, 0, CH] = -rec[('in', 0)].view(N, T, D)[:, 0, CH]
        return (a,) + tuple(o[1:])
    want = ref_logits(getattr(block0, attn_name), 'hook', attn_zeroing)
    with torch.no_grad():
        got = model(x, observer=measure.Intervention(0, entries))[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ce = torch.nn.functional.cross_entropy(want.flatten(0, 1), y.flatten()).item()
    assert abs(iv['zero']['val_loss'] - ce) < 1e-5 and iv['zero']['n_entries'] == N


def test_gpt2_via_transformers_agrees_with_our_gpt2_loader(tmp_path):
    from test_gpt2 import save_tiny_gpt2
    save_tiny_gpt2(tmp_path, n_layer=2, n_head=2, n_embd=32, plant=(CH, 1e4))
    ours = load_gpt2(str(tmp_path))[0]
    src = hf.parse(f'hf:{tmp_path}')
    theirs = hf.load_model(src, hf.load_config(src))
    x, y = tokens(t=32)
    a, b = measure.measure(ours, x, y)[0], measure.measure(theirs, x, y)[0]
    assert abs(a['val_loss'] - b['val_loss']) < 1e-5
    np.testing.assert_allclose(np.array(a['attention']['alpha1']), np.array(b['attention']['alpha1']), atol=1e-6)
    pa, pb = a['streams']['h']['per_sublayer'], b['streams']['h']['per_sublayer']
    for key in ('top1', 'top2', 'top3', 'median', 'top1_median', 'kurtosis', 'feat_maxmed', 'n_out50', 'start_mass'):
        np.testing.assert_allclose(pa[key], pb[key], rtol=1e-5, err_msg=key)
    for key in ('n_massive', 'top_channel'):
        assert pa[key] == pb[key], key
    sa, sb = a['streams']['h']['summary'], b['streams']['h']['summary']
    for key in ('dominant_dim', 'peak_layer', 'emergence_sublayer', 'massive_channels', 'massive_positions'):
        assert sa[key] == sb[key], key
    assert sb['massive_channels'][0][0] == CH

# -----------------------------------------------------------------------------
# the command line: tokenizers, BOS, the built-in corpus, one table, revisions as a run


def save_tokenizer(folder, bos):
    """A byte-level BPE of 300 tokens (<|endoftext|> 0, <s> 1, </s> 2) trained on a fixed text; bos=True
    puts <s> before every text, as LLaMA's tokenizer does, bos=False adds nothing, as Pythia's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = "def probe(model, x):\n    return model(x, observer=obs)  # massive activations and attention sinks\n"
    tk.train_from_iterator([text * 20], trainers.BpeTrainer(
        vocab_size=300, special_tokens=['<|endoftext|>', '<s>', '</s>'], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tk.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
    special = dict(bos_token='<s>', eos_token='</s>') if bos else \
        dict(bos_token='<|endoftext|>', eos_token='<|endoftext|>')
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **special).save_pretrained(folder)


def save_family(folder, family, bos, plant=None, token=BOS_ID):
    tiny_lm(family, plant=plant, token=token).save_pretrained(folder)
    save_tokenizer(folder, bos)
    return str(folder)


def test_checkpoint_llama_and_pythia_in_one_table(tmp_path, capsys, save_ckpt, random_shards):
    data = tmp_path / 'data'
    random_shards(data, 'builtin', V, 0, 5000)
    ours = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=CTX, vocab_size=V, residual='ledger'))
    ckpt = save_ckpt(ours, tmp_path / 'ledger' / 'ckpt.pt', data)
    llama = save_family(tmp_path / 'tiny-llama', 'llama', bos=True, plant=1e4, token=slice(None))   # CH is massive
    pythia = save_family(tmp_path / 'tiny-pythia', 'gpt_neox', bos=False, plant=1e4, token=slice(None))  # everywhere
    capsys.readouterr()
    out = tmp_path / 'out'
    args = [ckpt, f'hf:{llama}', f'hf:{pythia}', '--num_seqs', '2', '--seq_len', '24', '--data_root', str(data),
            '--out', str(out), '--interventions']
    assert probe.main(args) == 0
    o = capsys.readouterr()
    assert o.out.count('=== comparison ===') == 1 and 'revisions of' not in o.out
    assert sum('GFLOP per token' in line and 'a 7B model would take' in line for line in o.err.splitlines()) == 2
    js = json.loads((out / 'probe.json').read_text())
    check_keys(js, documented_keys('probe.json'), 'probe.json')
    assert js['comparison']['columns'] == ['ledger', 'tiny-llama', 'tiny-pythia']
    ours_r, llama_r, pythia_r = js['checkpoints']
    assert ours_r['weights'] is None and not ours_r['data']['bos_prepended']
    for r, name in ((llama_r, 'LlamaForCausalLM'), (pythia_r, 'GPTNeoXForCausalLM')):
        w = r['weights']
        assert w['kind'] == 'hf' and w['architecture'] == name and w['local'] and w['revision'] is None
        assert r['data']['source'] == 'val' and r['data']['seq_len'] == 24 and len(r['sublayers']) == 2 * L
        assert os.path.dirname(r['data']['shards'][0]) == str(data / 'hf' / 'windows')
    # the model's own BOS convention: LLaMA's tokenizer puts <s> (1) first, Pythia's nothing
    assert llama_r['data']['bos_prepended'] and llama_r['data']['bos'] == 1 and llama_r['data']['bos_at_pos0'] == 1.0
    assert not pythia_r['data']['bos_prepended'] and pythia_r['data']['bos'] == 0
    assert 'position 0 holds BOS (token 1) in 100% of sequences (<s> prepended' in o.out
    assert 'adds no BOS, so position 0 is an arbitrary token of the text; <|endoftext|> separates documents' in o.out
    assert 'parallel block: the attn row s = 2i is the partial sum' in o.out
    # the same passages of the built-in corpus: the Pythia windows read as text are the LLaMA ones without <s>
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    from lab.hf import corpus_windows
    xl = corpus_windows(tok, 2, 24, 1337, False, 1, 2, str(data))[0]
    xp = corpus_windows(tok, 2, 24, 1337, False, None, 2, str(data))[0]
    assert torch.equal(xl[:, 1:], xp[:, :-1]) and (xl[:, 0] == 1).all()
    # interventions: the parallel block's attn row cannot be edited, and says so
    iv = pythia_r['interventions']
    assert iv['zero']['sublayer'] == llama_r['interventions']['zero']['sublayer'] == 0
    assert iv['zero']['val_loss'] is None and 'does not apply' in iv['zero']['target'] and iv['quant8']['val_loss']
    assert llama_r['interventions']['zero']['val_loss'] is not None


def hub_cache(root, repo, revisions, token):
    """A Hugging Face hub cache as huggingface_hub lays it out: models--org--name/refs/<rev> holding a
    commit hash, snapshots/<hash>/ holding the files. revisions: {name: value planted on token, or None}."""
    folder = root / ('models--' + repo.replace('/', '--'))
    (folder / 'refs').mkdir(parents=True)
    for i, (rev, plant) in enumerate(revisions.items()):
        commit = f'{i + 1:040x}'
        save_family(folder / 'snapshots' / commit, 'gpt_neox', False, plant=plant, token=token)
        (folder / 'refs' / rev).write_text(commit)
    return root


def test_revisions_from_the_hub_cache_are_drawn_as_a_run(tmp_path, capsys, monkeypatch, cli, one_line_error):
    """Revisions resolved through the hub cache's refs/ offline; in this process with huggingface_hub's
    HF_HUB_CACHE and HF_HUB_OFFLINE set as the environment would set them (and the per-checkpoint
    PNGs, which test_probe.py covers, left out: they cost most of the time), then through the real
    command line with the environment variables for a revision the cache does not hold."""
    import huggingface_hub
    text = 'def probe(model, x): return model(x, observer=obs)'
    save_tokenizer(tmp_path / 'tok', bos=False)
    first = transformers.AutoTokenizer.from_pretrained(tmp_path / 'tok')(text)['input_ids'][0]   # at position 0
    cache = hub_cache(tmp_path / 'hub', 'test-org/tiny-pythia', {'step1000': None, 'step2000': 30.0, 'step3000': 3e4},
                      token=first)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(probe, 'plot_checkpoint', lambda *a: [])
    monkeypatch.setattr(probe, 'plot_overlay', lambda *a: [])
    out = tmp_path / 'out'
    capsys.readouterr()
    assert probe.main(['hf:test-org/tiny-pythia@step3000,step1000,step2000', '--text', text, '--out', str(out)]) == 0
    o = capsys.readouterr().out
    assert 'revisions of test-org/tiny-pythia as a run: steps 1000, 2000, 3000' in o
    run, = json.loads((out / 'trajectory.json').read_text())['runs']
    assert run['iters'] == [1000, 2000, 3000] and run['revisions'] == ['step1000', 'step2000', 'step3000']
    st = run['streams']['h']
    assert st['top1_median_max'][0] < st['top1_median_max'][1] < st['top1_median_max'][2]
    assert st['crossings']['1000']['iter'] == 3000 and st['n_massive_total'][0] == 0 < st['n_massive_total'][2]
    assert st['dominant']['channel'] == CH
    for png in ('trajectory_h.png', 'trajectory_loss.png', 'trajectory_heatmap_tiny-pythia.png'):
        assert (out / png).is_file(), png
    js = json.loads((out / 'probe.json').read_text())
    assert [c['name'] for c in js['checkpoints']] == ['tiny-pythia_step3000', 'tiny-pythia_step1000',
                                                      'tiny-pythia_step2000']
    assert [c['iter_num'] for c in js['checkpoints']] == [3000, 1000, 2000]
    w = js['checkpoints'][0]['weights']
    assert w['commit'] == f'{3:040x}'
    assert w['folder'] == str(cache / 'models--test-org--tiny-pythia' / 'snapshots' / w['commit'])
    assert probe.main(['hf:test-org/elsewhere', '--text', text, '--out', str(tmp_path / 'o2')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'hf:test-org/elsewhere: not in the Hugging Face cache' in err[0] and 'HF_HUB_OFFLINE' in err[0]
    env = dict(HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / 'home'), HF_HUB_OFFLINE='1')
    r = cli('probe.py', 'hf:test-org/tiny-pythia@step9999', '--text', text, '--out', tmp_path / 'o2', **env)
    assert r.returncode == 2
    one_line_error(r.stderr, 'probe.py', "revision 'step9999' not found in the Hugging Face cache",
                   'cached revisions: step1000, step2000, step3000')
    assert not (tmp_path / 'o2').exists()

# -----------------------------------------------------------------------------
# bad input: one line, exit code 2


def test_bad_hf_inputs_are_one_line(tmp_path, capsys, monkeypatch):
    def folder(name, config=None, family=None):
        f = tmp_path / name
        if family:
            save_family(f, family, bos=False)
        else:
            f.mkdir()
            if config is not None:
                config.save_pretrained(f)
        return str(f)

    t = transformers
    llama = folder('llama', family='llama')
    cases = [
        ('hf:' + folder('unknown', None), "no config.json"),
        ('hf:' + folder('encoder', t.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64)),
         'bert is an encoder-only model (bidirectional attention'),
        ('hf:' + folder('seq2seq', t.T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64)),
         't5 is an encoder-decoder model; the probe reads decoder-only'),
        ('hf:' + folder('bloom', t.BloomConfig(hidden_size=32, n_layer=1, n_head=2)),
         "unknown architecture for the probe: bloom; its adapter knows the block layouts of llama"),
        ('hf:' + llama + '@step5', "no revision 'step5' in"),
        ('hf:' + str(tmp_path / 'nowhere' / 'x'), 'no such folder'),
        ('hf:', 'expected hf:REPO_OR_FOLDER[@REVISION]'),
    ]
    broken = folder('broken', family='llama')                 # a tensor short of its config
    from safetensors.torch import load_file, save_file
    tensors = load_file(os.path.join(broken, 'model.safetensors'))
    del tensors['model.layers.1.mlp.up_proj.weight']
    save_file(tensors, os.path.join(broken, 'model.safetensors'), metadata={'format': 'pt'})
    cases.append(('hf:' + broken, 'the weights do not fit its config: no tensor for model.layers.1.mlp.up_proj.weight'))
    wrong = folder('wrong', family='llama')                   # a tensor of the wrong shape
    tensors = load_file(os.path.join(wrong, 'model.safetensors'))
    tensors['model.layers.0.mlp.up_proj.weight'] = tensors['model.layers.0.mlp.up_proj.weight'][:-1].clone()
    save_file(tensors, os.path.join(wrong, 'model.safetensors'), metadata={'format': 'pt'})
    shape = list(tensors['model.layers.0.mlp.up_proj.weight'].shape)
    cases.append(('hf:' + wrong, f"model.layers.0.mlp.up_proj.weight has shape {shape} in the file, "
                                 f"{[shape[0] + 1, shape[1]]} in a llama of this config"))
    no_weights = folder('no_weights', family='llama')
    os.remove(os.path.join(no_weights, 'model.safetensors'))
    cases.append(('hf:' + no_weights, 'no weights (model.safetensors or pytorch_model.bin) in'))
    (tmp_path / 'strange').mkdir()
    (tmp_path / 'strange' / 'config.json').write_text(json.dumps({'model_type': 'not-a-model'}))
    cases.append(('hf:' + str(tmp_path / 'strange'), "unknown architecture: transformers"))
    capsys.readouterr()
    for spec, words in cases:
        code = probe.main([spec, '--text', 'hello', '--out', str(tmp_path / 'o')])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith('probe.py: error:'), (spec, err)
        assert words in err[0], (words, err)
    code = probe.main(['hf:' + llama, 'hf:' + no_weights, '--text', 'hello', '--out', str(tmp_path / 'o')])
    err = capsys.readouterr().err.strip().splitlines()             # the second input is checked before the first runs
    assert code == 2 and len(err) == 1 and 'no weights (model.safetensors' in err[0]
    code = probe.main(['hf:' + llama, 'hf:' + wrong, '--text', 'hello', '--out', str(tmp_path / 'o')])
    err = capsys.readouterr().err.strip().splitlines()             # every tensor of a later input, before any work
    assert code == 2 and len(err) == 1 and 'up_proj.weight has shape' in err[0]
    code = probe.main(['hf:' + llama, '--seq_len', str(CTX + 1), '--out', str(tmp_path / 'o')])
    assert code == 2 and 'exceeds the context' in capsys.readouterr().err
    # transformers missing: one line naming the install command, and nothing else imports it
    monkeypatch.setitem(sys.modules, 'transformers', None)
    assert probe.main(['hf:' + llama, '--text', 'hello', '--out', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install transformers' in err[0]
    assert not (tmp_path / 'o').exists()


def test_specs_names_and_steps():
    assert hf.expand(['a.pt', 'hf:org/m@step1,step2', 'hf:org/n']) == ['a.pt', 'hf:org/m@step1', 'hf:org/m@step2',
                                                                        'hf:org/n']
    assert [hf.step_of(r) for r in ('step1000', 'checkpoint-500', 'iter_20', '3000', 'main', 'v1.0', None)] == \
        [1000, 500, 20, 3000, None, None, None]
    assert hf.short_name('hf:EleutherAI/pythia-160m@step1000') == 'pythia-160m_step1000'
    src = hf.parse('hf:EleutherAI/pythia-160m@step1000')
    assert (src.repo, src.revision, src.local, src.where) == ('EleutherAI/pythia-160m', 'step1000', False,
                                                             'EleutherAI/pythia-160m')
    assert hf.tokens_per_step('EleutherAI/pythia-160m') == 2097152 and hf.tokens_per_step('org/x') is None


def test_a_hub_id_without_network_fails_fast_in_one_line(cli, tmp_path):
    """No network here: an id that is not in the cache is refused in one line within seconds, without
    huggingface_hub's retry lines (HF_HUB_OFFLINE is not set: the probe finds the hub unreachable)."""
    env = {'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': ''}
    t0 = time.time()
    r = cli('probe.py', 'hf:someone/not-a-cached-model', '--text', 'hi', '--out', tmp_path / 'o', **env)
    took = time.time() - t0
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert 'not in the Hugging Face cache' in err[0] and 'cannot be reached (no network)' in err[0]
    assert took < 20, took          # not a speed goal: the retries it replaces took ~30 s
