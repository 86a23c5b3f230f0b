"""``medsamix-users``: manage the server's users file (passwords stored as scrypt hashes).

    medsamix-users --file STATE/users.json add alice --role annotator   # password read from the terminal / stdin
    medsamix-users --file STATE/users.json remove alice
    medsamix-users --file STATE/users.json list

A running server picks changes up on the next request of that user.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from .auth import ROLES, check_password_policy, hash_password, read_users, write_users
from .cli import DEFAULT_APP


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="medsamix-users", description=__doc__.splitlines()[0])
    p.add_argument("--file", default=str(DEFAULT_APP / "state" / "users.json"), help="users file")
    sub = p.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="add a user or change a user's password and role")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    rm = sub.add_parser("remove", help="remove a user")
    rm.add_argument("name")
    sub.add_parser("list", help="list users and roles")
    a = p.parse_args(argv)
    path = Path(a.file)
    try:
        users = read_users(path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.cmd == "list":
        for name, entry in sorted(users.items()):
            print(f"{name}\t{entry['role']}")
        return 0
    if a.cmd == "remove":
        if users.pop(a.name, None) is None:
            print(f"error: {path}: no user {a.name!r}", file=sys.stderr)
            return 2
        write_users(path, users)
        return 0
    if not a.name or len(a.name) > 64 or any(c in a.name for c in ":/\\ \t\n\x00"):
        print("error: user names are 1-64 characters without ':', '/', '\\' or white space", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {a.name}: ")
        if getpass.getpass("again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\n")
    try:
        check_password_policy(password)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    users[a.name] = {"role": a.role, "password": hash_password(password)}
    write_users(path, users)
    print(f"{path}: {a.name} ({a.role})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
