"""`dsa-agent prepare`: one-time set-up run by `make install` (idempotent); `dsa-agent config`: print settings."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from agent.config import Settings, load_settings

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="dsa-agent prepare", description=__doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = load_settings()
    from agent.engine.checkpoints import resolve_model

    resolved = resolve_model(settings.model_path, settings.model_cache_dir)
    log.info("model ready: %s (%s) at %s", resolved.name, resolved.source, resolved.folder)
    _prebuild_onnx(settings, resolved)
    _prebuild_openvino(settings, resolved)
    from agent.serving.triton.launcher import prepare_server

    log.info("triton ready: %s", prepare_server())
    return 0


def _prebuild_onnx(settings: Settings, resolved) -> None:
    """When these settings serve through the ONNX engine (the CPU default for int4), build its model now, so the
    first start of `make run` does not pay the ~15 s build."""
    from agent.config import LoadingStrategy
    from agent.serving.model_loader import choose_strategy, engine_spec

    spec = engine_spec(settings, resolved=resolved)
    if choose_strategy(settings, spec) is not LoadingStrategy.onnx:
        return
    from agent.engine.onnx.build import OnnxBuildOptions, ensure_onnx_model, precision_for

    path = ensure_onnx_model(spec.folder, spec.cache_dir, OnnxBuildOptions(precision_for(spec.quantization)))
    log.info("ONNX model ready: %s", path)


def _prebuild_openvino(settings: Settings, resolved) -> None:
    """When these settings serve through the OpenVINO engine, export its model now (1-5 min on 2 cores for
    SmolLM2-135M), so the first start does not pay for it; other settings export nothing here."""
    from agent.config import LoadingStrategy
    from agent.serving.model_loader import choose_strategy, engine_spec

    spec = engine_spec(settings, resolved=resolved)
    if choose_strategy(settings, spec) is not LoadingStrategy.openvino:
        return
    from agent.engine.openvino.build import ensure_openvino_model, export_options, model_kind, read_config

    config = read_config(spec.folder)
    options = export_options(spec.quantization, config)
    path = ensure_openvino_model(spec.folder, spec.cache_dir, options, kind=model_kind(config))
    log.info("OpenVINO model ready: %s", path)


def _default(field) -> str:
    value = field.default
    value = getattr(value, "value", value)
    if value is None:
        return "(unset)"
    return f"`{value}`".replace(str(Path.home()), "~")


def settings_markdown() -> str:
    """The environment-variable reference (docs/configuration.md is generated from this and checked by a test)."""
    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable (generated from `agent/config.py` by `dsa-agent config --markdown`).",
        "A bad value stops start-up with a message naming the variable and what it allows.",
        "",
        "| Variable | Default | Description |",
        "|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        doc = " ".join((field.description or "").split())
        lines.append(f"| `{name.upper()}` | {_default(field)} | {doc} |")
    return "\n".join(lines) + "\n"


def print_config(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dsa-agent config", description="Print the settings in effect")
    parser.add_argument("--markdown", action="store_true", help="print the reference table (docs/configuration.md)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(settings_markdown(), end="")
        return 0
    settings = load_settings()
    for name in Settings.model_fields:
        value = getattr(settings, name)
        value = getattr(value, "value", value)
        print(f"{name.upper()}={'' if value is None else value}")
    return 0
