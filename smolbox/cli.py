"""The `smolbox` command: one subcommand per stage; every config field is also a flag, `--<section>.<field> VALUE`."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import logs
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
    "eval": "score a run (base against adapter) and its export (every ONNX variant) on a held-out split",
    "serve": "OpenAI-compatible chat server over an export's ONNX graphs (no torch)",
    "demo": "verify, train, export, eval and serve one question on the embedded tiny bundle, offline, on CPU",
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


def run() -> None:
    """The `smolbox` command (and `python -m smolbox`): main(), then the process's exit.

    Before exiting, the objects alive then are frozen out of the garbage collector: the memory goes back to the
    system with the process either way, and Python's last collections over torch's, transformers' and TRL's
    module graphs kept a finished command alive for seconds more (docs/notes.md).
    """
    code = main()
    gc.freeze()
    sys.exit(code)


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
    return {"verify": _verify, "train": _train, "export": _export, "eval": _eval, "serve": _serve, "demo": _demo,
            "config": _print_config}[ns.command](cfg)


def _print_config(cfg) -> int:
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _verify(cfg) -> int:
    from .verify import verify

    report = verify(cfg)
    print(report.table())
    return 0 if report.ok else BLOCKED_EXIT


def _refused(stage, refusal: type[Exception], cfg):
    """Run a stage; its refusal (a config or run it cannot use) is one line on stderr and None."""
    try:
        return stage(cfg)
    except refusal as exc:
        print(f"smolbox: {exc}", file=sys.stderr)
        return None


def _train(cfg) -> int:
    from .train import RunError, plan_run
    from .train.distributed import world

    try:
        plan_run(cfg)  # before the stage imports torch, transformers and TRL, so that a refusal answers at once
        from .train import train

        result = train(cfg)
    except RunError as exc:
        if world().is_main:
            print(f"smolbox: {exc}", file=sys.stderr)
        return BLOCKED_EXIT
    if world().is_main:
        print(f"adapter: {result.adapter_dir}\nmanifest: {result.run_dir / 'manifest.json'}")
        if result.plot:
            print(f"training curves: {result.plot}")
    return 0


def _eval(cfg, results: list | None = None) -> int:
    from .eval import EvalError, evaluate

    logs.use_console()
    done = _refused(evaluate, EvalError, cfg)
    if done is None:
        return BLOCKED_EXIT
    for result in done:
        print(result.table())
        print(f"eval: {result.path}" + (f"\nchart: {result.plot}" if result.plot else ""))
    if results is not None:
        results.extend(done)
    return 0


def _export(cfg) -> int:
    from .export import ExportError, plan_export

    logs.use_console()
    if _refused(plan_export, ExportError, cfg) is None:  # before the stage's imports: a wrong source answers at once
        return BLOCKED_EXIT
    from .export import export

    result = _refused(export, ExportError, cfg)
    if result is None:
        return BLOCKED_EXIT
    flagged = result.manifest["parity_flagged"]
    print(f"export: {result.folder}" + (f"\nparity flagged: {', '.join(flagged)} (see parity.json)" if flagged else ""))
    return 0


def _serve(cfg) -> int:
    from .serve import serve

    logs.use_console()
    try:
        serve(cfg)
    except FileNotFoundError as exc:
        print(f"smolbox: {exc}", file=sys.stderr)
        return BLOCKED_EXIT
    return 0


def _demo(cfg) -> int:
    started = time.perf_counter()
    logs.use_console()  # the first run builds (and pretrains) the tiny bundle: say so while it happens
    if cfg.model.id == "builtin:tiny" and cfg.run.device == "cpu":
        import torch

        # The tiny model's 64-wide ops gain nothing from a second thread, and on a busy machine contending threads
        # made its training several times slower (docs/eval.md).
        torch.set_num_threads(1)
    print("== smolbox demo: verify ==")
    if _verify(cfg) != 0:
        return BLOCKED_EXIT
    print("== smolbox demo: train ==")
    code = _train(cfg)
    if code == 0:
        print("== smolbox demo: export ==")
        code = _export(cfg.model_copy(update={"export": cfg.export.model_copy(update={"overwrite": True})}))
    evals: list = []
    if code == 0:
        print("== smolbox demo: eval ==")
        code = _eval(cfg, evals)
    if code != 0:
        return code
    print("== smolbox demo: serve ==")
    from . import tiny
    from .serve import demo_request

    scene, question, expected = tiny.demo_question()
    picture = Path(cfg.run.output_dir) / cfg.run.name / "demo-question.png"
    scene.image.save(picture)
    answer = demo_request(cfg, scene.image, question).strip()
    print(f"Q: {question}  (picture: {picture})\nA: {answer}" + ("" if tiny.is_builtin(cfg.model.id) and answer == expected
                                                                else f"  (expected: {expected})" if tiny.is_builtin(cfg.model.id) else ""))
    print("\n".join(_demo_summary(evals)))
    print(_next_step(cfg, picture, question))
    print(f"== smolbox demo finished in {time.perf_counter() - started:.0f} s ==")
    return 0


def _demo_summary(evals: list) -> list[str]:
    """One line on what training changed, one per export variant on what it kept."""
    lines = []
    for result in evals:
        r = result.report
        if result.kind == "run" and r["adapter"]:
            base, adapter = r["base"], r["adapter"]
            lines.append(f"training changed: held-out answers right {base['greedy']['exact']:.0%} -> {adapter['greedy']['exact']:.0%}; "
                         f"chosen answer preferred {base['win_rate']:.0%} -> {adapter['win_rate']:.0%} (DPO reward accuracy "
                         f"{adapter['reward_accuracy']:.0%}; {r['samples']} held-out pairs)")
        elif result.kind == "export":
            for variant, entry in r["variants"].items():
                agreement = entry.get("token_agreement")
                size = entry.get("weight_mb")
                lines.append(f"{variant:>5} kept: answers right {entry['greedy']['exact']:.0%}"
                             + ("" if agreement is None else f", tokens equal to fp32's {agreement:.0%}")
                             + ("" if size is None else f", {size:.2g} MB of weights"))
    return lines


def _next_step(cfg, picture: Path, question: str) -> str:
    import json

    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,IMAGE"}},
                                                      {"type": "text", "text": question}]}], "max_tokens": 16}
    data = json.dumps(body).replace("IMAGE", f"'\"$(base64 -w0 {picture})\"'")
    config = "tiny" if cfg.model.id == "builtin:tiny" else "<the same config>"
    return (f"next: serve it over HTTP with `smolbox serve --config {config}`, then ask it from another shell:\n"
            f"  curl -s http://{cfg.serve.host}:{cfg.serve.port}/v1/chat/completions -H 'Content-Type: application/json' -d '{data}'")


if __name__ == "__main__":
    sys.exit(main())
