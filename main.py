"""Parley entry point: arguments -> config -> app -> uvicorn.

    python main.py [serve] [--host H] [--port P] [--model-name NAME] ...
    python main.py export-config [--output config_sample.yml]
    python main.py export-openapi [--output openapi.json]
    python main.py download REPO_ID [--revision R] [--include GLOB ...] [--exclude GLOB ...]
                                    [--folder-name NAME] [--token T] [--repo-type TYPE]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loguru import logger

from common.config.loader import ConfigError, Invocation, ParleyConfig, parse_invocation, render_sample_config


def setup_logging(config: ParleyConfig) -> None:
    logger.remove()
    logger.add(
        sys.stderr,
        level=config.logging.log_level,
        format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}",
    )


def serve(config: ParleyConfig) -> None:
    import uvicorn

    from endpoints.http.lifecycle import ParleyServer
    from endpoints.app import create_app

    app = create_app(config)
    loop = "asyncio" if config.developer.disable_uvloop else "auto"
    logger.info("Parley listening on http://{}:{}", config.network.host, config.network.port)
    server = ParleyServer(
        uvicorn.Config(
            app,
            host=config.network.host,
            port=config.network.port,
            loop=loop,
            log_level="info" if config.logging.log_level == "DEBUG" else "warning",
            access_log=False,  # logging.log_requests writes Parley's own request lines
            # Generations were drained before uvicorn shuts down (network.shutdown_timeout); this
            # bounds what is left: cut streams sending their error frame, other slow requests.
            timeout_graceful_shutdown=5,
        ),
        app.state.lifecycle,
    )
    server.run()


def export_openapi(config: ParleyConfig, output: str) -> None:
    from endpoints.app import create_app

    config = config.model_copy(update={"network": config.network.model_copy(update={"disable_auth": True})})
    schema = create_app(config, load_model_on_startup=False).openapi()
    Path(output).write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
    logger.info("Wrote the OpenAPI schema to {}", output)


def download(config: ParleyConfig, options: dict) -> int:
    from common.downloads.cli import download_cli

    return download_cli(config, options)


def run(invocation: Invocation) -> int:
    """Carry out the command; returns the process exit code."""
    config = invocation.config
    if invocation.command == "export-config":
        output = invocation.options.get("output") or "config_sample.yml"
        Path(output).write_text(render_sample_config(), encoding="utf-8")
        logger.info("Wrote {}", output)
    elif invocation.command == "export-openapi":
        export_openapi(config, invocation.options.get("output") or "openapi.json")
    elif invocation.command == "download":
        return download(config, invocation.options)
    else:
        serve(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        invocation = parse_invocation(argv)
    except ConfigError as exc:
        print(f"Configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(invocation.config)
    return run(invocation)


if __name__ == "__main__":
    sys.exit(main())
