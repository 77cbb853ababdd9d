"""``secrets reencrypt`` and ``secrets generate-key``: subscription secrets at rest."""

from __future__ import annotations

import argparse
from typing import Any

from dispatcher.cli import context


def cmd_reencrypt(args: argparse.Namespace, ctx: context.Context) -> int:
    from dispatcher.db import pool as db_pool  # noqa: PLC0415
    from dispatcher.db import secrets as db_secrets  # noqa: PLC0415

    box = ctx.secret_box()
    if not box.encrypting:
        raise context.CliError(
            "DISPATCHER_SECRET_KEYS is empty: there is no key to re-encrypt under"
        )
    if args.batch < 1:
        raise context.CliError("--batch must be at least 1")

    async def main(dsn: str) -> db_secrets.Reencrypted:
        pool = await db_pool.create_pool(
            dsn, min_size=1, max_size=1, application_name="dispatcher-cli"
        )
        try:
            return await db_secrets.reencrypt(pool, box, batch=args.batch)
        finally:
            await pool.close()

    with ctx.database() as dsn:
        done = context.run(main(dsn))
    context.print_json({"key_id": box.current_key_id, **done.as_dict()})
    return 0


def cmd_generate_key(args: argparse.Namespace, ctx: context.Context) -> int:
    from dispatcher import secretbox  # noqa: PLC0415

    print(f"{args.key_id}:{secretbox.generate_key()}")
    return 0


def add_commands(sub: Any) -> None:
    keys = sub.add_parser("secrets", help="subscription secrets at rest").add_subparsers(
        dest="subcommand", required=True, metavar="SUBCOMMAND"
    )
    p = keys.add_parser(
        "reencrypt",
        help="seal every secret under the first DISPATCHER_SECRET_KEYS key (online)",
    )
    p.add_argument("--batch", type=int, default=100, help="subscriptions per transaction")
    p.set_defaults(func=cmd_reencrypt)
    p = keys.add_parser("generate-key", help="print a new kid:base64key for DISPATCHER_SECRET_KEYS")
    p.add_argument("--key-id", default="k1")
    p.set_defaults(func=cmd_generate_key)
