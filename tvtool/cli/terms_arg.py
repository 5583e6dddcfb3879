"""Positional TERMs (`VECTOR[:WEIGHT]`) that may start with `-` (negation), for merge and eval."""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand


def split_terms(args: list[str], arity: dict[str, int]) -> list[str]:
    """Move every TERM behind `--` so that `-mnist:0.5` is a term, not an option: a token that
    starts with `-` and is not one of this command's options (or their values) is a term."""
    opts: list[str] = []
    terms: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0] if a.startswith("--") else a
        if a == "--":
            terms += args[i + 1 :]
            break
        if name in arity:
            n = 0 if "=" in a and a.startswith("--") else arity[name]
            opts += args[i : i + 1 + n]
            i += n
        elif a.startswith("--") or not a.startswith("-") or a == "-":
            (opts if a.startswith("--") else terms).append(a)
        else:
            terms.append(a)  # -VECTOR[:WEIGHT]
        i += 1
    return [*opts, "--", *terms] if terms else opts


class TermsCommand(TyperCommand):
    """A command whose positional TERMs may start with `-` (negation)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        arity: dict[str, int] = {}
        for p in self.get_params(ctx):
            if getattr(p, "param_type_name", "") == "option":
                n = 0 if p.is_flag or p.count else p.nargs
                for opt in [*p.opts, *p.secondary_opts]:
                    arity[opt] = n
        return super().parse_args(ctx, split_terms(list(args), arity))
