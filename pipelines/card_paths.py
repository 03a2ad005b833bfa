"""What a model card may show of the machine that trained the student: no machine path, ever. A local teacher's
folder becomes ``<teacher>``, the output folder ``<output_dir>``, a file of this repository its path in it, any other
absolute path ``<its name>``; secret flags' values (``--hub_token``) become ``<token>``."""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

SECRET = re.compile(r"(^|_)(token|password|secret|key)($|_)", re.I)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


class PathScrubber:
    """Maps machine paths to what a card may show: the teacher -> ``<teacher>``, the output folder ->
    ``<output_dir>``, files of this repository -> their path in it, any other absolute path -> ``<its name>``."""

    def __init__(self, output_dir: str | None, teacher: str | None):
        folders = [(output_dir, "<output_dir>"), (teacher and os.path.expanduser(teacher), "<teacher>")]
        self.roots = sorted(((os.path.realpath(p), name) for p, name in folders if p), key=lambda r: -len(r[0]))
        self.raw = {os.path.abspath(p): name for p, name in folders if p}

    def path(self, value: str) -> str:
        """One token that may be a path."""
        if not value or value.startswith(("http://", "https://", "<")):
            return value
        expanded = os.path.expanduser(value)
        looks_like_path = (os.path.isabs(expanded) or value.startswith(("..", "~"))
                           or (os.path.sep in value and os.path.exists(expanded)))
        real = os.path.realpath(expanded)
        for root, name in self.roots:
            if real == root or real.startswith(root + os.sep):
                return name + real[len(root):].replace(os.sep, "/") if looks_like_path or real == root else value
        if not looks_like_path:
            return value
        if real.startswith(_REPO_ROOT + os.sep):
            return os.path.relpath(real, _REPO_ROOT).replace(os.sep, "/")
        if not (os.path.isabs(expanded) or value.startswith(("..", "~"))):
            return value  # a relative path below the working directory: shows no machine layout
        return f"<{os.path.basename(real.rstrip(os.sep)) or 'path'}>"

    def text(self, text: str) -> str:
        """Whatever slipped through: every spelling of the two folders, then this repository's root."""
        spellings = {**self.raw}
        for root, name in self.roots:
            spellings[root] = name
        for spelling in sorted(spellings, key=len, reverse=True):
            if spelling and os.path.isabs(spelling) and spelling != os.sep:
                text = text.replace(spelling, spellings[spelling])
        return text.replace(_REPO_ROOT + os.sep, "")


def format_training_command(argv: Sequence[str], scrub: PathScrubber | None = None, *,
                            output_dir: str | None = None, teacher: str | None = None) -> str:
    """``argv`` (e.g. ``sys.argv``) as a shell command with one flag per line. A ``.py`` first item gets
    ``accelerate launch`` in front; machine paths become placeholders; values of secret flags (``--hub_token``)
    become ``<token>``."""
    scrub = scrub or PathScrubber(output_dir, teacher)
    argv = [str(a) for a in argv]
    if not argv:
        return ""
    head = ["accelerate", "launch"] if argv[0].endswith(".py") else []

    def quote(token: str) -> str:
        return token if re.fullmatch(r"<[^<>\s]+>(/[\w./-]*)?", token) else shlex.quote(token)

    tokens, secret = [], False
    for token in argv:
        if secret:
            tokens.append("<token>")
            secret = False
            continue
        if re.match(r"^--?[A-Za-z]", token):
            flag, eq, value = token.partition("=")
            if SECRET.search(flag.lstrip("-")):
                if eq:
                    tokens.append(f"{flag}=<token>")
                else:
                    tokens.append(flag)
                    secret = True
                continue
            tokens.append(f"{flag}={quote(scrub.path(value))}" if eq else token)
        else:
            tokens.append(quote(scrub.path(token)))
    lines, current = [], [*head]
    for i, token in enumerate(tokens):
        if token.startswith("-") and re.match(r"^--?[A-Za-z]", token) and current and i > 0:
            lines.append(" ".join(current))
            current = []
        current.append(token)
    lines.append(" ".join(current))
    return " \\\n  ".join(lines)


def format_value(value: Any, scrub: PathScrubber) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v, scrub) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(dict(value), default=str)
    if isinstance(value, (str, os.PathLike)):
        return scrub.path(os.fspath(value))
    return str(value)

