"""`flexrank profiles`: the shipped device profiles and their targets."""

from __future__ import annotations


def cmd_profiles(args) -> int:
    from flexrank.device.profiles import profiles_table

    print(profiles_table())
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("profiles", help="list the shipped device profiles and their targets")
    p.set_defaults(func=cmd_profiles)
