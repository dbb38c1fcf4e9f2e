"""`dsa-agent prepare`: one-time set-up run by `make install` (idempotent); `dsa-agent config`: print settings."""

from __future__ import annotations

import argparse
import logging

from agent.config import Settings, load_settings

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="dsa-agent prepare", description=__doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = load_settings()
    from agent.engine.checkpoints import resolve_model

    resolved = resolve_model(settings.model_path, settings.model_cache_dir)
    log.info("model ready: %s (%s) at %s", resolved.name, resolved.source, resolved.folder)
    try:
        from agent.serving.triton_launcher import prepare_server
    except ImportError:  # the Triton door is optional for the FastAPI-only install
        return 0
    log.info("triton ready: %s", prepare_server())
    return 0


def print_config(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="dsa-agent config", description="Print settings").parse_args(argv)
    settings = load_settings()
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        value = getattr(value, "value", value)
        print(f"{name.upper()}={'' if value is None else value}\n    {field.description or ''}")
    return 0
