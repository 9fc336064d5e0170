"""Write plan files: the YAML `--plan` takes, produced through the runtime's Plan object."""
from __future__ import annotations

import os

from megahet.errors import MegahetError


def write_plan(plan: dict, path: str) -> None:
    """Atomic YAML write of a plan dict through the runtime's Plan (so the file is what --plan reads)."""
    from megahet.hetero.plan import Plan
    text = Plan.from_dict(plan, "planned plan").to_yaml()
    tmp = path + ".partial"
    try:
        with open(tmp, "w") as fh:
            fh.write("# written by tools/plan.py; pass to training with --plan\n")
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise MegahetError(f"cannot write plan file {path} ({exc.strerror}); pick a writable --output path") from None
