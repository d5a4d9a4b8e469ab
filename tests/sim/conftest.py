"""The simulation suite: the Python model of the mechanism and its agreement with the
contracts. It uses no ape fixtures: the on-chain tests start their own anvil
(bench/sim_chain.py) and deploy from the artifacts `ape compile` writes."""

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `bench` is a directory of scripts, not an installed package
    sys.path.insert(0, str(REPO))

# Under plain `python -m pytest`, ape's pytest plugin still starts its local chain; make the
# repository's pinned anvil findable the way `./dev test` does.
_ANVIL_BIN = REPO / "node_modules" / ".bin"
if shutil.which("anvil") is None and (_ANVIL_BIN / "anvil").exists():
    os.environ["PATH"] = f"{_ANVIL_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
