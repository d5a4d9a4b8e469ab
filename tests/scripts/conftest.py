"""Fixtures for the script suite: anvil chains on free loopback ports, and a runner that
invokes `ape run <script>` as a subprocess exactly as a user would.

Nothing here uses ape's in-process provider: the scripts are separate processes talking to
an anvil this suite started, and the tests read the chain back with plain web3.py (ABIs
from the project's build). Deployment files go to a temporary directory
(`PURA_DEPLOYMENTS_DIR`), never into the repository.

Each `ape run` costs ~5 s of start-up (imports), so the suite shares one local deployment
across the operating-script tests and runs independent failure checks in parallel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from web3 import Web3

REPO = Path(__file__).resolve().parents[2]
BIN_DIRS = [REPO / ".venv" / "bin", REPO / "node_modules" / ".bin"]
MNEMONIC = "test test test test test test test test test test test junk"  # ape-config.yaml's and anvil's
USDC = 10**6
EPOCH = 3600  # deployments/params/ethereum-local.json


def _path_env() -> str:
    return os.pathsep.join([str(p) for p in BIN_DIRS] + [os.environ.get("PATH", "")])


def _which(name: str) -> str:
    found = shutil.which(name, path=_path_env())
    if not found:
        pytest.skip(f"{name} is not installed (run ./dev bootstrap)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Anvil:
    """An anvil process on a free loopback port; stopped by its own PID only."""

    def __init__(self, log_dir: Path, *extra: str, chain_id: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [_which("anvil"), "--port", str(self.port), "--host", "127.0.0.1", "--hardfork", "prague",
               "--mnemonic", MNEMONIC, "--accounts", "10"]
        if chain_id is not None:
            cmd += ["--chain-id", str(chain_id)]
        cmd += list(extra)
        self.log = open(log_dir / f"anvil-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.w3 = Web3(Web3.HTTPProvider(self.url, request_kwargs={"timeout": 30}))
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.w3.is_connected():
                    break
            except Exception:  # noqa: BLE001
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"anvil did not start: {cmd}")
            time.sleep(0.05)

    def rpc(self, method: str, params: list | None = None):
        resp = self.w3.provider.make_request(method, params or [])
        if "error" in resp:
            raise RuntimeError(f"{method}: {resp['error']}")
        return resp["result"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@dataclass
class Result:
    args: list[str]
    rc: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def ok(self) -> "Result":
        assert self.rc == 0, f"ape run {' '.join(self.args)} exited {self.rc}:\n{self.text}"
        return self

    def failed(self, *needles: str) -> "Result":
        assert self.rc != 0, f"ape run {' '.join(self.args)} should have failed:\n{self.text}"
        for n in needles:
            assert n in self.err, f"{n!r} not in stderr of ape run {' '.join(self.args)}:\n{self.text}"
        return self


class Runner:
    """Runs `ape run <script> ...` from the repository root with a controlled environment."""

    def __init__(self, env: dict[str, str]):
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("PURA_", "APE_FOUNDRY", "APE_ACCOUNTS_"))}
        base.update(PATH=_path_env(), APE_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
        base.update(env)
        self.env = base
        self.ape = _which("ape")

    def cmd(self, script: str, *args: str) -> list[str]:
        return [self.ape, "run", script, *args]

    def run(self, script: str, *args: str, env: dict | None = None, unset: tuple = (), timeout: float = 240) -> Result:
        e = dict(self.env, **(env or {}))
        for k in unset:
            e.pop(k, None)
        p = subprocess.run(self.cmd(script, *args), cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
        return Result([script, *args], p.returncode, p.stdout, p.stderr)

    def popen(self, script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(script, *args), cwd=REPO, env=dict(self.env, **(env or {})),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def parallel(self, *calls) -> list[Result]:
        """Independent runs at once, two at a time (each call: a tuple of `run` arguments, or
        a zero-argument callable)."""
        def one(c):
            return c() if callable(c) else self.run(*c)
        with ThreadPoolExecutor(max_workers=2) as ex:
            return list(ex.map(one, calls))


def finish(p: subprocess.Popen, timeout: float = 240) -> Result:
    out, err = p.communicate(timeout=timeout)
    return Result(p.args[2:], p.returncode, out, err)


def kill(p: subprocess.Popen) -> None:
    """SIGKILL a process this suite started (by its PID)."""
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)


# ====================================================================== chain reading


_ABIS: dict[str, list] = {}


def abi(name: str) -> list:
    if name not in _ABIS:
        from ape import project

        ct = getattr(project, name).contract_type
        _ABIS[name] = [a.model_dump(mode="json", by_alias=True) for a in ct.abi]
    return _ABIS[name]


def runtime_code(name: str) -> bytes:
    from ape import project

    code = getattr(project, name).contract_type.runtime_bytecode.bytecode
    return bytes.fromhex(code[2:])


CONTRACT_TYPES = {"token": "TestToken", "registry": "CapacityRegistry", "pricing": "PricingCurve",
                  "escrow": "EscrowBuffer", "pool": "BackpressurePool", "tracker": "CompletionTracker"}


class Chain:
    """web3.py views of a deployment recorded in a deployment file."""

    def __init__(self, anvil: Anvil, record: dict):
        self.anvil, self.w3, self.record = anvil, anvil.w3, record
        self.c = {}
        for name, entry in record["contracts"].items():
            self.c[name] = self.w3.eth.contract(address=entry["address"], abi=abi(CONTRACT_TYPES[name]))
        self.c["token"] = self.w3.eth.contract(address=record["settlement_token"]["address"], abi=abi("TestToken"))
        self.tasks = {n: bytes.fromhex(h[2:]) for n, h in record["task_types"].items()}

    def __getattr__(self, name):
        if name in ("c",):
            raise AttributeError(name)
        if name in self.c:
            return self.c[name].functions
        raise AttributeError(name)

    def nonce(self, address: str) -> int:
        return self.w3.eth.get_transaction_count(address)

    def head(self):
        return self.w3.eth.get_block("latest")

    def epoch(self) -> int:
        e = self.record["epoch"]
        return (self.head().timestamp - e["genesis"]) // e["length"]

    def to_epoch(self, k: int, offset: int = 5):
        """Mines a block at `offset` seconds into epoch k (time only moves forward)."""
        e = self.record["epoch"]
        ts = e["genesis"] + k * e["length"] + offset
        assert ts > self.head().timestamp, "cannot move time backwards"
        self.anvil.rpc("evm_setNextBlockTimestamp", [ts])
        self.anvil.rpc("evm_mine")

    def next_epoch(self, offset: int = 5) -> int:
        k = self.epoch() + 1
        self.to_epoch(k, offset)
        return k

    def events(self, contract: str, event: str, from_block: int = 0) -> list:
        if from_block > self.w3.eth.block_number:
            return []
        ev = getattr(self.c[contract].events, event)
        return list(ev().get_logs(from_block=from_block))


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ====================================================================== the shared local deployment


@dataclass
class Local:
    anvil: Anvil
    runner: Runner
    path: Path
    record: dict
    chain: Chain
    deploy: Result
    dep_dir: Path


@pytest.fixture(scope="session")
def script_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scripts")


@pytest.fixture(scope="session")
def local(script_tmp):
    """One anvil (chain id 31337) and one `ape run deploy --network ethereum:local:foundry`,
    shared by the operating-script tests. ape-foundry connects to this anvil through
    APE_FOUNDRY_HOST instead of starting its own."""
    anvil = Anvil(script_tmp)
    dep_dir = script_tmp / "local-deployments"
    dep_dir.mkdir()
    runner = Runner({"APE_FOUNDRY_HOST": anvil.url, "PURA_DEPLOYMENTS_DIR": str(dep_dir)})
    try:
        res = runner.run("deploy", "--network", "ethereum:local:foundry").ok()
        path = dep_dir / "ethereum-local.json"
        record = load_json(path)
        yield Local(anvil, runner, path, record, Chain(anvil, record), res, dep_dir)
    finally:
        anvil.stop()
