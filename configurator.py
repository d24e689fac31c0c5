"""
Poor man's configurator, after nanoGPT. Run from a script as

    exec(open('configurator.py').read())

It walks sys.argv: a bare argument is a Python file of assignments (config/sudoku.py) executed over the
script's globals; --key=value overrides one global, parsed with ast.literal_eval (left a string when that
fails) and type-checked against the default. An int is accepted where a float is expected.
"""
import sys
from ast import literal_eval

for _arg in sys.argv[1:]:
    if not _arg.startswith('--'):
        print(f"Overriding config with {_arg}")
        with open(_arg) as _f:
            exec(_f.read())
        continue
    if '=' not in _arg:
        raise SystemExit(f"configurator: expected --key=value, got {_arg!r}")
    _key, _val = _arg[2:].split('=', 1)
    if _key not in globals() or _key.startswith('_'):
        raise SystemExit(f"configurator: unknown config key {_key!r}")
    try:
        _new = literal_eval(_val)
    except (SyntaxError, ValueError):
        _new = _val
    _old = globals()[_key]
    if isinstance(_old, float) and type(_new) is int:
        _new = float(_new)
    if _old is not None and type(_new) is not type(_old):
        raise SystemExit(f"configurator: --{_key} expects {type(_old).__name__} "
                         f"(default {_old!r}), got {_val!r}")
    print(f"Overriding: {_key} = {_new!r}")
    globals()[_key] = _new
