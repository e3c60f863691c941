#!/usr/bin/env bash
# README's first command exactly as written, in a fresh clone with a fresh venv and no extras, then
# `--help` of every command: a runtime dependency that only an extra pulls in fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/clone"
# Uncommitted changes of a developer's tree count too (CI's tree is a clean clone: nothing to copy).
git -C "$root" diff HEAD --binary | git -C "$work/clone" apply --allow-empty 2>/dev/null || true
first=$(awk '/^```bash$/{inside=1; next} /^```$/{if (inside) exit} inside' README.md)
echo "+ $first"
(cd "$work/clone" && env -u VIRTUAL_ENV bash -euo pipefail -c "$first")
"$work/clone/.venv/bin/python" - <<'PY'
"""Render --help of every dspex-celery command and sub-command in the fresh venv."""
import subprocess
import sys
from pathlib import Path

import click

from dspex_celery.cli import cli

exe = str(Path(sys.executable).with_name("dspex-celery"))


def commands(group: click.Group, prefix: tuple[str, ...] = ()):
    """Every command path; the group's commands are lazy: list_commands + get_command find them."""
    yield prefix
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


for path in commands(cli):
    done = subprocess.run([exe, *path, "--help"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or done.stderr.strip():
        sys.exit(f"dspex-celery {' '.join(path)} --help failed ({done.returncode}):\n{done.stderr}")
    print(f"ok: dspex-celery {' '.join(path)} --help")
PY
