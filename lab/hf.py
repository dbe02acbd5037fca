"""
Any Hugging Face causal LM, read by probe.py like one of our checkpoints (docs/reference.md §4.9).

    python probe.py hf:EleutherAI/pythia-160m                    # a hub id: the hub cache, or a download
    python probe.py hf:path/to/folder                            # a save_pretrained folder
    python probe.py hf:EleutherAI/pythia-160m@step1000,step8000  # revisions, also drawn as a training run
    python probe.py out/ledger/ckpt.pt hf:meta-llama/Llama-2-7b-hf   # next to ours, in one table

A foreign model is one more thing the probe can read, not a second probe. HFModel wraps an
AutoModelForCausalLM so that lab.measure runs it exactly as it runs model.GPT: model(idx,
observer=obs) returns (logits, None, {}) and calls the model.Observer hooks, from forward hooks on
the transformers modules (no copy of their forward code, so what is measured is what transformers
computes):

- on_sublayer(s, {'h': stream}) after every attention (s = 2i) and every MLP (s = 2i + 1) of block i.
  s = 2i + 1 is the block's output. s = 2i is the stream after the attention's residual add, which
  sequential blocks carry as a tensor (the input of the block's second norm). Parallel blocks
  (GPT-NeoX/Pythia with use_parallel_residual, Phi) add attention and MLP to the block input at
  once; their s = 2i is the partial sum h + Attn(N1 h): a point of view, never a tensor the model
  holds, and nothing reads it. A replacement returned by the observer (zero/mean interventions) is
  written into the model's own tensor; at a parallel block's partial sum there is nothing to write
  into, so the adapter says that the intervention does not apply (cannot_edit) and never reports a
  number for it.
- on_input(s, u) with the input of the attention or the MLP (their normalised input, or the raw
  stream in post-norm blocks), replaceable (soften).
- on_attention(layer, q, k, v, att): the probe registers its own attention function with
  transformers' AttentionInterface (with eager's additive masks), which is eager attention with the
  probabilities softmax(q k^T * scale + mask) computed in fp32 and handed over. q, k, v are the
  tensors the model's attention module passes to it: after RoPE and QK-norm, k and v repeated to
  every query head under grouped-query attention. When the mask hides key 0 from some queries (a
  sliding window shorter than T), the call also gets visible0=(B, T) bool: the queries that see it.
- down_projections(): where each block's MLP down-projection is (DOWN_PROJ), for the super-weight
  search.

The model's own tokenizer reads --text, and the built-in corpus (lab.data.builtin_documents: this
Python's standard library) when there is no text: windows start at the same character offsets of
the same validation documents for every model (seeded), each tokenised by the model's tokenizer
and cached under <data_root>/hf/windows/. When the tokenizer puts a BOS token in front of every
text (LLaMA, Mistral, OPT), position 0 of every window is that BOS; otherwise (GPT-2, Pythia, Qwen)
nothing is prepended and position 0 is an arbitrary token of the text, as in our windows.
transformers is imported only here, and only for hf: inputs.
"""

import hashlib
import json
import os
import platform
import re
import socket
import time
import urllib.parse
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.data import VAL_FRACTION, builtin_documents, data_folder, prompt_windows, split_key
from lab.plots import plot_trajectories
from lab.trajectories import THRESHOLDS, channel_history, first_crossings, write_trajectories

PREFIX = 'hf:'
ATTN = 'ledger_probe'          # the name our attention function is registered under
DEFAULT_T = 1024               # window length unless --seq_len: contexts of 4k-128k tokens are probed at GPT-2's
INSTALL = "pip install transformers"

# Where each family keeps its blocks and what a sublayer is there:
# model_type: (decoder layers, attention module, module whose input is the MLP's input, stream after attention)
# 'pre:<norm>': the tensor that norm reads (sequential pre-norm block); 'post:<norm>': that norm's output
# (post-norm); 'parallel': attention and MLP both read the block input, the partial sum is computed.
FAMILIES = {
    'llama': ('model.layers', 'self_attn', 'mlp', 'pre:post_attention_layernorm'),
    'mistral': ('model.layers', 'self_attn', 'mlp', 'pre:post_attention_layernorm'),
    'qwen2': ('model.layers', 'self_attn', 'mlp', 'pre:post_attention_layernorm'),
    'qwen3': ('model.layers', 'self_attn', 'mlp', 'pre:post_attention_layernorm'),
    'gpt2': ('transformer.h', 'attn', 'mlp', 'pre:ln_2'),
    'opt': ('model.decoder.layers', 'self_attn', 'fc1', 'pre:final_layer_norm'),
    'gpt_neox': ('gpt_neox.layers', 'attention', 'mlp', 'parallel'),
    'phi': ('model.layers', 'self_attn', 'mlp', 'parallel'),
}
# where each family keeps its MLP's down-projection (the nn.Linear from the 4d hidden units back to d) in a
# decoder layer: the super-weight search (lab/measure.py) reads its input, output and weight
DOWN_PROJ = {'llama': 'mlp.down_proj', 'mistral': 'mlp.down_proj', 'qwen2': 'mlp.down_proj', 'qwen3': 'mlp.down_proj',
             'gpt2': 'mlp.c_proj', 'opt': 'fc2', 'gpt_neox': 'mlp.dense_4h_to_h', 'phi': 'mlp.fc2'}
# tokens per optimiser step of public training runs whose revisions are steps (for the tokens-seen axis)
TOKENS_PER_STEP = {r'EleutherAI/pythia-': 1024 * 2048}   # Pythia paper: 1024 sequences of 2048 tokens


def layout(config):
    """FAMILIES' entry for a transformers config, with the variants a config switches."""
    layers, attn, mlp, mid = FAMILIES[config.model_type]
    if config.model_type == 'opt' and not getattr(config, 'do_layer_norm_before', True):
        mid = 'post:self_attn_layer_norm'          # OPT-350m is post-norm
    if config.model_type == 'gpt_neox' and not getattr(config, 'use_parallel_residual', True):
        mid = 'pre:post_attention_layernorm'
    return layers, attn, mlp, mid


def sublayers_text(mid):
    """What the attn and mlp rows of the report are, for this block layout (docs/reference.md §4.9)."""
    if mid == 'parallel':
        return ("parallel block: the attn row s = 2i is the partial sum h_i + Attn(N1 h_i), which the model never "
                "holds (its MLP reads N2 h_i, not this sum); the mlp row s = 2i + 1 is the block output "
                "h_i + Attn(N1 h_i) + MLP(N2 h_i)")
    if mid.startswith('post:'):
        return ("post-norm block: the attn row s = 2i is N1(h_i + Attn(h_i)), the mlp row s = 2i + 1 the block output "
                "N2(m + MLP(m))")
    return "sequential block: the attn row s = 2i is h_i + Attn(N1 h_i), the mlp row s = 2i + 1 the block output"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError(f"hf: inputs need the transformers package, which is not installed: {INSTALL}") from None
    return transformers

# ----------------------------------------------------------------------------------------------
# hf:<repo-or-folder>[@revision]


@dataclass
class Source:
    spec: str             # as given, e.g. hf:EleutherAI/pythia-160m@step1000
    repo: str             # hub id or folder
    revision: str | None  # hub: a branch, tag or commit; folder: a subfolder
    local: bool

    @property
    def where(self):
        """What from_pretrained reads: the folder (its revision subfolder), or the hub id."""
        if self.local:
            return os.path.join(self.repo, self.revision) if self.revision else self.repo
        return self.repo

    @property
    def hub_revision(self):
        return None if self.local else self.revision


def parse(spec):
    """Source of 'hf:REPO_OR_FOLDER[@REVISION]'. A folder's revision is a subfolder (e.g. the
    checkpoint-500 folders of a transformers Trainer run)."""
    rest = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    repo, revision = rest, None
    if '@' in rest and not os.path.exists(os.path.expanduser(rest)):
        repo, _, revision = rest.rpartition('@')
    if not repo or revision == '':
        raise ValueError(f"{spec}: expected hf:REPO_OR_FOLDER[@REVISION], e.g. hf:EleutherAI/pythia-160m@step1000")
    path = os.path.expanduser(repo)
    if os.path.isdir(path):
        return Source(spec, path, revision, True)
    if path.startswith(('.', '/', '~')) or path.count('/') > 1 or os.sep != '/' and os.sep in path:
        raise ValueError(f"{spec}: no such folder {path}")
    return Source(spec, repo, revision, False)


def expand(inputs):
    """The compact form of revisions: hf:REPO@a,b,c -> hf:REPO@a hf:REPO@b hf:REPO@c; anything else as is."""
    out = []
    for item in inputs:
        head, at, revs = item.rpartition('@')
        if item.startswith(PREFIX) and at and ',' in revs:
            out += [f"{head}@{r.strip()}" for r in revs.split(',') if r.strip()]
        else:
            out.append(item)
    return out


def step_of(revision):
    """The training step a revision names (step1000, checkpoint-500, iter_2000, or digits), else None."""
    m = re.fullmatch(r'(?i)(?:step|ckpt|checkpoint|iter|global_step)?[-_]?(\d+)', revision or '')
    return int(m.group(1)) if m else None


def short_name(spec):
    """Table and file name: the repo's (or folder's) last part, then the revision."""
    src = parse(spec)
    base = os.path.basename(os.path.normpath(src.repo)) or 'hf'
    return f"{base}_{src.revision}" if src.revision else base


def tokens_per_step(repo):
    return next((n for pattern, n in TOKENS_PER_STEP.items() if re.match(pattern, repo)), None)

# ----------------------------------------------------------------------------------------------
# Loading, with one line for everything that can be wrong


def _one_line(e, limit=400):
    text = ' '.join(str(e).split())
    return text if len(text) <= limit else text[:limit] + ' ...'


def _quiet():
    """transformers without its logs, warnings and progress bars (what matters is checked and said in
    one line here, e.g. weights that do not fit the model); huggingface_hub's download bars stay."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging
    logging.set_verbosity_error()
    hub_bars = not are_progress_bars_disabled()
    logging.disable_progress_bar()      # transformers' own bars, and (as a side effect) the hub's ...
    if hub_bars:
        enable_progress_bars()          # ... which come back


NO_NETWORK = []   # the hub's host, once this process found it unreachable and went offline


def offline_without_network():
    """No network (the hub's host does not resolve, or refuses): use the Hugging Face cache only, as
    HF_HUB_OFFLINE=1 would, instead of huggingface_hub's retries (a line each, ~30 s) that end in the
    same error. A connection is tried once, for 3 s at most."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or NO_NETWORK:
        return
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        NO_NETWORK.append(host)
        os.environ['HF_HUB_OFFLINE'] = '1'
        constants.HF_HUB_OFFLINE = True


def _not_found(src, e):
    """One line for a config, tokenizer or weights that could not be found."""
    if src.local:
        if src.revision and not os.path.isdir(src.where):
            have = sorted(d for d in os.listdir(src.repo) if os.path.isfile(os.path.join(src.repo, d, 'config.json')))
            return (f"{src.spec}: no revision {src.revision!r} in {src.repo} (a folder's revisions are its subfolders "
                    f"holding a config.json: {', '.join(have) or 'none'})")
        return f"{src.spec}: could not be loaded from {src.where} ({type(e).__name__}: {_one_line(e)})"
    from huggingface_hub import constants, is_offline_mode
    cache = os.path.join(constants.HF_HUB_CACHE, 'models--' + src.repo.replace('/', '--'))
    offline = is_offline_mode()
    why = f"{NO_NETWORK[0]} cannot be reached (no network)" if NO_NETWORK else "HF_HUB_OFFLINE is set"
    if offline and not os.path.isdir(cache):
        return (f"{src.spec}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
                f"download it once with network access, or give a local folder")
    refs = sorted(os.listdir(os.path.join(cache, 'refs'))) if os.path.isdir(os.path.join(cache, 'refs')) else []
    if src.revision and src.revision not in refs and (offline or 'revision' in str(e).lower() or refs):
        return (f"{src.spec}: revision {src.revision!r} not found{' in the Hugging Face cache' if offline else ''} "
                f"(cached revisions: {', '.join(refs) or 'none'}; {_one_line(e, 200)})")
    return f"{src.spec}: could not be loaded ({type(e).__name__}: {_one_line(e)})"


def load_config(src):
    """The transformers config, refused in one line unless it is a decoder-only causal LM whose
    block layout the adapter knows (FAMILIES)."""
    require_transformers()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    _quiet()
    if src.local and not os.path.isfile(os.path.join(src.where, 'config.json')):
        raise ValueError(_not_found(src, FileNotFoundError(f"no config.json in {src.where}")))
    if not src.local:
        offline_without_network()
    try:
        config = AutoConfig.from_pretrained(src.where, revision=src.hub_revision)
    except ValueError as e:
        if 'does not recognize this architecture' in str(e) or 'Unrecognized model' in str(e):
            mt = re.search(r'model type `([^`]*)`', str(e))
            raise ValueError(f"{src.spec}: unknown architecture: transformers {require_transformers().__version__} "
                             f"does not know model_type {mt.group(1) if mt else '(none)'!r}") from None
        raise ValueError(_not_found(src, e)) from None
    except (OSError, KeyError, TypeError) as e:
        raise ValueError(_not_found(src, e)) from None
    mt = config.model_type
    arch = ', '.join(getattr(config, 'architectures', None) or [])
    what = f"{arch} ({mt})" if arch else mt
    if getattr(config, 'is_encoder_decoder', False):
        raise ValueError(f"{src.spec}: {what} is an encoder-decoder model; the probe reads decoder-only causal LMs")
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, 'is_decoder', False) and mt not in FAMILIES:
        raise ValueError(f"{src.spec}: {what} is an encoder-only model (bidirectional attention, no causal LM); "
                         f"the probe reads decoder-only causal LMs")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{src.spec}: {what} has no causal-LM class in transformers; the probe reads "
                         f"decoder-only causal LMs")
    if mt not in FAMILIES:
        raise ValueError(f"{src.spec}: unknown architecture for the probe: {what}; its adapter knows the block "
                         f"layouts of {', '.join(FAMILIES)} (hf.FAMILIES)")
    return config


def weight_shapes(src):
    """{tensor name: shape} of the weights from_pretrained would load, read from the files' headers
    (safetensors) or memory-mapped (.bin): nothing is loaded. Raises (one line) when there are none."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def resolve(name):
        try:
            return cached_file(src.where, name, revision=src.hub_revision, _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError) as e:
            raise ValueError(_not_found(src, e)) from None

    for single, index in (('model.safetensors', 'model.safetensors.index.json'),
                          ('pytorch_model.bin', 'pytorch_model.bin.index.json')):
        path = resolve(single)
        files = [path] if path else None
        if files is None and resolve(index):
            with open(resolve(index)) as f:
                files = [resolve(shard) for shard in sorted(set(json.load(f)['weight_map'].values()))]
        if not files:
            continue
        shapes = {}
        for path in files:
            if path.endswith('.safetensors'):
                with safe_open(path, 'pt') as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            else:
                sd = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
                shapes.update({k: tuple(v.shape) for k, v in sd.items()})
        return shapes
    raise ValueError(f"{src.spec}: no weights (model.safetensors or pytorch_model.bin) in {src.where}")


def _renamer(model):
    """name in a weights file -> (name in the model, whether a converter builds it from several file
    tensors): transformers' own renaming of checkpoint keys (GPT-NeoX's embed_out is lm_head, ...);
    without that API (older transformers), the name with or without the base model's prefix."""
    try:
        from transformers import conversion_mapping, core_model_loading as cml
        transforms = conversion_mapping.get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, cml.WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, cml.WeightConverter)]
        meta = model.state_dict()

        def rename(key):
            target, converter = cml.rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            return target, converter is not None
        return rename
    except (ImportError, AttributeError, TypeError):
        names, prefix = set(model.state_dict()), model.base_model_prefix + '.'
        return lambda key: (next((n for n in (key, prefix + key, key.removeprefix(prefix)) if n in names), key), False)


def check_weights(src, config):
    """Raise (one line) unless the weights files hold every parameter the model of `config` needs, in
    its shape: checked from the files' headers against the model built on the meta device (nothing
    is loaded), so that every input of a probe run is checked before the first one is probed."""
    from transformers import AutoModelForCausalLM
    have = weight_shapes(src)
    with torch.device('meta'):
        model = AutoModelForCausalLM.from_config(config)
    rename, found, built = _renamer(model), {}, set()
    for key, shape in have.items():
        target, converted = rename(key)
        (built.add(target) if converted else found.setdefault(target, (key, shape)))
    for name, p in model.named_parameters():      # a tied weight once, under its first name; no buffers
        if name in built:
            continue                              # assembled from several tensors: from_pretrained checks it
        if name not in found:
            raise ValueError(f"{src.spec}: the weights do not fit its config: no tensor for {name} in the weights "
                             f"files")
        key, shape = found[name]
        if shape != tuple(p.shape):
            raise ValueError(f"{src.spec}: the weights do not fit its config: {key} has shape {list(shape)} in the "
                             f"file, {list(p.shape)} in a {config.model_type} of this config")


def load_tokenizer(src):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(src.where, revision=src.hub_revision)
    except Exception as e:   # tokenizer classes raise anything from OSError to TypeError
        raise ValueError(f"{src.spec}: its tokenizer could not be loaded ({type(e).__name__}: {_one_line(e, 200)}); "
                         f"the probe needs the model's own tokenizer for --text and for the built-in corpus") from None


def load_model(src, config, device='cpu', dtype='float32'):
    """HFModel of the weights (bfloat16 when dtype says so, else float32), on device, eval."""
    from transformers import AutoModelForCausalLM
    register_attention()
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(
            src.where, revision=src.hub_revision, config=config, output_loading_info=True,
            dtype=torch.bfloat16 if dtype == 'bfloat16' else torch.float32, attn_implementation=ATTN)
    except Exception as e:   # a missing or broken file: one line whatever transformers raises
        raise ValueError(_not_found(src, e)) from None
    bad = list(info.get('missing_keys') or []) + [str(k[0] if isinstance(k, tuple) else k)
                                                  for k in info.get('mismatched_keys') or []]
    if bad:   # transformers would initialise them at random: the probe would measure a random model
        raise ValueError(f"{src.spec}: the weights do not fit its config: {len(bad)} tensors missing or of the wrong "
                         f"shape, e.g. {', '.join(sorted(bad)[:3])}")
    return wrap(lm).to(device).eval()

# ----------------------------------------------------------------------------------------------
# The adapter


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention with explicit probabilities, handed to the probe's observer.

    softmax(q k^T * scaling + mask) in fp32, cast to q's dtype, then @ v: what 'eager' computes; the
    observer gets the fp32 probabilities. Dropout is not applied (the probe runs in eval mode)."""
    state, layer = module.__dict__.get('_ledger_probe', (None, None))
    if key.shape[1] != query.shape[1]:                 # grouped-query attention: one k, v per query head
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :key.shape[-2]]
    else:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T),
                                    float('-inf'))
    att = F.softmax(scores, dim=-1, dtype=torch.float32)
    if state is not None and state.observer is not None:
        state.calls += 1
        if state.observer.attention:          # the fp32 probabilities, also when the model runs in bf16
            state.observer.on_attention(layer, query, key, value, att, **key0_visibility(attention_mask, att))
    att = att.to(query.dtype)
    return torch.matmul(att, value).transpose(1, 2).contiguous(), att


def key0_visibility(attention_mask, att):
    """{} when every query may see key 0 (causal attention), else {'visible0': (B, T) bool}: the queries
    whose mask allows key 0 (a sliding window shorter than T hides it from the later ones); alpha_1 is
    averaged over those (docs/reference.md §4.6)."""
    if attention_mask is None:
        return {}
    m = attention_mask[:, 0, :, 0]
    seen = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return {} if bool(seen.all()) else dict(visible0=seen.expand(att.shape[0], att.shape[2]))


def register_attention():
    """Our attention function and eager's masks, under the name ATTN (transformers' documented way
    to plug in an attention implementation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(ATTN, probe_attention)
    AttentionMaskInterface.register(ATTN, eager_mask)


@dataclass
class HFConfig:
    """What probe.py reads from model.config, plus where the numbers came from."""
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int         # the model's context length
    vocab_size: int
    residual: str = 'vanilla'   # one stream h, decoded through the final norm (model.residual_info('vanilla'))
    qk_norm: bool = False
    norm_position: str = 'pre'
    n_kv_head: int = 0
    model_type: str = ''
    architecture: str = ''
    parallel: bool = False


class _State:
    """What the hooks and the attention function share during one forward."""
    observer = None
    shape = None
    calls = 0
    block_input = None


def _get(obj, path):
    for name in path.split('.'):
        obj = getattr(obj, name)
    return obj


def _linears_for_conv1d(lm):
    """GPT-2's Conv1D (y = x W + b, W stored (in, out)) as nn.Linear (W transposed): the same map, and the
    probe's fake quantisation, which quantises every nn.Linear per output channel, then sees them."""
    from transformers.pytorch_utils import Conv1D
    for module in list(lm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=child.bias is not None,
                                device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(module, name, lin)


def _hidden(args, kwargs):
    """The hidden-states argument of a module call, and a function that puts a replacement back."""
    if args:
        return args[0], lambda new: ((new,) + tuple(args[1:]), kwargs)
    return kwargs['hidden_states'], lambda new: (args, {**kwargs, 'hidden_states': new})


class HFModel(nn.Module):
    """A transformers causal LM that the probe runs like model.GPT (see the module docstring)."""

    def __init__(self, lm):
        super().__init__()
        c = lm.config
        self.lm = lm
        self.layers_path, attn_name, mlp_name, self.mid = layout(c)
        blocks = _get(lm, self.layers_path)
        n_head = c.num_attention_heads
        self.config = HFConfig(
            n_layer=c.num_hidden_layers, n_head=n_head, n_embd=c.hidden_size,
            block_size=c.max_position_embeddings, vocab_size=c.vocab_size,
            qk_norm=hasattr(getattr(blocks[0], attn_name), 'q_norm'),
            norm_position='post' if self.mid.startswith('post:') else 'pre',
            n_kv_head=getattr(c, 'num_key_value_heads', None) or n_head, model_type=c.model_type,
            architecture=type(lm).__name__, parallel=self.mid == 'parallel')
        self.state = state = _State()
        for i, block in enumerate(blocks):
            attn, mlp_in = getattr(block, attn_name), _get(block, mlp_name)
            attn.__dict__['_ledger_probe'] = (state, i)      # a plain attribute, not a submodule
            block.register_forward_pre_hook(self._block_input, with_kwargs=True)
            attn.register_forward_pre_hook(self._input_hook(2 * i), with_kwargs=True)
            mlp_in.register_forward_pre_hook(self._input_hook(2 * i + 1), with_kwargs=True)
            if self.mid == 'parallel':
                attn.register_forward_hook(self._partial_sum_hook(2 * i))
            elif self.mid.startswith('pre:'):
                _get(block, self.mid[4:]).register_forward_pre_hook(self._mid_pre_hook(2 * i), with_kwargs=True)
            else:
                _get(block, self.mid[5:]).register_forward_hook(self._mid_post_hook(2 * i))
            block.register_forward_hook(self._output_hook(2 * i + 1))

    # hooks: all return at once when no observer is set
    def _block_input(self, module, args, kwargs):
        if self.state.observer is not None:
            self.state.block_input = _hidden(args, kwargs)[0]

    def _as_btd(self, x):
        B, T = self.state.shape
        return x.view(B, T, x.shape[-1])     # OPT's MLP runs on (B*T, d): a view of the same tensor

    def _input_hook(self, s):
        def hook(module, args, kwargs):
            obs = self.state.observer
            if obs is None:
                return None
            u, put = _hidden(args, kwargs)
            new = obs.on_input(s, self._as_btd(u))
            return None if new is None else put(new.reshape(u.shape))
        return hook

    def _mid_pre_hook(self, s):
        def hook(module, args, kwargs):
            obs = self.state.observer
            if obs is None:
                return None
            x = self._as_btd(_hidden(args, kwargs)[0])
            out = obs.on_sublayer(s, {'h': x})
            if out and 'h' in out:
                x.copy_(out['h'])   # in place: the block keeps this very tensor as its residual
            return None
        return hook

    def _mid_post_hook(self, s):
        def hook(module, args, output):
            obs = self.state.observer
            if obs is None:
                return None
            out = obs.on_sublayer(s, {'h': self._as_btd(output)})
            return out['h'].reshape(output.shape) if out and 'h' in out else None
        return hook

    def _partial_sum_hook(self, s):
        def hook(module, args, output):
            obs = self.state.observer
            if obs is None:
                return None
            a = output[0] if isinstance(output, tuple) else output
            out = obs.on_sublayer(s, {'h': self.state.block_input + a})
            if out and 'h' in out:
                raise ValueError(f"sublayer {s}: {self.cannot_edit(s)}")
            return None
        return hook

    def _output_hook(self, s):
        def hook(module, args, output):
            obs = self.state.observer
            if obs is None:
                return None
            y = output[0] if isinstance(output, tuple) else output
            out = obs.on_sublayer(s, {'h': y})
            if not (out and 'h' in out):
                return None
            return (out['h'],) + tuple(output[1:]) if isinstance(output, tuple) else out['h']
        return hook

    def cannot_edit(self, s):
        """Why the stream after sublayer s cannot be replaced (zero/mean interventions), or None."""
        if self.mid == 'parallel' and s % 2 == 0:
            return ("a parallel block's attn row is the partial sum h + Attn(N1 h), which the model never holds and "
                    "nothing reads: there is nothing to edit (the mlp rows, block outputs, can be)")
        return None

    def forward(self, idx, targets=None, observer=None):
        """(logits, loss, {}) as model.GPT returns them; observer hooks as model.Observer says."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.config.block_size}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        st = self.state
        st.observer, st.shape, st.calls = observer, (B, T), 0
        try:
            logits = self.lm(input_ids=idx, use_cache=False).logits
        finally:
            st.observer, st.block_input = None, None
        if observer is not None and st.calls != self.config.n_layer:
            raise RuntimeError(f"{self.config.architecture}: {st.calls} of {self.config.n_layer} attention layers went "
                               f"through transformers' AttentionInterface; the probe cannot see this model's attention")
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss, {}

    def down_projections(self):
        """({s = 2i + 1: block i's MLP down-projection}, None), or ({}, why not), for lab.measure's super-weight
        search (DOWN_PROJ says where each family keeps it)."""
        path = DOWN_PROJ.get(self.config.model_type)
        if path is None:
            return {}, f"{self.config.model_type}: where its MLP's down-projection is is not known (hf.DOWN_PROJ)"
        out = {}
        for i, block in enumerate(_get(self.lm, self.layers_path)):
            lin = _get(block, path)
            if not isinstance(lin, nn.Linear):
                return {}, f"{self.config.model_type}: {path} is a {type(lin).__name__}, not an nn.Linear"
            out[2 * i + 1] = lin
        return out, None

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.lm.get_input_embeddings().weight.numel() if non_embedding else n

    def matmul_weights(self):
        """Weights of every nn.Linear (the head included): 2x this is the forward FLOPs per token, attention aside."""
        return sum(m.weight.numel() for m in {id(m): m for m in self.modules() if isinstance(m, nn.Linear)}.values())


def wrap(lm):
    """HFModel of a loaded transformers causal LM (load_model's last step; tests wrap models built in
    memory). lm itself is changed: the probe's attention implementation, Conv1D layers as nn.Linear."""
    register_attention()
    if lm.config._attn_implementation != ATTN:
        lm.set_attn_implementation(ATTN)
    if lm.config._attn_implementation != ATTN:
        raise ValueError(f"{type(lm).__name__} does not let transformers' AttentionInterface run its attention")
    _linears_for_conv1d(lm)
    return HFModel(lm.eval())

# ----------------------------------------------------------------------------------------------
# Tokens: the model's tokenizer and its BOS convention


def bos_convention(tok):
    """(bos id the tokenizer puts before every text or None, the id that stands for 'a document
    starts here' in bos_at_pos0: that BOS, else the tokenizer's bos, else eos, else -1)."""
    plain = tok('a b', add_special_tokens=False)['input_ids']
    full = tok('a b', add_special_tokens=True)['input_ids']
    bos = tok.bos_token_id
    prepends = bos is not None and len(full) > len(plain) and full[0] == bos and full[1:1 + len(plain)] == plain
    marker = next((t for t in (bos, tok.eos_token_id) if t is not None), -1)
    return (bos if prepends else None), marker


def _ids(tok, text):
    return tok(text, add_special_tokens=False)['input_ids']


def text_windows(tok, texts, T, prepend):
    """probe.text_windows with the model's tokenizer: each prompt's tokens ([prepend] first when the
    model's tokenizer puts a BOS there), cut to T and to the shortest prompt."""
    toks = [([prepend] if prepend is not None else []) + _ids(tok, t) for t in texts]
    x, y = prompt_windows(toks, T)
    data = dict(source='text', dataset=None, shards=[], texts=list(texts), num_seqs=len(texts), seq_len=x.size(1),
                seed=None, doc_aligned=False, task=None, truncated_from=[len(t) for t in toks])
    return x, y, data


def tokenizer_key(tok):
    """A hash of what the tokenizer does (its full tokenizer.json when it has one), for the cache."""
    backend = getattr(tok, 'backend_tokenizer', None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(f"{type(tok).__name__}\n{body}".encode()).hexdigest()


def builtin_text():
    """(text, document start offsets) of the built-in corpus' validation documents, in order: the
    documents lab.data.build_corpus puts in val (a hash of the name below VAL_FRACTION), joined."""
    parts, starts, n = [], [], 0
    for name, source in builtin_documents():
        if split_key(name) >= VAL_FRACTION:
            continue
        if not isinstance(source, str):
            data = source.read_bytes()
            if b'\0' in data:
                continue
            try:
                source = data.decode('utf-8')
            except UnicodeDecodeError:
                continue
        if source:
            starts.append(n)
            parts.append(source)
            n += len(source)
    return ''.join(parts), starts


def corpus_windows(tok, num_seqs, T, seed, doc_aligned, prepend, sep, data_root=None):
    """num_seqs windows (x, y) of T tokens of the built-in corpus' validation documents, in the
    model's tokenizer, cached under <data_root>/hf/windows/.

    Window n starts at a seeded character offset (a document start with doc_aligned): the same
    passages for every model. Its text is tokenised from there, a document separator (sep, the
    tokenizer's eos, when it has one) between documents; `prepend` (the BOS the tokenizer puts
    before every text, if any) goes first. y is x shifted by one."""
    key = hashlib.sha256(json.dumps(dict(tokenizer=tokenizer_key(tok), n=num_seqs, T=T, seed=seed,
                                         doc_aligned=doc_aligned, prepend=prepend, sep=sep,
                                         python=platform.python_version(), v=1)).encode())
    path = os.path.join(data_folder(data_root), 'hf', 'windows', f"builtin_{key.hexdigest()[:16]}.npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            return torch.from_numpy(f['x']).long(), torch.from_numpy(f['y']).long(), path
    text, starts = builtin_text()
    rng = np.random.default_rng([seed, 0, 0, 0])
    offsets = rng.choice(starts, num_seqs) if doc_aligned else rng.integers(0, len(text), num_seqs)
    ends = starts[1:] + [len(text)]
    total = T + 1                                    # x = ids[:T], y = ids[1:T + 1]
    rows = []
    for off in offsets:
        ids = [prepend] if prepend is not None else [sep] if doc_aligned and sep is not None else []
        d, pos = int(np.searchsorted(starts, off, side='right')) - 1, int(off)
        while len(ids) < total:
            chars = 8 * (total - len(ids))
            while True:
                end = min(ends[d], pos + chars)
                got = _ids(tok, text[pos:end])
                if end == ends[d] or len(got) > total - len(ids) + 1:   # the last, maybe cut token falls outside
                    break
                chars *= 2                                              # fewer tokens than characters / 8
            ids += got
            if end == ends[d] and len(ids) < total:  # the document ends: a separator, then the next document
                ids += [] if sep is None else [sep]
                d = (d + 1) % len(starts)
                pos = starts[d]
        rows.append(ids[:total])
    buf = np.array(rows, dtype=np.int64)
    x, y = buf[:, :T], buf[:, 1:]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)
    return torch.from_numpy(x), torch.from_numpy(y), path

# ----------------------------------------------------------------------------------------------
# probe.load for hf: inputs


def _matmul_rate():
    """fp32 FLOP/s of this CPU on a 1024^3 matmul (best of a few), the basis of the CPU estimate."""
    if not hasattr(_matmul_rate, 'value'):
        a = torch.randn(1024, 1024)
        best = float('inf')
        for _ in range(4):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        _matmul_rate.value = 2 * 1024 ** 3 / best
    return _matmul_rate.value


def _duration(sec):
    return f"{sec:.0f} s" if sec < 120 else f"{sec / 60:.0f} min" if sec < 7200 else f"{sec / 3600:.1f} h"


def cpu_estimate(model, n_seqs, T, passes):
    """(seconds, one line): forward FLOPs per token 2 x (nn.Linear weights) + 4 L d T (attention
    scores and their weighted sum at full length; the probe computes every map explicitly), times
    the tokens and passes, at the fp32 matmul rate this CPU shows now. Softmax and statistics add
    to it, so it is a lower bound."""
    cfg = model.config
    per_token = 2 * model.matmul_weights() + 4 * cfg.n_layer * cfg.n_embd * T
    rate = _matmul_rate()
    sec = per_token * n_seqs * T * passes / rate
    ref = (2 * 6.5e9 + 4 * 32 * 4096 * T) * n_seqs * T * passes / rate     # LLaMA-2-7B's shape
    return sec, (f"on this CPU at least {_duration(sec)}: {passes} pass(es) of {n_seqs} x {T} tokens at "
                 f"{per_token / 1e9:.3g} GFLOP per token (2 x {model.matmul_weights() / 1e6:.1f}M matmul weights + "
                 f"4 L d T for attention) at the {rate / 1e9:.0f} GFLOP/s of a 1024^2 fp32 matmul here; "
                 f"a 7B model would take {_duration(ref)}. --device cuda runs it on a GPU in bfloat16")


def _snapshot(src):
    """(folder, commit) of a hub model in the local cache: snapshots/<commit>/, or (None, None)."""
    from huggingface_hub import try_to_load_from_cache
    path = try_to_load_from_cache(src.repo, 'config.json', revision=src.revision)
    if not isinstance(path, str):
        return None, None
    return os.path.dirname(path), os.path.basename(os.path.dirname(path))


def load(spec, args, check_only=False):
    """probe.load for hf: inputs: (model, ckpt, x, y, data), or None after the checks alone
    (check_only: everything but the weights and the windows). ckpt['weights'] (probe.json) is
    {kind: 'hf', spec, repo, revision, local, step, commit, folder, dtype, model_type, architecture,
    tokenizer, block, sublayers, attention, name}: where the model came from, what a sublayer is
    (block: FAMILIES' last column, sublayers: in words) and how attention was observed."""
    src = parse(spec)
    require_transformers()
    config = load_config(src)
    tok = load_tokenizer(src)
    context = config.max_position_embeddings
    T = args.seq_len or min(context, DEFAULT_T)
    if T > context:
        raise ValueError(f"--seq_len {T} exceeds the context of {spec}, {context} tokens")
    check_weights(src, config)       # every tensor, from the files' headers: before any input is probed
    if check_only:
        return None
    model = load_model(src, config, args.device, args.dtype)
    prepend, marker = bos_convention(tok)
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    if args.text:
        x, y, data = text_windows(tok, args.text, T, prepend)
    else:
        x, y, cache = corpus_windows(tok, args.num_seqs, T, args.seed, args.doc_aligned, prepend, sep, args.data_root)
        data = dict(source='val', dataset='builtin', shards=[cache], texts=[], truncated_from=[],
                    num_seqs=args.num_seqs, seq_len=T, seed=args.seed, doc_aligned=args.doc_aligned, task=None)
    if int(x.max()) >= model.config.vocab_size:
        raise ValueError(f"{spec}: token id {int(x.max())} of its tokenizer is outside the model's vocab_size "
                         f"{model.config.vocab_size}")
    name, cls = (tok.convert_ids_to_tokens(marker) if marker >= 0 else None), type(tok).__name__
    note = (f"{name} prepended to every sequence: {cls} puts it before every text" if prepend is not None else
            f"nothing prepended: {cls} adds no BOS, so position 0 is each prompt's first token" if args.text else
            f"nothing prepended: {cls} adds no BOS; each window starts at a document, after {name}"
            if args.doc_aligned and sep is not None else
            f"nothing prepended: {cls} adds no BOS, so position 0 is an arbitrary token of the text"
            + (f"; {name} separates documents" if sep is not None else ""))
    data.update(bos=marker, bos_at_pos0=float((x[:, 0] == marker).double().mean()), bos_prepended=prepend is not None,
                bos_note=note)
    step = step_of(src.revision)
    tps = tokens_per_step(src.repo) if not src.local else None
    folder, commit = (os.path.abspath(src.where), None) if src.local else _snapshot(src)
    params = {p.dtype for p in model.parameters()}
    weights = dict(kind='hf', spec=spec, repo=src.repo, revision=src.revision, local=src.local, step=step,
                   commit=commit, folder=folder,
                   dtype=str(params.pop()).removeprefix('torch.') if len(params) == 1 else 'mixed',
                   model_type=config.model_type, architecture=model.config.architecture,
                   tokenizer=type(tok).__name__, block=model.mid, sublayers=sublayers_text(model.mid),
                   attention=f"explicit softmax in the probe's eager attention function ({ATTN}, "
                             f"transformers' AttentionInterface); q, k after RoPE/QK-norm, k and v per query head",
                   name=None)
    ckpt = dict(model_args=asdict(model.config), iter_num=step, tokens=step * tps if step is not None and tps else None,
                weights=weights, config=dict(dataset='builtin' if not args.text else None, data_root=args.data_root))
    if torch.device(args.device).type == 'cpu':   # probe_checkpoint prints it before it starts
        passes = 6 if getattr(args, 'interventions', False) else 1
        ckpt['notice'] = f"{spec}: {cpu_estimate(model, x.size(0), x.size(1), passes)[1]}"
    return model, ckpt, x, y, data

# ----------------------------------------------------------------------------------------------
# Revisions as a training run


def revision_runs(results):
    """runs.py's run dicts (trajectory.json) for the hf: results that are revisions with a step of
    one repo or folder (at least two steps), ordered by step: the revision's step is the run's iter."""
    by_repo = {}
    for r in results:
        w = r.get('weights') or {}
        if w.get('kind') == 'hf' and w.get('step') is not None:
            by_repo.setdefault(w['repo'], {})[w['step']] = r     # a step given twice counts once
    runs = []
    for repo, by_step in by_repo.items():
        if len(by_step) < 2:
            continue
        steps = sorted(by_step)
        rs = [by_step[s] for s in steps]
        tps = tokens_per_step(repo) if not rs[0]['weights']['local'] else None
        tokens = [s * tps if tps else None for s in steps]
        run = dict(name=re.sub(r'[^A-Za-z0-9_.-]+', '_', os.path.basename(os.path.normpath(repo))) or 'hf', path=repo,
                   log=None, residual='vanilla', decoded='h', starts=1, total_batch_size=tps,
                   seq_len=rs[0]['data']['seq_len'], iters=steps, tokens=tokens,
                   val_loss=[r['val_loss'] for r in rs], val_aux={}, streams={},
                   revisions=[r['weights']['revision'] for r in rs])
        for sname in rs[0]['streams']:
            per = [r['streams'][sname]['per_sublayer'] for r in rs]
            sm = [r['streams'][sname]['summary'] for r in rs]
            ratio = [p['top1_median'] for p in per]
            if len({len(v) for v in ratio}) > 1:
                continue                      # different shapes under one name: not one run
            st = dict(n_sublayers=len(ratio[0]), top1_median=ratio, top1_median_max=[max(v) for v in ratio],
                      top1_median_max_sublayer=[int(np.argmax(v)) for v in ratio],
                      n_massive_total=[sum(p['n_massive']) for p in per],
                      kurtosis_max=[max(p['kurtosis']) for p in per], start_mass=[s['start_mass'] for s in sm],
                      start_mass_dominant=[s['start_mass_dominant'] for s in sm],
                      dominant_dim=[s['dominant_dim'] for s in sm], peak_layer=[s['peak_layer'] for s in sm])
            st['crossings'] = first_crossings(steps, tokens, st['top1_median_max'])
            st['dominant'] = channel_history(steps, tokens, st['dominant_dim'])
            st['missing'], st['partial'] = [], []
            run['streams'][sname] = st
        runs.append(run)
    return runs


def revision_text(runs):
    lines = []
    for run in runs:
        tps = run['total_batch_size']
        lines.append(f"=== revisions of {run['path']} as a run: steps {', '.join(map(str, run['iters']))} "
                     f"({', '.join(run['revisions'])}) ===")
        lines.append("x-axis: the revision's training step" + (f" ({tps:,} tokens per step)" if tps else ""))
        for sname, st in run['streams'].items():
            lines.append(f"  stream {sname}: top1/median (max over sublayers, at s) by step: " + '; '.join(
                f"{it}: {m:.4g} (s={s})" for it, m, s in zip(run['iters'], st['top1_median_max'],
                                                            st['top1_median_max_sublayer'])))
            lines.append("    first step with top1/median >= " + ', '.join(
                f"{t}: {st['crossings'][str(t)]['iter'] if st['crossings'][str(t)] else 'never'}" for t in THRESHOLDS)
                + f"; massive entries by step {st['n_massive_total']}; dominant channel by step {st['dominant_dim']}")
    return '\n'.join(lines)


def revision_trajectories(results, out_dir, args):
    """Revisions of one model drawn as a training run (plots.plot_trajectories against the step),
    their text summary, and trajectory.json; [] when there are none. Returns the PNG paths."""
    runs = revision_runs(results)
    if not runs:
        return []
    print(revision_text(runs))
    print()
    files = plot_trajectories(runs, out_dir, THRESHOLDS, x='iters')
    write_trajectories(out_dir, args, runs)
    return files
