"""Entrypoint: `verlyard nats ...` — per-agent NATS users (docs/adr/0015) for operators.

verlyard nats add-agent ID [--registry FILE] [--env-file FILE] [--nats-url URL] [--rotate]
verlyard nats remove-agent ID [--registry FILE]
verlyard nats list [--registry FILE]
verlyard nats config [--registry FILE]        # the deploy config with every registered agent
verlyard nats permissions ID                  # what that agent's user may publish and subscribe to
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from verlyard_shared.nats_accounts import (
    REGISTRY_NAME,
    AccountsError,
    add_agent,
    credentials_env,
    load_registry,
    registered_users,
    remove_agent,
    write_credentials_env,
)
from verlyard_shared.nats_auth import agent_inbox_prefix, agent_permissions, agent_user
from verlyard_shared.settings import Settings


class NatsCliError(Exception):
    """A one-line error for the user."""


def add_nats_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:  # pyright: ignore[reportPrivateUsage]
    nats = sub.add_parser("nats", help="NATS users: one per agent, limited to its own subjects (control plane)")
    actions = nats.add_subparsers(dest="nats_command", required=True, metavar="ACTION")

    def registry(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--registry", type=Path, default=None, help=f"agent registry (default $VERLYARD_HOME/{REGISTRY_NAME})"
        )

    add = actions.add_parser("add-agent", help="register an agent: a new NATS user and password for its host")
    add.add_argument("agent_id", metavar="ID")
    registry(add)
    add.add_argument(
        "--env-file", type=Path, default=None, help="write the host's credentials here (0600) instead of stdout"
    )
    add.add_argument("--nats-url", default=None, help="also put VERLYARD_NATS_URL in the credentials")
    add.add_argument("--rotate", action="store_true", help="replace the password of a registered agent")
    remove = actions.add_parser("remove-agent", help="revoke an agent's NATS user (render and reload after)")
    remove.add_argument("agent_id", metavar="ID")
    registry(remove)
    listing = actions.add_parser("list", help="the registered agents")
    registry(listing)
    config = actions.add_parser("config", help="print the nats-server config with every registered agent")
    registry(config)
    perms = actions.add_parser("permissions", help="print what an agent's NATS user may publish and subscribe to")
    perms.add_argument("agent_id", metavar="ID")


def run_nats_command(args: argparse.Namespace, settings: Settings) -> int:
    path: Path = getattr(args, "registry", None) or settings.home / REGISTRY_NAME
    try:
        match args.nats_command:
            case "add-agent":
                creds = add_agent(path, args.agent_id, replace=args.rotate)
                if args.env_file is not None:
                    write_credentials_env(args.env_file, creds, nats_url=args.nats_url)
                    print(f"wrote {args.env_file} (0600): copy it to the host's /etc/verlyard/agent.env")
                else:
                    sys.stdout.write(credentials_env(creds, nats_url=args.nats_url))
                print(
                    f"registered NATS user {creds.user} in {path}; now render the config "
                    "(`verlyard nats config`) and reload nats-server",
                    file=sys.stderr,
                )
            case "remove-agent":
                if not remove_agent(path, args.agent_id):
                    raise NatsCliError(f"agent {args.agent_id!r} is not registered in {path}")
                print(f"removed {agent_user(args.agent_id)}; render the config and reload nats-server")
            case "list":
                for agent, entry in sorted(load_registry(path).items()):
                    print(f"{agent}\t{entry.get('user', '')}\t{entry.get('added_at', '')}")
            case "config":
                from verlyard_shared.embedded.nats import render_deploy_config

                sys.stdout.write(render_deploy_config(registered_users(path)))
            case "permissions":
                p = agent_permissions(args.agent_id)
                body = {
                    "user": agent_user(args.agent_id),
                    "inbox_prefix": agent_inbox_prefix(args.agent_id),
                    "publish": p.publish,
                    "subscribe": p.subscribe,
                }
                print(json.dumps(body, indent=2))
            case other:
                raise NatsCliError(f"unknown nats action {other!r}")
    except (AccountsError, ValueError) as exc:
        raise NatsCliError(str(exc)) from None
    return 0
