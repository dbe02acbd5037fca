"""GPT-2 weights (docs/reference.md §6): model.load_gpt2 against the real client (transformers) on tiny random
GPT-2s, lab.download.fetch_gpt2 against a local HTTP server, the probe's census on a planted outlier,
and one clear error per kind of bad input. CPU, offline, everything under tmp_path.

transformers is a test-only dependency (.ci/run installs it): the tests that need it skip when it
is missing, except under CI (env CI set), where a missing transformers is a failure.
The served tiny model is registered in GPT2_MODELS as 'tiny-gpt2' -> 'test-org/tiny-gpt2'; the
command-line tests serve one as openai-community/gpt2 instead, as a mirror would.
"""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import probe
from lab import measure
from http_server import FileServer
from lab import gpt2
from lab.data import Incomplete, write_shard
from lab.download import GPT2_MODELS, DownloadError, check_safetensors, fetch_gpt2
from lab.gpt2 import load_gpt2
from model import GPT, GPTConfig

def need_transformers():
    if os.environ.get('CI'):
        import transformers  # CI must run these tests: a missing transformers fails, it does not skip
        return transformers
    return pytest.importorskip('transformers', reason='transformers is not installed: it is test-only, for '
                               'tests/test_gpt2.py (pip install transformers; see README, Tests)')


V, BLOCK = 320, 64


def save_tiny_gpt2(folder, n_layer=2, n_head=2, n_embd=32, seed=0, plant=None, vocab=V):
    """A random transformers GPT2LMHeadModel (eval) saved to folder with save_pretrained.

    Weights N(0, 0.2) rather than 0.02, LayerNorm weights 1 + N(0, 0.3) and every bias N(0, 0.2), so
    that nothing is trivially 1 or 0 and the GELU runs where its tanh approximation matters.
    plant=(channel, value) sets wpe.weight[0, channel], a massive activation at position 0."""
    transformers = need_transformers()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=BLOCK,
                                  initializer_range=0.2, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if '.ln_' in name and name.endswith('.weight'):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith('.bias'):
                p.normal_(0, 0.2)
        if plant:
            hf.transformer.wpe.weight[0, plant[0]] = plant[1]
    hf.save_pretrained(folder, safe_serialization=True)
    return hf


def hub_style(folder):
    """Rewrite folder's model.safetensors as the hub's OpenAI files are: no 'transformer.' prefix,
    the old attn.bias / attn.masked_bias mask buffers, and an lm_head.weight equal to wte."""
    path = os.path.join(folder, 'model.safetensors')
    tensors = {k.removeprefix('transformer.'): v for k, v in load_file(path).items()}
    for i in range(json.load(open(os.path.join(folder, 'config.json')))['n_layer']):
        tensors[f'h.{i}.attn.bias'] = torch.ones(BLOCK, BLOCK).tril().view(1, 1, BLOCK, BLOCK)
        tensors[f'h.{i}.attn.masked_bias'] = torch.tensor(-1e4)
    tensors['lm_head.weight'] = tensors['wte.weight'].clone()
    save_file(tensors, path)


def max_logit_diff(ours, hf, x):
    with torch.no_grad():
        return (ours(x)[0] - hf(x).logits).abs().max().item()


def tokens(n=3, T=BLOCK, seed=0):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))

# -----------------------------------------------------------------------------
# the weights mean what they mean in transformers


@pytest.mark.parametrize('shape, hub', [((2, 2, 32), False), ((3, 4, 48), True)],
                         ids=['2x2x32-save_pretrained', '3x4x48-hub-style'])
def test_load_gpt2_matches_transformers(tmp_path, shape, hub):
    hf = save_tiny_gpt2(tmp_path, *shape)
    if hub:
        hub_style(tmp_path)
    ours, info = load_gpt2(str(tmp_path))
    assert not ours.training
    x = tokens()
    assert max_logit_diff(ours, hf, x) < 1e-5
    n_layer, n_head, n_embd = shape
    assert info['source'] == str(tmp_path) and info['dtype'] == 'float32'
    assert {k: info['model_args'][k] for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')} == \
        dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=BLOCK, vocab_size=V)
    assert GPTConfig(**info['model_args']) == ours.config
    assert ours.lm_head.weight is ours.wte.weight  # tied
    # control: the tolerance is tight enough to see the exact GELU in place of GPT-2's tanh one
    exact = GPT(GPTConfig(**dict(info['model_args'], gelu='exact'))).eval()
    exact.load_state_dict(ours.state_dict())
    assert max_logit_diff(exact, hf, x) > 1e-4


def test_planted_positional_outlier_is_found_by_the_probe(tmp_path):
    c = 7
    x = tokens(n=4, T=32)
    census = {}
    for plant in (None, (c, 1e4)):
        folder = tmp_path / ('planted' if plant else 'plain')
        save_tiny_gpt2(folder, plant=plant)
        result, _ = measure.measure(load_gpt2(str(folder))[0], x)
        census[plant is not None] = result['streams']['h']['summary']
    assert census[False]['largest_massive'] is None  # control: the random model has no massive entry
    s = census[True]
    assert (s['largest_massive']['position'], s['largest_massive']['channel']) == (0, c)
    assert s['largest_massive']['value'] > 9000
    n = 4 * 2 * 2  # every sequence, at every sublayer
    assert s['massive_channels'] == [[c, n]] and s['massive_positions'] == [[0, n]]
    assert s['pos0_massive_channels'] == [c] and s['emergence_sublayer'] == 0

# -----------------------------------------------------------------------------
# downloads


@pytest.fixture
def tiny_hub(tmp_path, monkeypatch):
    """(server, hf model): a tiny GPT-2 served as test-org/tiny-gpt2, known as 'tiny-gpt2'."""
    hf = save_tiny_gpt2(tmp_path / 'tiny')
    files = {f: (tmp_path / 'tiny' / f).read_bytes() for f in ('config.json', 'model.safetensors')}
    monkeypatch.setitem(GPT2_MODELS, 'tiny-gpt2', 'test-org/tiny-gpt2')
    monkeypatch.delenv('LEDGER_BASE_URL', raising=False)
    with FileServer(files, prefix='/test-org/tiny-gpt2/resolve/main/') as server:
        yield server, hf


def test_fetch_gpt2_resumes_then_stays_offline(tiny_hub, tmp_path, monkeypatch):
    server, hf = tiny_hub
    weights = 'model.safetensors'
    assert len(server.files[weights]) > 2 * (1 << 16)  # the cut keeps at least one 64 KiB chunk
    server.fail_once.add('config.json')
    server.drop_once.add(weights)
    folder = fetch_gpt2('tiny-gpt2', data_root=str(tmp_path / 'data'), base_url=server.url, backoff=0.01)
    assert folder == str(tmp_path / 'data' / 'gpt2' / 'tiny-gpt2')
    assert sorted(os.listdir(folder)) == ['config.json', weights]  # no .part left
    for f, body in server.files.items():
        assert open(os.path.join(folder, f), 'rb').read() == body
    assert server.gets('config.json') == [('config.json', None)] * 2  # 503, then the file
    (first, rng_first), (_, rng) = server.gets(weights)
    assert rng_first is None and rng.startswith('bytes=') and int(rng[6:].rstrip('-')) >= 1 << 16  # resumed
    assert max_logit_diff(load_gpt2(folder)[0], hf, tokens()) < 1e-5
    n = len(server.log)
    assert fetch_gpt2('tiny-gpt2', data_root=str(tmp_path / 'data'), base_url=server.url) == folder
    assert len(server.log) == n  # complete files are not requested again
    # one LEDGER_BASE_URL for shards and models: a mirror of huggingface.co/datasets works too
    monkeypatch.setenv('LEDGER_BASE_URL', server.url + '/datasets/')
    folder2 = fetch_gpt2('tiny-gpt2', data_root=str(tmp_path / 'data2'), backoff=0.01)
    assert open(os.path.join(folder2, weights), 'rb').read() == server.files[weights]
    assert len(server.log) == n + 2


@pytest.mark.parametrize('leftover, first_range', [(1000, 'bytes=1000-'), (b'GARBAGE!' * 10, None)],
                         ids=['prefix-resumed', 'garbage-started-over'])
def test_fetch_gpt2_resumes_a_part_file_from_an_earlier_run(tiny_hub, tmp_path, leftover, first_range):
    server, _ = tiny_hub
    folder = tmp_path / 'data' / 'gpt2' / 'tiny-gpt2'
    folder.mkdir(parents=True)
    body = server.files['model.safetensors']
    (folder / 'model.safetensors.part').write_bytes(body[:leftover] if isinstance(leftover, int) else leftover)
    fetch_gpt2('tiny-gpt2', data_root=str(tmp_path / 'data'), base_url=server.url)
    assert (folder / 'model.safetensors').read_bytes() == body
    assert server.gets('model.safetensors') == [('model.safetensors', first_range)]


def test_check_safetensors(tmp_path):
    path = str(tmp_path / 'm.safetensors')
    save_file({'a': torch.ones(3, 5), 'b': torch.arange(7)}, path)
    body = open(path, 'rb').read()
    check_safetensors(path)
    n = int.from_bytes(body[:8], 'little')
    for size in (0, 5, 8, 8 + n - 1, 8 + n, len(body) - 1):  # every cut is a download to resume
        open(path, 'wb').write(body[:size])
        with pytest.raises(Incomplete):
            check_safetensors(path)
    for bad in (body + b'x', b'GARBAGE!' * 100, (5).to_bytes(8, 'little') + b'[1,2]',
                (8).to_bytes(8, 'little') + b'{"a": 1}'):
        open(path, 'wb').write(bad)
        with pytest.raises(ValueError) as e:
            check_safetensors(path)
        assert not isinstance(e.value, Incomplete), bad[:16]

# -----------------------------------------------------------------------------
# bad input: one clear error each


def test_unknown_model_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown GPT-2 model 'gpt3'; choose from gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        fetch_gpt2('gpt3', data_root=str(tmp_path))
    assert not os.listdir(tmp_path)


def test_folder_without_the_files(tmp_path):
    with pytest.raises(ValueError, match='no config.json and no model.safetensors; give a GPT-2 model name'):
        load_gpt2(str(tmp_path / 'nowhere'))
    (tmp_path / 'config.json').write_text('{}')
    with pytest.raises(ValueError, match=r'no model.safetensors;') as e:
        load_gpt2(str(tmp_path))
    assert 'config.json' not in str(e.value).split(';')[0]


GPT2_JSON = dict(model_type='gpt2', n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK, vocab_size=V)


@pytest.mark.parametrize('change, message', [
    (dict(model_type='llama', hidden_act='silu', num_hidden_layers=2), "model_type is 'llama', not 'gpt2'"),
    (dict(activation_function='relu'), "activation_function 'relu' is not GPT-2's tanh GELU"),
    (dict(n_inner=100), 'n_inner 100 is not 4 \\* n_embd = 128'),
    (dict(scale_attn_weights=False), 'scale_attn_weights is False'),
    (dict(scale_attn_by_inverse_layer_idx=True), 'scale_attn_by_inverse_layer_idx is True'),
    (dict(reorder_and_upcast_attn=True), 'reorder_and_upcast_attn is True'),
    (dict(tie_word_embeddings=False), 'tie_word_embeddings is False'),
], ids=['llama', 'activation', 'n_inner', 'unscaled', 'layer-idx-scaling', 'upcast', 'untied'])
def test_configs_that_are_not_gpt2_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        gpt2.gpt2_config(dict(GPT2_JSON, **change))
    for ok in (dict(activation_function='gelu_pytorch_tanh'), dict(n_inner=128), dict(n_inner=None)):
        gpt2.gpt2_config(dict(GPT2_JSON, **ok))
    hub_defaults = gpt2.gpt2_config({'model_type': 'gpt2'})  # the hub's gpt2 config.json leaves most keys out
    assert (hub_defaults.n_layer, hub_defaults.n_embd, hub_defaults.block_size, hub_defaults.vocab_size,
            hub_defaults.norm_eps) == (12, 768, 1024, 50257, 1e-5)


def test_llama_folder_is_refused(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps(dict(model_type='llama', hidden_size=32, num_hidden_layers=2)))
    save_file({'model.embed_tokens.weight': torch.zeros(V, 32)}, str(tmp_path / 'model.safetensors'))
    with pytest.raises(ValueError) as e:
        load_gpt2(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / 'config.json')) and "model_type is 'llama'" in msg and '\n' not in msg


@pytest.mark.parametrize('change, message', [
    (dict(n_embd=48), r"h\.0\.attn\.c_attn\.bias: expected shape \(144,\) from config.json, got \(96,\)"),
    (dict(vocab_size=V + 1), r"wte\.weight: expected shape \(321, 32\) from config.json, got \(320, 32\)"),
    (dict(n_layer=3), r"missing \['sublayers\.4\..*unexpected none"),
    (dict(n_layer=1), r"missing none.*unexpected \['transformer\.h\.1\."),
], ids=['n_embd', 'vocab', 'fewer-tensors', 'more-tensors'])
def test_tensors_that_do_not_match_the_config(tmp_path, change, message):
    save_tiny_gpt2(tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps(dict(cfg, **change)))
    with pytest.raises(ValueError, match=message) as e:
        load_gpt2(str(tmp_path))
    assert str(e.value).startswith(str(tmp_path / 'model.safetensors')) and '\n' not in str(e.value)


def test_untied_lm_head_is_refused(tmp_path):
    save_tiny_gpt2(tmp_path)
    path = str(tmp_path / 'model.safetensors')
    tensors = load_file(path)
    save_file(dict(tensors, **{'lm_head.weight': tensors['transformer.wte.weight'] + 1}), path)
    with pytest.raises(ValueError, match='lm_head.weight differs from wte.weight'):
        load_gpt2(str(tmp_path))


def test_unreadable_files(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps(GPT2_JSON))
    (tmp_path / 'model.safetensors').write_bytes(b'GARBAGE!' * 10)
    with pytest.raises(ValueError, match='model.safetensors: not a readable safetensors file'):
        load_gpt2(str(tmp_path))
    (tmp_path / 'config.json').write_text('{"model_type": ')
    with pytest.raises(ValueError, match='config.json: not JSON'):
        load_gpt2(str(tmp_path))


@pytest.mark.parametrize('file, body, message', [
    ('model.safetensors', b'<!DOCTYPE html><title>Sign in</title>' * 50, 'not a safetensors file'),
    ('model.safetensors', 'truncate', 'truncated'),  # a whole HTTP body, shorter than its header says
    ('config.json', b'[1, 2, 3]', 'JSON list, not an object'),
], ids=['html', 'truncated', 'json-list'])
def test_garbage_served_over_http_is_rejected(tmp_path, monkeypatch, capsys, file, body, message):
    monkeypatch.setitem(GPT2_MODELS, 'tiny-gpt2', 'test-org/tiny-gpt2')
    weights = tmp_path / 'w.safetensors'
    save_file({'wte.weight': torch.zeros(V, 32)}, str(weights))
    files = {'config.json': json.dumps(GPT2_JSON).encode(), 'model.safetensors': weights.read_bytes()}
    files[file] = files[file][:-100] if body == 'truncate' else body
    with FileServer(files, prefix='/test-org/tiny-gpt2/resolve/main/') as server:
        with pytest.raises(DownloadError) as e:
            fetch_gpt2('tiny-gpt2', data_root=str(tmp_path / 'data'), base_url=server.url, backoff=0.01)
        assert len(server.gets(file)) == 1  # rejected at once, not retried
    msg = str(e.value)
    assert msg.startswith(f'{file}: the server sent something that is not') and message in msg
    assert 'Check --base_url' in msg and '\n' not in msg
    folder = tmp_path / 'data' / 'gpt2' / 'tiny-gpt2'
    assert not (folder / file).exists() and not (folder / (file + '.part')).exists()

# -----------------------------------------------------------------------------
# the command line: python probe.py gpt2 [our checkpoints], python probe.py FOLDER

GPT2_VOCAB = 50257


def builtin_root(root):
    """A small 'builtin' dataset (random GPT-2 token ids) in root, so that the probe's default data
    for GPT-2 is there without building the real corpus (ensure_dataset finds it and builds nothing)."""
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        os.makedirs(root / 'builtin', exist_ok=True)
        write_shard(str(root / 'builtin' / f'builtin_{split}_000000.bin'), rng.integers(0, GPT2_VOCAB, 4000))
    return root


def test_probe_gpt2_by_name_resumes_then_runs_offline_next_to_a_checkpoint(tmp_path, cli):
    c = 5
    save_tiny_gpt2(tmp_path / 'tiny', plant=(c, 1e4), vocab=GPT2_VOCAB)
    files = {f: (tmp_path / 'tiny' / f).read_bytes() for f in ('config.json', 'model.safetensors')}
    data, out = builtin_root(tmp_path / 'data'), tmp_path / 'out'
    with FileServer(files, prefix='/openai-community/gpt2/resolve/main/') as server:
        server.fail_once.add('config.json')
        server.drop_once.add('model.safetensors')
        r = cli('probe.py', 'gpt2', '--base_url', server.url, '--data_root', data, '--out', out, '--num_seqs', 2)
        assert r.returncode == 0, r.stderr
        assert [rng is not None for _, rng in server.gets('model.safetensors')] == [False, True]  # resumed
        url = server.url
    folder = data / 'gpt2' / 'gpt2'
    assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
    assert 'GPT-2 weights gpt2 (float32)' in r.stdout and 'the built-in corpus' in r.stdout
    assert [l[:5] for l in r.stdout.splitlines() if l.startswith(('data:', 'blocks:'))] == ['data:', 'block']
    g = json.loads((out / 'probe.json').read_text())['checkpoints'][0]
    assert g['name'] == 'gpt2' and g['weights'] == dict(kind='gpt2', folder=str(folder), dtype='float32', name='gpt2')
    assert g['data']['dataset'] == 'builtin' and g['data']['seq_len'] == BLOCK
    lm = g['streams']['h']['summary']['largest_massive']
    assert (lm['position'], lm['channel']) == (0, c)           # the planted wpe[0] outlier, through the CLI
    # second run: the server is gone, the weights are cached; side by side with one of our checkpoints
    ours = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=BLOCK, vocab_size=GPT2_VOCAB, residual='ledger'))
    ckpt = tmp_path / 'ledger' / 'ckpt.pt'
    ckpt.parent.mkdir()
    torch.save(dict(model=ours.state_dict(), model_args=ours.config.__dict__, iter_num=3,
                    config=dict(dataset='builtin', data_root=str(data))), ckpt)
    r = cli('probe.py', 'gpt2', ckpt, '--base_url', url, '--data_root', data, '--out', out, '--num_seqs', 2)
    assert r.returncode == 0, r.stderr
    assert 'retrying' not in r.stderr and '=== comparison ===' in r.stdout
    assert [l[:5] for l in r.stdout.splitlines() if l.startswith(('data:', 'blocks:'))] == ['data:', 'block', 'data:']
    both = json.loads((out / 'probe.json').read_text())
    assert both['comparison']['columns'] == ['gpt2', 'ledger']
    assert [c['weights'] is None for c in both['checkpoints']] == [False, True]
    assert both['checkpoints'][0]['streams']['h']['summary'] == g['streams']['h']['summary']  # same windows, same numbers


def test_probe_reads_a_gpt2_folder_with_text_prompts(tmp_path, capsys):
    hf = save_tiny_gpt2(tmp_path / 'my model', vocab=GPT2_VOCAB)
    out = tmp_path / 'out'
    assert probe.main([str(tmp_path / 'my model') + '/', '--text', 'Hello world, this is a test.', '--out', str(out),
                       '--data_root', str(tmp_path / 'no data needed')]) == 0
    assert not (tmp_path / 'no data needed').exists()          # --text: no corpus built, nothing fetched
    r = json.loads((out / 'probe.json').read_text())['checkpoints'][0]
    assert r['name'] == 'my_model' and r['data']['source'] == 'text' and r['weights']['name'] is None
    x, y, _ = probe.text_windows(['Hello world, this is a test.'], BLOCK)
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(hf(x).logits[0], y[0], ignore_index=-1).item()
    assert abs(r['val_loss'] - want) < 1e-4                     # transformers' loss on the same tokens


def test_probe_gpt2_bad_input_is_one_line(tmp_path, capsys, cli):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'config_only').mkdir()
    (tmp_path / 'config_only' / 'config.json').write_text(json.dumps(GPT2_JSON))
    llama = tmp_path / 'llama'
    llama.mkdir()
    (llama / 'config.json').write_text(json.dumps(dict(model_type='llama', hidden_size=32, num_hidden_layers=2)))
    save_file({'model.embed_tokens.weight': torch.zeros(V, 32)}, str(llama / 'model.safetensors'))
    wrong = tmp_path / 'wrong'
    save_tiny_gpt2(wrong)
    (wrong / 'config.json').write_text(json.dumps(dict(json.loads((wrong / 'config.json').read_text()), n_embd=48)))
    small_vocab = tmp_path / 'small_vocab'
    save_tiny_gpt2(small_vocab)
    data = builtin_root(tmp_path / 'data')
    capsys.readouterr()                                     # save_pretrained's progress bars
    with FileServer({}) as server:                          # a mirror without the model: 404
        cases = [(('gpt3',), 'known models: gpt2, gpt2-medium, gpt2-large, gpt2-xl'),
                 ((tmp_path / 'empty',), 'nor config.json and model.safetensors'),
                 ((tmp_path / 'config_only',), 'no model.safetensors'),
                 ((llama,), "model_type is 'llama', not 'gpt2'"),
                 ((wrong,), 'expected shape (144,) from config.json, got (96,)'),
                 ((small_vocab,), "outside the model's vocab_size 320"),
                 (('gpt2-medium', '--base_url', server.url), 'gpt2-medium/resolve/main/config.json')]
        for args, words in cases:
            code = probe.main([str(a) for a in args] + ['--data_root', str(data), '--out', str(tmp_path / 'o')])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and err[0].startswith('probe.py: error:'), (args, err)
            assert words in err[0], (words, err)
    assert not (tmp_path / 'o').exists() and not (data / 'gpt2').exists()   # no empty gpt2/gpt2-medium/ either
    r = cli('probe.py', 'gpt3', '--out', tmp_path / 'o')                  # the same through the real command line
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        'probe.py: error: gpt3: no such file and no GPT-2 model of that name; known models: gpt2, gpt2-medium, '
        'gpt2-large, gpt2-xl (or give a checkpoint file, or a folder holding config.json and model.safetensors)']
