"""Write and read plan files (the YAML `--plan` takes); the Plan object when the runtime provides it."""
from __future__ import annotations

import os

import yaml

from megahet.errors import MegahetError


def write_plan(plan: dict, path: str) -> None:
    """Atomic YAML write of a plan dict (layers, virtual_stages, expert_parallel, pipelines, predicted)."""
    tmp = path + ".partial"
    try:
        with open(tmp, "w") as fh:
            fh.write("# written by tools/plan.py; pass to training with --plan\n")
            yaml.safe_dump(plan, fh, sort_keys=False, default_flow_style=None, width=120)
        os.replace(tmp, path)
    except OSError as exc:
        raise MegahetError(f"cannot write plan file {path} ({exc.strerror}); pick a writable --output path") from None


def read_plan(path: str) -> dict:
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise MegahetError(f"plan file {path} not found; pass an existing --plan FILE") from None
    except yaml.YAMLError as exc:
        raise MegahetError(f"plan file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or "layers" not in raw or "pipelines" not in raw:
        raise MegahetError(f"plan file {path} needs 'layers' and 'pipelines'; write one with tools/plan.py --output")
    return raw
