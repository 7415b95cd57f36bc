"""``distcls``: train, evaluate, label, export, demo.

Every flag is generated from the job's pydantic settings class, so the YAML keys, the flags and the
Python API cannot drift apart: ``--batch-size`` is ``batch_size`` in YAML and in ``TrainConfig``.
Exit codes: 0 success, 2 bad usage or config (argparse's own convention), 1 a job that failed,
3 ``label --fail-on-drift`` when the run's label distribution drifted (the run is committed).
Output: stdout carries only the command's product, the final JSON summary (``runs`` and ``models``:
a table, or with ``runs --json`` JSON); everything for people goes to stderr (``distcls.console``).
"""
from __future__ import annotations

import argparse
import atexit
import importlib.metadata
import json
import logging
import math
import os
import sys
import types
import typing
from typing import Any, Callable

from pydantic import BaseModel

from distcls import console
from distcls.config import (DemoConfig, EvaluateConfig, ExportConfig, LabelConfig, ModelsConfig, RunsConfig,
                            TrainConfig, flag, load_config)
from distcls.errors import JobError, UsageError

log = logging.getLogger(__name__)

EXIT_DRIFT = 3  # distinct from 1 (failed) and 2 (usage): the run succeeded, and a scheduler should alert
EXIT_CODES = ("exit codes: 0 success; 1 the job failed; 2 bad usage or config; 3 label --fail-on-drift "
              "and drift was set (the run is committed)")


def _train(config: TrainConfig) -> dict[str, Any]:
    from distcls.train import train

    return train(config)


def _evaluate(config: EvaluateConfig) -> dict[str, Any]:
    from distcls.evaluate import evaluate

    return evaluate(config)


def _label(config: LabelConfig) -> dict[str, Any]:
    from distcls.label import label

    return label(config)


def _runs(config: RunsConfig) -> dict[str, Any] | str:
    from distcls.runs import runs

    return runs(config)


def _models(config: ModelsConfig) -> str:
    from distcls.models import describe_models

    return describe_models()


def _export(config: ExportConfig) -> dict[str, Any]:
    from distcls.export import export

    return export(config)


def _demo(config: DemoConfig) -> dict[str, Any]:
    from distcls.demo import run_demo

    return run_demo(config)


# A command returns what stdout gets: the data of its JSON line, or a table as text.
COMMANDS: dict[str, tuple[type[BaseModel], Callable[[Any], dict[str, Any] | str], str]] = {
    "train": (TrainConfig, _train, "Train a classifier on a labelled lake with Ray Train; writes <output>/model/."),
    "evaluate": (EvaluateConfig, _evaluate, "Accuracy, per-class precision/recall/F1 and a confusion matrix."),
    "label": (LabelConfig, _label, "Label every image of a lake (or manifest) into a Parquet dataset."),
    "runs": (RunsConfig, _runs, "List the committed runs of a labeling output, newest first."),
    "models": (ModelsConfig, _models, "List the model architectures train --arch accepts."),
    "export": (ExportConfig, _export, "Export a model artifact to ONNX (model.onnx next to it) for --engine onnx."),
    "demo": (DemoConfig, _demo, "Make a lake, train, evaluate and label it, offline, in a few minutes."),
}


_VERBOSE_HELP = "Show DEBUG lines and Ray's own logs (its workers' output, progress bars, warnings)."
_OUTPUT_RULE = ("stdout carries only the final JSON summary (runs and models: their table); progress and "
                "messages go to stderr.")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--epoch 3` must be an error, not silently `--epochs 3`.
    parser = argparse.ArgumentParser(prog="distcls", description="Distributed batch image classification on Ray. "
                                     + _OUTPUT_RULE, epilog=EXIT_CODES, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"distcls {importlib.metadata.version('distcls')}")
    parser.add_argument("--verbose", "-v", action="store_true", help=_VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (settings, _, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES, allow_abbrev=False)
        # Also after the command (`distcls label --verbose`); SUPPRESS keeps `distcls -v label`'s value.
        sub.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
        sub.add_argument("--config", metavar="FILE", help="YAML file of settings; flags override it.")
        # Required settings may come from --config instead, so argparse cannot enforce them (the
        # settings class does, naming the flag); the group shows them apart in --help.
        required = sub.add_argument_group("required (as flags or in --config)")
        positional = getattr(settings, "positional", ())
        for field, info in settings.model_fields.items():
            if field in positional:
                sub.add_argument(field, help=info.description)
            else:
                _add_flag(required if info.is_required() else sub, field, info.alias or field, info.annotation,
                          info.description or "", info.get_default(call_default_factory=False))
        renamed = getattr(settings, "renamed", {})
        deprecated = sub.add_argument_group("deprecated spellings (still accepted, with a warning)") if renamed else None
        for old, new in renamed.items():
            _add_flag(deprecated, old, old, settings.model_fields[new].annotation, f"Use {flag(new)}.", None)
    return parser


def _add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, field: str, name: str, annotation: Any,
              help_text: str, default: Any) -> None:
    flag = "--" + name.replace("_", "-")
    base = _strip_optional(annotation)
    shown = "" if default is None or callable(default) or repr(default) == "PydanticUndefined" else f" (default: {default})"
    kwargs: dict[str, Any] = {"dest": field, "default": None, "help": help_text + shown}
    if base is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif typing.get_origin(base) is list:
        parser.add_argument(flag, nargs="+", metavar="VALUE", **kwargs)
    else:
        parser.add_argument(flag, metavar=field.upper(), **kwargs)


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(verbose=args.verbose)
    settings, run, _ = COMMANDS[args.command]
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "verbose")}
    try:
        config = load_config(settings, args.config, overrides)
        log.debug(f"{args.command} settings: {config.model_dump_json()}")
        with console.stdout_to_stderr():
            result = run(config)
    except UsageError as exc:
        print(f"distcls {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"distcls {args.command}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"distcls {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one line, the traceback only on request
        if os.environ.get("DISTCLS_DEBUG"):
            raise
        print(f"distcls {args.command}: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
              " (set DISTCLS_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    print(result if isinstance(result, str) else json.dumps(_finite(result), default=str, allow_nan=False))
    if getattr(config, "fail_on_drift", False) and ((result or {}).get("quality") or {}).get("drift"):
        print(f"distcls {args.command}: drift: the label distribution moved more than --drift-threshold "
              f"{config.drift_threshold:g} from {', '.join(result['quality']['drifted_from'])}; the run was committed",
              file=sys.stderr)
        return EXIT_DRIFT
    return 0


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: stdout is for machines, and strict JSON parsers
    refuse the bare NaN/Infinity tokens Python writes (a tampered _SUCCESS can hold them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def run(argv: list[str] | None = None) -> typing.NoReturn:
    """The ``distcls`` command: ``main``, the exit handlers (Ray's shutdown among them), then exit
    without the interpreter's teardown, which with torch and Ray loaded spends ~2 s in native code
    freeing modules after the job is done and its output written."""
    code = main(argv)
    with console.stdout_to_stderr():  # Ray's shutdown, and its error thread, may still print
        atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
