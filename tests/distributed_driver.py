"""Runs several ``structlm prune`` commands in one torchrun launch (torchrun's start-up costs seconds),
for tests/test_distributed.py:

    torchrun --standalone --nproc_per_node 2 tests/distributed_driver.py COMMANDS.json

COMMANDS.json: a list of {"argv": [...], "rc": expected exit code}.  Each command is
``structlm.cli.main(argv)``, exactly what ``torchrun -m structlm.cli ...`` runs, one after the
other on every rank (the process group is set up by the first and kept).  Exits 1 when an exit
code differs from the expected one, naming the command."""

from __future__ import annotations

import json
import sys

from structlm import cli


def main(path: str) -> int:
    failed = 0
    for command in json.loads(open(path).read()):
        rc = cli.main(command["argv"])
        if rc != command["rc"]:
            print(f"distributed_driver: exit code {rc}, expected {command['rc']}: structlm {' '.join(command['argv'])}",
                  file=sys.__stderr__)
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
