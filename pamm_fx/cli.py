"""``pamm-fx explain MODULE:FACTORY``: the rewrite plan of a model, for people and for non-Python CI;
``pamm-fx checks``: every category explain reports for a linear left exact, with the rule it enforces.

FACTORY is a callable in an importable module (or a ``path/to/file.py``) returning
``(model, example_inputs)``. Exit status: 0 on success (and, with ``--check``, an
unchanged plan), 1 when ``--check`` finds a changed plan, 2 on usage errors or when
the factory or the capture fails.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "parse_options", "load_factory"]

EXIT_OK, EXIT_CHANGED, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """A problem with what the user asked for; printed without a traceback."""


def parse_options(text: str) -> dict[str, Any]:
    """``ratio=1/128,min_tokens=1,seed=0`` -> a dict; ints and floats are converted, ``none`` is None."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--options wants key=value pairs separated by commas, got {item!r}")
        options[key.strip()] = _value(value.strip())
    return options


def _value(text: str) -> Any:
    if text.lower() == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def load_factory(spec: str) -> Any:
    """``package.module:factory`` or ``path/to/file.py:factory`` -> the callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"expected MODULE:FACTORY (e.g. mypkg.models:tiny), got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise CliError(f"no such file: {module_name}")
        loader = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CliError(f"cannot import {module_name!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None


def _build(spec: str) -> tuple[Any, tuple[Any, ...]]:
    made = load_factory(spec)()
    if not (isinstance(made, tuple) and len(made) == 2):
        raise CliError(f"{spec} must return (model, example_inputs), got {type(made).__name__}")
    model, inputs = made
    return model, tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pamm-fx", description="Inspect and pin what the pamm backend rewrites.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="report the groups the pamm backend would rewrite, and every skip")
    ex.add_argument("factory", metavar="MODULE:FACTORY", help="callable returning (model, example_inputs)")
    ex.add_argument("--options", default="", help="backend options, e.g. ratio=1/128,min_tokens=1")
    ex.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    ex.add_argument("--graph", choices=("before", "after", "diff", "side"), help="also print graph code")
    ex.add_argument("--dot", metavar="FILE", help="write the graph around each group as Graphviz DOT")
    ex.add_argument("--check", metavar="EXPECTED", help="exit 1 with a diff if the plan differs from this JSON "
                    "file (PAMM_ACCEPT=1 rewrites it)")
    sub.add_parser("checks", help="list the checks: the category each skip reports, and the rule it enforces")
    return parser


def _checks() -> int:
    from pamm_fx.passes import checks  # noqa: F401  (its rows declare their categories)
    from pamm_fx.passes.categories import CATEGORIES, STAGES

    width = max(len(name) for name in CATEGORIES)
    for stage, title in STAGES.items():
        print(f"{title}:")
        print("\n".join(f"  {c.name:<{width}}  {c.doc}" for c in CATEGORIES.values() if c.stage == stage))
    return EXIT_OK


def _explain(args: argparse.Namespace) -> int:
    from pamm_fx.explain import ACCEPT_ENV, check_plan, explain

    options = parse_options(args.options)
    model, inputs = _build(args.factory)
    try:
        report = explain(model, *inputs, **options)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(report.to_json() if args.json else report)
    if args.graph:
        print()
        print(report.graph_text(args.graph))
    if args.dot:
        Path(args.dot).write_text(report.to_dot())
        print(f"wrote {args.dot}", file=sys.stderr)
    if args.check:
        changes = check_plan(report, args.check)
        if changes:
            print(f"\npamm rewrite plan differs from {args.check} (rerun with {ACCEPT_ENV}=1 to accept):",
                  file=sys.stderr)
            print("\n".join(f"  {line}" for line in changes), file=sys.stderr)
            return EXIT_CHANGED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error; argparse has printed why
        return EXIT_OK if exc.code in (0, None) else EXIT_ERROR
    try:
        return _checks() if args.command == "checks" else _explain(args)
    except CliError as exc:
        print(f"pamm-fx: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # the user's factory or model failed: show where
        traceback.print_exc()
        print(f"pamm-fx: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
