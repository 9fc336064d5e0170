"""Pretrain a GPT (dense or MoE) with megahet. Launch with torchrun (see pretrain_gpt.sh).

    torchrun --nproc-per-node N examples/pretrain_gpt.py --config examples/configs/moe_small.yaml [flags]
"""
import logging
import os
import sys

from megahet.config import parse_args
from megahet.errors import MegahetError
from megahet.parallel.context import close_distributed
from megahet.training.pretrain import pretrain


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)  # 1. YAML + Megatron-style flags -> validated config
        pretrain(cfg)  # 2. context, data, model, optimizer, loop, checkpoints, metrics
        close_distributed()  # 3. process groups down before the interpreter exits
    except MegahetError as exc:
        # Expected user errors: one line, no traceback, non-zero exit.
        msg = f"megahet error: {exc}"
        print(msg, file=sys.stderr, flush=True)
        err_file = os.environ.get("MEGAHET_ERROR_FILE")
        if err_file and os.environ.get("RANK", "0") in ("0", ""):
            with open(err_file, "w") as fh:
                fh.write(msg + "\n")
        logging.shutdown()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
