"""Compose ``params.yaml`` from a profile in ``conf/`` with DVC's own Hydra composition.

``dvc exp run -S profile=smoke`` does this itself before running (hydra is enabled in
``.dvc/config``). This command is for plain ``dvc repro`` users and for the tests:

    python -m pipelines.profile smoke            # writes params.yaml for the smoke profile
    python -m pipelines.profile default          # back to the committed default
    python -m pipelines.profile smoke train.max_steps=2 --output /tmp/params.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from core.errors import exit_status
from pipelines.params import CONF_DIR, available_profiles, load_params


def compose_params(profile: str, output: Path, overrides: list[str] = ()) -> None:
    """Write the composed params of ``profile`` (plus Hydra ``overrides``) to ``output``.

    Composed into a private file beside ``output`` and moved over it only once it passes the
    schema: a composition the schema refuses (a password in ``store.url``, say) leaves
    ``output`` as it was and no copy of the refused values behind."""
    from dvc.utils.hydra import compose_and_dump

    if profile not in available_profiles():
        raise SystemExit(f"error: unknown profile {profile!r}; choose from {', '.join(available_profiles())}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)    # outputs/ does not exist in a fresh clone
    handle, draft = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".yaml", dir=output.parent)
    os.close(handle)
    try:
        compose_and_dump(Path(draft), str(CONF_DIR), None, "config", str(CONF_DIR),
                         [f"profile={profile}", *overrides])
        load_params(Path(draft))
        os.replace(draft, output)
    finally:
        Path(draft).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.profile", description=__doc__.splitlines()[0])
    parser.add_argument("profile", choices=available_profiles())
    parser.add_argument("overrides", nargs="*", help="Hydra overrides such as train.max_steps=2")
    parser.add_argument("--output", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    status = exit_status(lambda: compose_params(args.profile, args.output, args.overrides))
    if status == 0:
        print(f"wrote {args.output} for profile {args.profile}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
