"""The `smolbox` command: one subcommand per stage; every config field is also a flag, `--<section>.<field> VALUE`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, check_key, cli_fields, load_config, parse_scalar, shipped_configs

BLOCKED_EXIT = 2  # verify found a blocking problem, or the config/run was refused


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help=f"YAML path or shipped name ({', '.join(shipped_configs())}); default: $SMOLBOX_CONFIG or 'default'")
    parser.add_argument("--env-file", default=None,
                        help="dotenv file with SMOLBOX_* overrides, '' for none (default: $SMOLBOX_ENV_FILE or .env, "
                             "each read only if it exists)")
    group = parser.add_argument_group("config overrides (YAML scalars: 1e-5, true, null, [a, b])")
    for dotted, info in cli_fields():
        # argparse formats help with %: a description such as "train[:6%]" must not break --help
        group.add_argument(f"--{dotted}", dest=f"cfg:{dotted}", metavar="V", default=argparse.SUPPRESS,
                           help=(info.description or "").replace("%", "%%"))


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: parse_scalar(v) for k, v in vars(ns).items() if k.startswith("cfg:")}


COMMANDS = {
    "verify": "preflight checks; exits non-zero on a blocking failure",
    "train": "DPO training with DoRA on a 4-bit base",
    "export": "merge adapters, write ONNX graphs and quantized variants, check parity",
    "serve": "OpenAI-compatible chat server over an export's ONNX graphs (no torch)",
    "demo": "verify + train + export + serve on the embedded tiny bundle, offline, on CPU",
    "config": "print the resolved config as YAML",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolbox", description=f"smolbox {{{','.join(COMMANDS)}}}: " + __doc__.split(": ", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, helptext in COMMANDS.items():
        # No abbreviations: `--train.learning` must be an unknown key (with suggestions), not a guess.
        p = sub.add_parser(name, help=helptext, description=helptext, allow_abbrev=False)
        _add_config_flags(p)
    return parser


def _unknown_flags(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """An unknown `--section.field` is a ConfigError listing the valid keys, closest first; anything else is argparse's."""
    for arg in extra:
        if arg.startswith("--") and "." in arg:
            dotted = arg[2:].split("=", 1)[0]
            check_key(dotted, f"--{dotted}")
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")


def _env_file(ns: argparse.Namespace) -> str:
    """The dotenv to read: --env-file must exist when given; the default ($SMOLBOX_ENV_FILE or .env) is optional."""
    if ns.env_file is None:
        return os.environ.get("SMOLBOX_ENV_FILE") or ".env"
    if ns.env_file and not Path(ns.env_file).is_file():
        raise ConfigError(f"--env-file {ns.env_file}: no such file (leave the flag out to read ./.env when there is one, "
                          "or pass --env-file '' to read none)")
    return ns.env_file


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if ns.command == "demo" and ns.config is None:
        ns.config = "tiny"
    try:
        _unknown_flags(parser, extra)
        cfg = load_config(ns.config, overrides=_overrides(ns), dotenv=_env_file(ns))
    except ConfigError as exc:
        print(f"smolbox: {exc}", file=sys.stderr)
        return BLOCKED_EXIT
    if cfg.run.hf_cache:  # run.hf_cache acts as HF_HOME; set before any Hugging Face library is imported
        os.environ["HF_HOME"] = cfg.run.hf_cache
    if not sys.stderr.isatty():
        # Progress bars redraw with carriage returns: in a log file or `docker logs` they are noise that cuts
        # other lines. Set before any Hugging Face library is imported (they read these once); 0 keeps them.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    return {"verify": _verify, "train": _train, "export": _export, "serve": _serve, "demo": _demo, "config": _print_config}[ns.command](cfg)


def _print_config(cfg) -> int:
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _verify(cfg) -> int:
    from .verify import verify

    report = verify(cfg)
    print(report.table())
    return 0 if report.ok else BLOCKED_EXIT


def _train(cfg) -> int:
    from .distributed import world
    from .train import RunError, train

    try:
        result = train(cfg)
    except RunError as exc:
        if world().is_main:
            print(f"smolbox: {exc}", file=sys.stderr)
        return BLOCKED_EXIT
    if world().is_main:
        print(f"adapter: {result.adapter_dir}\nmanifest: {result.run_dir / 'manifest.json'}")
    return 0


def _export(cfg) -> int:
    from .export import ExportError, export

    _console_logging()
    try:
        result = export(cfg)
    except ExportError as exc:
        print(f"smolbox: {exc}", file=sys.stderr)
        return BLOCKED_EXIT
    flagged = result.manifest["parity_flagged"]
    print(f"export: {result.folder}" + (f"\nparity flagged: {', '.join(flagged)} (see parity.json)" if flagged else ""))
    return 0


def _serve(cfg) -> int:
    from .serve import serve

    _console_logging()
    try:
        serve(cfg)
    except FileNotFoundError as exc:
        print(f"smolbox: {exc}", file=sys.stderr)
        return BLOCKED_EXIT
    return 0


def _console_logging() -> None:
    import logging

    root = logging.getLogger("smolbox")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False  # some libraries configure the root logger; print our lines once


def _demo(cfg) -> int:
    started = time.perf_counter()
    print("== smolbox demo: verify ==")
    if _verify(cfg) != 0:
        return BLOCKED_EXIT
    print("== smolbox demo: train ==")
    code = _train(cfg)
    if code == 0:
        print("== smolbox demo: export ==")
        code = _export(cfg.model_copy(update={"export": cfg.export.model_copy(update={"overwrite": True})}))
    if code == 0:
        print("== smolbox demo: serve ==")
        from .serve import demo_request

        question, answer = demo_request(cfg)
        print(f"Q: {question}\nA: {answer!r}")
    if code == 0:
        print(f"== smolbox demo finished in {time.perf_counter() - started:.0f} s ==")
    return code


if __name__ == "__main__":
    sys.exit(main())
