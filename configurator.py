"""
Poor man's configurator, after nanoGPT. A script sets its config as module-level globals, names them in
`config_keys`, then runs

    exec(open('configurator.py').read())

Each command-line argument is a Python file of assignments (config/sudoku.py), run in a namespace holding
the config so far, or --key=value; the files go first, in their order, then the --key=value overrides,
wherever they stand on the command line. Either way only the keys in config_keys are accepted and every value
keeps its default's type (an int may stand for a float): --key=value is read as that type, so a string
stays a string (--puzzle=4000008050... is text, not a number). A problem is one line naming the argument.
What the arguments set is left in config_overrides (key -> value): a resumed run re-applies only those.
-h or --help prints the script's docstring and every setting with its default.
"""
import ast
import builtins
import os as _os
import sys
from ast import literal_eval


_SCRIPT = _os.path.basename(sys.argv[0]) + ": " if sys.argv[0].endswith(".py") else ""  # errors name the script


def _typed(value, default, where):
    """value as the type of default (value is a string from the command line, or a config file's object)."""
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        try:
            value = {"True": True, "False": False}[value] if kind is bool else literal_eval(value)
        except (KeyError, SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            pass
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise SystemExit(f"{_SCRIPT}{where}: expected {kind.__name__} (default {default!r}), got {value!r}")
    return value


if {'-h', '--help'} & set(sys.argv[1:]):  # the script's docstring, then every setting with its default
    _doc = ''  # read from the script's file: this file's own docstring has replaced the script's __doc__ by now
    if _os.path.isfile(sys.argv[0]):
        with open(sys.argv[0], encoding='utf-8') as _f:
            _doc = ast.get_docstring(ast.parse(_f.read())) or ''
    print(_doc + "\n\n" * bool(_doc) + "settings (config files or --key=value) and their defaults:")
    for _key in config_keys:
        print(f"  --{_key}={globals()[_key]!r}")
    raise SystemExit(0)
config_overrides = {}
for _arg in sorted(sys.argv[1:], key=lambda a: a.startswith('--')):  # files first: the command line wins
    if _arg.startswith('--') and '=' in _arg:
        _key, _val = _arg[2:].split('=', 1)
        if _key not in config_keys:
            raise SystemExit(f"{_SCRIPT}{_arg}: unknown config key {_key!r}")
        globals()[_key] = config_overrides[_key] = _typed(_val, globals()[_key], _arg)
        print(f"Overriding: {_key} = {globals()[_key]!r}")
    elif _arg.endswith('.py') and not _arg.startswith('-'):
        try:
            with open(_arg) as _f:
                _source = _f.read()
        except OSError as _e:
            raise SystemExit(f"{_SCRIPT}{_arg}: cannot read this config file ({_e.strerror})")
        print(f"Overriding config with {_arg}")
        _namespace = {_k: globals()[_k] for _k in config_keys}
        try:
            _tree = ast.parse(_source, _arg)
            exec(builtins.compile(_tree, _arg, "exec"), _namespace)  # `compile` may be a config key
        except Exception as _e:
            raise SystemExit(f"{_SCRIPT}{_arg}: {type(_e).__name__}: {_e}")
        _assigned = {_n.id for _n in ast.walk(_tree) if isinstance(_n, ast.Name) and isinstance(_n.ctx, ast.Store)}
        for _key, _val in _namespace.items():
            if _key.startswith('_') or type(_val).__name__ == 'module' or _key not in _assigned:
                continue  # not a setting, or not set by this file
            if _key not in config_keys:
                raise SystemExit(f"{_SCRIPT}{_arg}: unknown config key {_key!r}")
            globals()[_key] = config_overrides[_key] = _typed(_val, globals()[_key], f"{_arg}: {_key}")
    else:  # a value given as its own argument (--max_steps 5) is the likeliest slip: name the fix
        _before = sys.argv[sys.argv.index(_arg) - 1]
        _hint = f" (write {_before}={_arg})" if _before.startswith('--') and '=' not in _before else ""
        raise SystemExit(f"{_SCRIPT}{_arg}: expected --key=value or a config file ending in .py{_hint}")
