"""Entrypoint: the one `verlyard` command. Service subcommands import their package lazily, so each
service deploys alone (an agent host needs only verlyard-shared and verlyard-agent)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from verlyard_shared.cli_args import API_COMMANDS, add_api_commands
from verlyard_shared.cli_nats import add_nats_commands
from verlyard_shared.settings import Settings, SettingsError, load_settings


class CliError(Exception):
    """A one-line error for the user (never a traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verlyard", description="verlyard: LLM training pipelines on your GPUs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the embedded stack (Postgres, NATS, api, scheduler, agent) until Ctrl-C")
    up.add_argument("--home", type=Path, default=None, help="data folder (default: $VERLYARD_HOME or ./.verlyard)")
    up.add_argument("--port", type=int, default=None, help="API port (default 8400)")
    up.add_argument("--no-agent", action="store_true", help="do not start the local agent")
    up.add_argument("--agent-slots", type=int, default=None, help="CPU slots of the local agent")

    sub.add_parser("api", help="run the API service alone (configured by VERLYARD_* env)")
    sub.add_parser("scheduler", help="run the scheduler service alone")
    agent = sub.add_parser("agent", help="run a GPU agent on this host")
    agent.add_argument("--id", dest="agent_id", default=None, help="agent id (default: $VERLYARD_AGENT_ID or hostname)")
    agent.add_argument("--slots", type=int, default=None, help="CPU slots offered (default $VERLYARD_AGENT_SLOTS)")
    agent.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a placement label")
    agent.add_argument(
        "--data-dir", type=Path, default=None, help="work folders and journal (default $VERLYARD_HOME/agent/<id>)"
    )
    sub.add_parser("ssh-runner", help="drive the registered SSH hosts as agents (control plane; docs/adr/0011)")
    sub.add_parser("migrate", help="apply database migrations to $VERLYARD_DATABASE_URL and exit")
    token = sub.add_parser("token", help="manage API tokens (admin)").add_subparsers(
        dest="token_command", required=True, metavar="ACTION"
    )
    token_create = token.add_parser("create", help="create a token; prints it once")
    token_create.add_argument("--role", required=True, choices=["admin", "member", "viewer"])
    token_create.add_argument("--name", default=None, help="a name for the token (shown in the audit log)")
    token_create.add_argument("--json", action="store_true", help="print the API's JSON answer")
    replay = sub.add_parser("replay", help="rebuild the read models from the event log (--verify: only compare)")
    replay.add_argument("--verify", action="store_true", help="report differences instead of rebuilding")
    replay.add_argument("--json", action="store_true", help="print the API's JSON report")
    add_api_commands(sub)
    add_nats_commands(sub)
    return parser


def _require(value: str | None, name: str) -> str:
    if not value:
        raise CliError(f"{name} is not set (or run the embedded stack with `verlyard up`)")
    return value


def _migrate(settings: Settings) -> int:
    from verlyard_shared.store.migrate import migrate
    from verlyard_shared.store.postgres import connect_pool

    async def run() -> list[str]:
        pool = await connect_pool(_require(settings.database_url, "VERLYARD_DATABASE_URL"), min_size=1, max_size=1)
        try:
            return await migrate(pool)
        finally:
            await pool.close()

    applied = asyncio.run(run())
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    settings = load_settings()
    match args.command:
        case "up":
            from verlyard_shared.embedded.stack import StackError, StackOptions, run_stack

            options = StackOptions(
                home=(args.home or settings.home),
                api_port=args.port if args.port is not None else settings.api_port,
                agent=not args.no_agent,
                agent_slots=args.agent_slots if args.agent_slots is not None else settings.agent_slots,
            )
            try:
                return run_stack(options, settings)
            except StackError as exc:
                raise CliError(str(exc)) from None
        case "api":
            from verlyard_api.app import main as api_main

            return api_main(settings)
        case "scheduler":
            from verlyard_scheduler.app import main as scheduler_main

            return scheduler_main(settings)
        case "agent":
            from verlyard_agent.app import main as agent_main

            return agent_main(
                settings, agent_id=args.agent_id, slots=args.slots, labels=args.label, data_dir=args.data_dir
            )
        case "ssh-runner":
            from verlyard_agent.ssh.app import main as ssh_runner_main

            return ssh_runner_main(settings)
        case "migrate":
            return _migrate(settings)
        case "token":
            from verlyard_shared.cli_api import token_create

            return token_create(settings, role=args.role, name=args.name, as_json=args.json)
        case "replay":
            from verlyard_shared.cli_api import replay

            return replay(settings, verify=args.verify, as_json=args.json)
        case "nats":
            from verlyard_shared.cli_nats import NatsCliError, run_nats_command

            try:
                return run_nats_command(args, settings)
            except NatsCliError as exc:
                raise CliError(str(exc)) from None
        case command if command in API_COMMANDS:
            from verlyard_shared.cli_commands import run_command

            return run_command(args, settings)
        case _:
            raise CliError(f"unknown command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (CliError, SettingsError) as exc:
        print(f"verlyard: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        print(
            f"verlyard: error: {exc.name} is not installed on this machine ({args.command} needs it)", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the imported module's main, not this `__main__` copy: the command modules raise
    # `verlyard_shared.cli.CliError`, which must be the class `main` catches.
    from verlyard_shared.cli import main as _main

    sys.exit(_main())
