"""``ttcs-ctl user add|passwd|del|list``: console accounts, kept in the relay's store."""

from __future__ import annotations

import getpass
import os
import sys

from ctl.console import tables
from ctl.console.users import ROLES, UserError, UserStore
from ctl.session import EXIT_DONE, EXIT_FAILED, EXIT_USAGE
from ctl.store import open_store


def add_parser(sub, command) -> None:
    p = command("user", "console users: add, passwd, del, list")
    usub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    pa = command("add", "add a console user", usub)
    pa.add_argument("name")
    pa.add_argument("--role", required=True, choices=ROLES)
    pa.add_argument("--groups", default="", help="operator: the groups (relay.groups) they"
                    " may reach, comma-separated")
    pa.add_argument("--emergency", action="store_true",
                    help="operator: may send emergency bulletins")
    pa.add_argument("--password-file", help="read the password from this file's first line"
                    " (default: prompt twice)")
    pp = command("passwd", "set a console user's password (ends their sessions)", usub)
    pp.add_argument("name")
    pp.add_argument("--password-file")
    pd = command("del", "delete a console user (ends their sessions)", usub)
    pd.add_argument("name")
    command("list", "list console users", usub)


def _password(path: str | None) -> str:
    if path:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise UserError("the passwords differ")
    return first


def main(cfg: dict, args) -> int:
    store = open_store(cfg["relay"])
    try:
        tables.ensure(store)
        users = UserStore(store)
        if args.action == "list":
            for u in users.all():
                extra = f" groups={','.join(u.groups)}" if u.groups else ""
                print(f"{u.name} {u.role}{extra}{' emergency' if u.emergency else ''}")
            return EXIT_DONE
        if args.action == "add":
            groups = [g.strip() for g in args.groups.split(",") if g.strip()]
            unknown = [g for g in groups if g not in cfg["relay"]["groups"]]
            if unknown:
                print(f"warning: not in relay.groups: {', '.join(unknown)}", file=sys.stderr)
            users.add(args.name, args.role, _password(args.password_file), groups,
                      args.emergency)
            print(f"user {args.name} added ({args.role})")
        elif args.action == "passwd":
            users.passwd(args.name, _password(args.password_file))
            print(f"password of {args.name} changed; their sessions ended")
        else:
            users.delete(args.name)
            print(f"user {args.name} deleted")
        return EXIT_DONE
    except UserError as e:
        print(f"ttcs-ctl user: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"ttcs-ctl user: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        store.close()
