"""The command line of every script: --key=value overrides typed by a dataclass's defaults, a --help generated from
the same defaults and their comments, and user errors as one line with a non-zero exit.

Every CLI keeps its knobs in a dataclass whose fields are its options; --help lists them with the comment after each
field and the section comments above them. This module imports nothing of the project's but data.DataError.
"""
import ast
import dataclasses
import difflib
import inspect
import io
import json
import os
import sys
import textwrap
import tokenize

from data import DataError


class UsageError(Exception):
    """Bad input from the user. The CLIs print it as one line and exit with code 2, no traceback."""


def run_cli(main, usage=None):
    """Runs main(argv); -h or --help prints usage() and exits 0; a user error (UsageError, DataError) becomes
    'error: ...' on stderr and exit code 2; Ctrl-C exits 130, as shells expect of an interrupted command."""
    argv = sys.argv[1:]
    if usage is not None and ("-h" in argv or "--help" in argv):
        try:
            print(usage(), flush=True)
        except BrokenPipeError:  # piped into head, which stopped reading: nothing left to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    try:
        code = main(argv)
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def parse_value(key, text, default):
    kind = type(default)
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UsageError(f"--{key} takes True or False, not '{text}'")
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"--{key} takes a {kind.__name__}, not '{text}'") from None


def parse_overrides(defaults, argv, positional=None):
    """Applies ['--key=value' or '--key value', ...] to the dataclass instance `defaults`. Returns the new instance
    and the set of keys the command line gave. `positional` names the one field a bare argument sets (prepare.py's
    dataset name), if any."""
    fields = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
    changes = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") and positional:
            key, text = positional, arg
        elif arg.startswith("--") and "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif arg.startswith("--") and isinstance(fields.get(arg[2:]), bool):
            key, text = arg[2:], "True"  # a bare --flag switches a boolean on
        elif arg.startswith("--") and arg[2:] in fields and args:
            key, text = arg[2:], args.pop(0)
        elif arg.startswith("--") and arg[2:] not in fields:
            key, text = arg[2:], ""
        else:
            raise UsageError(f"cannot read argument '{arg}': use --key=value (--help lists the options)")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.75)
            hint = f"did you mean {' or '.join('--' + k for k in close)}?" if close else "--help lists the options"
            raise UsageError(f"unknown option --{key}; {hint}")
        changes[key] = parse_value(key, text, fields[key])
    return dataclasses.replace(defaults, **changes), set(changes)


def field_comments(cls):
    """From the source of dataclass `cls`: {field: its comment} and {field: the section comment above it}. A
    comment line whose text starts indented continues the comment of the field above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = {node.lineno: node.target.id for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    comments, sections, section, last = {}, {}, "", None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row = token.start[0]
        if row in lines:
            last = lines[row]
            sections.setdefault(last, section)
        if token.type != tokenize.COMMENT:
            continue
        text = token.string[1:]
        if row in lines:
            comments[last] = text.strip()
        elif text.startswith("  ") and last:  # a continuation
            comments[last] += " " + text.strip()
        else:
            section, last = text.strip(), None
    return comments, sections


def options_help(cls, doc, other_defaults=None, choices=None):
    """--help: the CLI's docstring, then every field of `cls` as --name=default, its type and comment, grouped by
    the section comments; other_defaults ({label: {field: value}}) adds the defaults that apply elsewhere, choices
    ({field: names}) the values a field takes."""
    comments, sections = field_comments(cls)
    other_defaults, choices = other_defaults or {}, choices or {}
    rows, section = [], None
    fields = dataclasses.fields(cls)
    width = max(len(f"--{f.name}={shown(f.default)}") for f in fields) + 2
    for f in fields:
        if sections.get(f.name) != section:
            section = sections.get(f.name)
            rows.append(f"\n{section}:" if section else "")
        others = [f"{label}: {values[f.name]}" for label, values in other_defaults.items() if f.name in values]
        text = (f"{' | '.join(choices[f.name])}: " if f.name in choices else "") + comments.get(f.name, "")
        text += f" [{'; '.join(others)}]" if others else ""
        rows.append(textwrap.fill(text, 118, initial_indent=f"  {f'--{f.name}={shown(f.default)}':<{width}}"
                                  f"{type(f.default).__name__:<6}", subsequent_indent=" " * (width + 8)))
    return (doc or "").strip() + "\n\noptions (--key=value or --key value):\n" + "\n".join(rows)


def shown(value):
    """A default as it would be typed: quoted when empty or holding spaces or control characters."""
    if isinstance(value, str) and (not value or not value.isprintable() or " " in value):
        return json.dumps(value)
    return str(value)
