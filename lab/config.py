"""
nanoGPT's configuration, checked: a script's keys are options (option: default, help, types,
choices; model.py declares the model's, train.py its own); config files (plain Python assignments, executed) are applied in order, then --key=value
(or --key value) overrides, values parsed as Python literals. An unknown key (with the nearest ones
suggested) or a value of the wrong type is a ConfigError of one line.
"""
import ast
import difflib
import textwrap
import traceback
import types
from collections import namedtuple


Option = namedtuple('Option', 'default help types choices')


def option(default, help, types=None, choices=None):
    """A config option: its default, what train.py --help says of it, the types it takes (those of
    the default unless given; an int is fine for a float) and, for a string, its choices."""
    return Option(default, help, types or (type(default),), choices)


class ConfigError(ValueError):
    """A bad command line or config: reported in one line, exit code 2, nothing written."""


def fits(value, types_):
    """Does value fit the types? An int is fine for a float; a bool is not an int."""
    if isinstance(value, bool):
        return bool in types_
    return isinstance(value, tuple(types_)) or (isinstance(value, int) and float in types_)


def type_names(types_):
    return ' or '.join('None' if t is type(None) else t.__name__ for t in types_)


def checked(keys, key, value, where):
    """The value to store for key, or ConfigError: an unknown key (with the nearest ones) or a wrong type."""
    if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        raise ConfigError(f"unknown key '{key}' {where}" + (f"; did you mean {', '.join(close)}?" if close else
                                                            "; see python train.py --help"))
    types_ = keys[key].types
    if not fits(value, types_):
        raise ConfigError(f"{key} {where} must be {type_names(types_)}, got {type(value).__name__} {value!r}")
    return float(value) if float in types_ and int not in types_ and type(value) is int else value


def parse_value(text, opt):
    """A --key=value string as a Python value: a literal if it parses, else the string itself (also
    when the literal does not fit a key that takes strings: --wandb_run_name=2024 is '2024')."""
    if opt is not None and text in ('true', 'false') and bool in opt.types:
        return text == 'true'
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return text if opt is not None and not fits(value, opt.types) and str in opt.types else value


def read_config_file(path):
    """The settings of a config file: its top-level names that do not start with '_'."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    namespace = {}
    try:
        exec(compile(source, path, 'exec'), namespace)
    except Exception as e:
        lines = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path]
        line = getattr(e, 'lineno', None) if isinstance(e, SyntaxError) else (lines[-1] if lines else '?')
        raise ConfigError(f"{path}, line {line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items() if not k.startswith('_') and not isinstance(v, types.ModuleType)}


def parse_args(argv, keys):
    """{key: (value, where)} from the config files (in order), then the --key=value (or --key value)
    overrides, wherever they stand on the command line."""
    files, overrides, args = [], [], iter(argv)
    for arg in args:
        if not arg.startswith('-'):
            files.append(arg)
            continue
        key, eq, text = arg[2:].partition('=') if arg.startswith('--') else ('', '', '')
        text = text if eq else next(args, None)
        if not key or text is None:
            raise ConfigError(f"expected --key=value, got {arg!r} (see python train.py --help)")
        overrides.append((key, text))
    given = {}
    for path in files:
        for key, value in read_config_file(path).items():
            given[key] = (checked(keys, key, value, f"in {path}"), path)
    for key, text in overrides:
        given[key] = (checked(keys, key, parse_value(text, keys.get(key)), f"(--{key}={text})"), f"--{key}")
    return given


def print_help(keys, sections):
    """Every key with its default, types and help; sections: {first key of a section: its title}."""
    print("usage: python train.py [config/file.py ...] [--key=value ...]")
    print("\nConfig files (plain Python assignments) are applied in order, then the --key=value overrides.")
    print("Values are Python literals (True, 3e-4, None, 'text'); a bare word is a string.\n")
    for key, opt in keys.items():
        if key in sections:
            print(f"\n  {sections[key]}:")
        print(f"  --{key}={opt.default!r}  [{type_names(opt.types)}]")
        print(textwrap.fill(opt.help, width=100, initial_indent=' ' * 8, subsequent_indent=' ' * 8))


def check_choices(cfg, keys):
    """ConfigError for a value outside its key's choices."""
    for key, opt in keys.items():
        if opt.choices and getattr(cfg, key) not in opt.choices:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(map(repr, opt.choices))}")
