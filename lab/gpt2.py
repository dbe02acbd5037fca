"""
OpenAI GPT-2 weights in model.GPT (docs/reference.md §6), so the probe can be calibrated on the
literature's model. GPT-2 is this repo's GPT with residual='vanilla', norm='layernorm', bias=True,
gelu='tanh', eps 1e-5 and a tied head; its block i is our sublayers 2i (attention, norm ln_1) and
2i+1 (MLP, norm ln_2). The weights come from a Hugging Face GPT-2 folder (config.json +
model.safetensors): safetensors files hold only tensors, so unlike a pickle they cannot run code.
"""
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model import GPT, GPTConfig


GPT2_BLOCK = {  # GPT-2 module inside h.<i> -> (sublayer 2i + offset, our module)
    'ln_1': (0, 'res.norm'), 'attn.c_attn': (0, 'fn.qkv'), 'attn.c_proj': (0, 'fn.proj'),
    'ln_2': (1, 'res.norm'), 'mlp.c_fc': (1, 'fn.fc'), 'mlp.c_proj': (1, 'fn.proj'),
}
GPT2_TOP = {'wte': 'wte', 'wpe': 'wpe', 'ln_f': 'norm_f', 'lm_head': 'lm_head'}
GPT2_BUFFERS = ('attn.bias', 'attn.masked_bias')  # causal-mask buffers of older files, not weights


def gpt2_config(hf):
    """GPTConfig for a Hugging Face GPT-2 config.json dict (missing keys take GPT2Config's defaults).

    Anything that would compute something other than GPT-2 is refused with a ValueError, because
    its tensors could still have the right shapes and load silently into the wrong model."""
    def refuse(why):
        raise ValueError(f"config.json: {why}; only OpenAI GPT-2 models (gpt2, gpt2-medium, gpt2-large, "
                         "gpt2-xl or a GPT-2-format folder) load into this GPT")
    if hf.get('model_type') != 'gpt2':
        refuse(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    act = hf.get('activation_function', 'gelu_new')
    if act not in ('gelu_new', 'gelu_pytorch_tanh'):
        refuse(f"activation_function {act!r} is not GPT-2's tanh GELU (gelu_new)")
    n_embd = hf.get('n_embd', 768)
    if hf.get('n_inner') not in (None, 4 * n_embd):
        refuse(f"n_inner {hf['n_inner']} is not 4 * n_embd = {4 * n_embd}")
    for key, gpt2 in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False),
                      ('reorder_and_upcast_attn', False), ('tie_word_embeddings', True), ('add_cross_attention', False)):
        if hf.get(key, gpt2) != gpt2:
            refuse(f"{key} is {hf[key]}, GPT-2 has {gpt2}")
    return GPTConfig(n_layer=hf.get('n_layer', 12), n_head=hf.get('n_head', 12), n_embd=n_embd,
                     block_size=hf.get('n_positions', 1024), vocab_size=hf.get('vocab_size', 50257), dropout=0.0,
                     residual='vanilla', norm='layernorm', bias=True, gelu='tanh',
                     norm_eps=hf.get('layer_norm_epsilon', 1e-5), tie_embeddings=True)


def gpt2_state_dict(tensors, expected):
    """Rename GPT-2 tensors (with or without the 'transformer.' prefix) to our state_dict names and
    check them against `expected`, GPT(config).state_dict(); ValueError for a missing, unexpected
    or wrongly shaped tensor (shapes as stored in the file).

    The c_* weights are Conv1D, stored (in, out): transposed for nn.Linear. c_attn packs q|k|v on
    its output, the order our qkv splits in, so it maps whole. The mask buffers are dropped. The
    head is tied to wte: an lm_head.weight in the file must equal wte.weight (else it is not GPT-2
    and is refused rather than silently replaced by wte).
    """
    sd, source = {}, {}
    for name, t in tensors.items():
        short = name.removeprefix('transformer.')
        module, _, param = short.rpartition('.')      # 'h.3.attn.c_attn', 'weight'
        h, _, rest = module.partition('.')
        i, _, inner = rest.partition('.')             # '3', 'attn.c_attn'
        in_block = h == 'h' and i.isdigit()
        if in_block and f"{inner}.{param}" in GPT2_BUFFERS:
            continue
        if in_block and inner in GPT2_BLOCK:
            offset, ours = GPT2_BLOCK[inner]
            ours = f"sublayers.{2 * int(i) + offset}.{ours}.{param}"
        elif module in GPT2_TOP:
            ours = f"{GPT2_TOP[module]}.{param}"
        else:
            ours = name  # not a GPT-2 tensor: reported as unexpected below
        conv1d = '.c_' in short and param == 'weight' and t.dim() == 2
        sd[ours], source[ours] = (t.t() if conv1d else t), (name, conv1d)
    head = sd.pop('lm_head.weight', None)
    if head is not None and 'wte.weight' in sd and not torch.equal(head, sd['wte.weight']):
        raise ValueError("lm_head.weight differs from wte.weight, but GPT-2's head is tied to the token embedding")
    expected = {k: v for k, v in expected.items() if k != 'lm_head.weight'}  # tied: it is wte.weight
    missing = [k for k in expected if k not in sd]
    unexpected = [source[k][0] for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"the tensors do not fit config.json: missing {missing[:4] or 'none'} (this GPT's names), "
                         f"unexpected {unexpected[:4] or 'none'} (the file's names)")
    for k, t in sd.items():
        (name, conv1d), want = source[k], tuple(expected[k].shape)
        if tuple(t.shape) != want:
            file_shape = tuple(t.t().shape) if conv1d else tuple(t.shape)
            raise ValueError(f"{name}: expected shape {want[::-1] if conv1d else want} from config.json, got {file_shape}")
    sd['lm_head.weight'] = sd['wte.weight']
    return sd


def load_gpt2(folder, device='cpu'):
    """(model in eval mode, info) from a folder holding a Hugging Face GPT-2 config.json and
    model.safetensors (lab.download.fetch_gpt2 downloads OpenAI's). safetensors only holds tensors, so
    unlike a pickle it cannot run code. info: source (the folder), name (its base name), model_args
    (GPTConfig fields), dtype (of the stored tensors), hf_config (the config.json dict).
    Bad input raises a one-line ValueError."""
    paths = {f: os.path.join(folder, f) for f in ('config.json', 'model.safetensors')}
    missing = [f for f, p in paths.items() if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{folder}: no {' and no '.join(missing)}; give a GPT-2 model name (gpt2, gpt2-medium, "
                         "gpt2-large, gpt2-xl) or a folder holding config.json and model.safetensors")
    try:
        with open(paths['config.json'], 'rb') as f:
            hf = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{paths['config.json']}: not JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{paths['config.json']}: not a JSON object")
    try:
        config = gpt2_config(hf)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{paths['config.json']}: {str(e).removeprefix('config.json: ')}") from None
    try:
        tensors = load_file(paths['model.safetensors'])
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{paths['model.safetensors']}: not a readable safetensors file ({e})") from None
    model = GPT(config)
    try:
        sd = gpt2_state_dict(tensors, model.state_dict())
    except ValueError as e:
        raise ValueError(f"{paths['model.safetensors']}: {e}") from None
    model.load_state_dict(sd)
    info = dict(source=os.path.abspath(folder), name=os.path.basename(os.path.abspath(folder)),
                model_args=dict(vars(config)), dtype=str(next(iter(tensors.values())).dtype).removeprefix('torch.'),
                hf_config=hf)
    return model.to(device).eval(), info
