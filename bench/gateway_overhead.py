"""Gateway overhead benchmark: direct to an instant upstream vs through Pura vs through LiteLLM.

    .venv/bin/python bench/gateway_overhead.py                 # full run (about 15 minutes)
    .venv/bin/python bench/gateway_overhead.py --duration 4 --rounds 1 --no-litellm
    .venv/bin/python bench/gateway_overhead.py --clients 1 --no-litellm --compare ../pura-base

What it does, in one run:

1. starts Pura's LOCAL STAND-IN provider (``pura provider``) as the "instant" upstream: it
   answers every request at once with a small deterministic completion;
2. starts Pura (``pura serve``, one uvicorn worker, SQLite, request log on) with its full path:
   key auth, sliding-window rate limit, budget reservation, routing, settlement/accounting;
3. starts LiteLLM's proxy (``litellm[proxy]==1.100.0`` in its own venv, ``bench/.litellm-venv``,
   created on first use; one worker, bound to 127.0.0.1) routing the same model to the same
   upstream;
4. drives each target with wrk (Debian's package; a small Lua script sends the POST body and
   reports percentiles as JSON), alternating direct / Pura / LiteLLM within every round, for
   1, 50 and 200 connections, streaming and not, and keeps the median over rounds.

``--compare DIR`` also starts the gateway of another checkout of this repository (for example a
``git worktree`` of the commit before a change; it runs on this venv) as target ``pura-cmp``,
against the same upstream and alternating with the others in every round: on a machine shared
with other work, figures taken minutes apart are not comparable, figures taken in the same round
are. With one Pura worker the table also shows each gateway's CPU time per request (user +
system, from ``/proc``), which moves far less with the machine's load than latency does.

It measures and reports; it asserts nothing. Output: a table on stdout and JSON in
``bench/out/gateway_overhead.json``. Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
LITELLM_VENV = ROOT / "bench" / ".litellm-venv"
LITELLM_PIN = "litellm[proxy]==1.100.0"
MODEL = "bench-model"

LUA = r"""
wrk.method = "POST"
wrk.body = [[__BODY__]]
wrk.headers["Content-Type"] = "application/json"
__AUTH__
function done(summary, latency, requests)
  local out = string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"mean_us": %.1f, "errors_connect": %d, "errors_read": %d, "errors_write": %d, ' ..
    '"errors_status": %d, "errors_timeout": %d}',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout)
  io.stderr:write("WRKJSON " .. out .. "\n")
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not come up")


@dataclass
class Target:
    name: str
    url: str  # full chat completions URL
    auth: str | None = None
    pid: int | None = None  # the serving process, when its CPU time is all its own (one worker)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/<pid>/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], env: dict | None = None, log: Path | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        out = open(log, "wb") if log else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, cwd=cwd,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def ensure_litellm() -> Path:
    litellm = LITELLM_VENV / "bin" / "litellm"
    if litellm.exists():
        return litellm
    print(f"creating {LITELLM_VENV} with {LITELLM_PIN} (first run only)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_PIN], check=True)
    return litellm


def run_wrk(target: Target, connections: int, duration_s: int, stream: bool, workdir: Path) -> dict:
    body = json.dumps({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        "stream": stream,
    })
    auth = f'wrk.headers["Authorization"] = "Bearer {target.auth}"' if target.auth else ""
    script = workdir / f"wrk_{target.name}_{int(stream)}.lua"
    script.write_text(LUA.replace("__BODY__", body).replace("__AUTH__", auth))
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s",
           "-s", str(script), target.url]
    cpu_before = cpu_seconds(target.pid) if target.pid else 0.0
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    cpu = cpu_seconds(target.pid) - cpu_before if target.pid else None
    line = next((ln for ln in result.stderr.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk produced no summary: {result.stdout}\n{result.stderr}")
    data = json.loads(line[len("WRKJSON "):])
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    data["errors"] = sum(v for k, v in data.items() if k.startswith("errors_"))
    data["cpu_us_per_request"] = cpu / data["requests"] * 1e6 if cpu is not None and data["requests"] else None
    return data


def start_pura(procs: Processes, tree: Path, name: str, routing: Path, workdir: Path,
               workers: int) -> Target:
    """The gateway of the checkout ``tree`` on a free port, its own SQLite file and bench key."""
    port = free_port()
    db_url = f"sqlite:///{workdir / (name + '.db')}"
    env = {"PURA_CONFIG": str(routing), "PURA_DATABASE_URL": db_url, "PURA_LOG_REQUESTS": "true",
           "PYTHONPATH": str(tree)}  # that checkout's gateway package, not this one's
    key = subprocess.run(
        [str(VENV_PY), "-m", "gateway.cli", "--database-url", db_url, "keys", "create",
         "--label", "bench", "--daily-budget-usd", "1000000", "--rate-limit", "1000000000"],
        capture_output=True, text=True, check=True, cwd=tree, env={**os.environ, **env},
    ).stdout.strip()
    serve = [str(VENV_PY), "-m", "gateway.cli", "serve", "--port", str(port)]
    if workers > 1:
        serve = [str(VENV_PY), "-m", "uvicorn", "--factory", "gateway.app:create_app",
                 "--port", str(port), "--workers", str(workers),
                 "--log-level", "warning", "--no-access-log"]
    proc = procs.start(serve, env=env, log=workdir / f"{name}.log", cwd=tree)
    wait_http(f"http://127.0.0.1:{port}/health")
    return Target(name, f"http://127.0.0.1:{port}/v1/chat/completions", auth=key,
                  pid=proc.pid if workers == 1 else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per scenario")
    parser.add_argument("--clients", default="1,50,200")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--pura-workers", type=int, default=1)
    parser.add_argument("--compare", type=Path, default=None, metavar="DIR",
                        help="also measure the gateway of another checkout (target pura-cmp)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gateway_overhead.json")
    args = parser.parse_args()

    if shutil.which("wrk") is None:
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2
    clients = [int(c) for c in args.clients.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="pura-bench-"))
    procs = Processes()
    try:
        upstream_port = free_port()
        procs.start([str(VENV_PY), "-m", "gateway.cli", "provider", "--port", str(upstream_port),
                     "--model", MODEL], log=workdir / "upstream.log")
        wait_http(f"http://127.0.0.1:{upstream_port}/health")

        routing = workdir / "routing.toml"
        routing.write_text(
            "[[providers]]\n"
            'name = "instant"\n'
            f'base_url = "http://127.0.0.1:{upstream_port}/v1"\n'
            "local_stand_in = true\n"
            "  [[providers.models]]\n"
            f'  id = "{MODEL}"\n'
            '  tier = "cheap"\n'
            '  input_usd_per_mtok = "0.10"\n'
            '  output_usd_per_mtok = "0.40"\n'
        )
        targets = [Target("direct", f"http://127.0.0.1:{upstream_port}/v1/chat/completions")]
        targets.append(start_pura(procs, ROOT, "pura", routing, workdir, args.pura_workers))
        if args.compare is not None:
            targets.append(start_pura(procs, args.compare.resolve(), "pura-cmp", routing, workdir,
                                      args.pura_workers))
        if not args.no_litellm:
            litellm = ensure_litellm()
            litellm_port = free_port()
            cfg = workdir / "litellm.yaml"
            cfg.write_text(
                "model_list:\n"
                f"  - model_name: {MODEL}\n"
                "    litellm_params:\n"
                f"      model: openai/{MODEL}\n"
                f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
                "      api_key: none\n"
                # the production toggles of LiteLLM's own "best practices" page (no DB here)
                "litellm_settings:\n"
                "  telemetry: false\n"
                "  set_verbose: false\n"
                "  drop_params: true\n"
                "  request_timeout: 600\n"
                "general_settings:\n"
                "  disable_spend_logs: true\n"
                "  disable_error_logs: true\n"
            )
            procs.start(
                [str(litellm), "--config", str(cfg), "--host", "127.0.0.1", "--port",
                 str(litellm_port), "--num_workers", "1"],
                env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                     "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"},
                log=workdir / "litellm.log",
            )
            wait_http(f"http://127.0.0.1:{litellm_port}/health/liveliness", timeout_s=180)
            targets.append(Target("litellm", f"http://127.0.0.1:{litellm_port}/v1/chat/completions"))

        for target in targets:  # warm-up (connection pools, caches, JIT-free but lazy imports)
            for stream in (False, True):
                run_wrk(target, 10, 2, stream, workdir)

        results: dict = {}
        for stream in (False, True):
            for c in clients:
                scenario = f"{'stream' if stream else 'json'}@{c}"
                runs: dict[str, list[dict]] = {t.name: [] for t in targets}
                for round_ in range(args.rounds):
                    order = targets[round_ % len(targets):] + targets[: round_ % len(targets)]
                    for target in order:
                        runs[target.name].append(run_wrk(target, c, args.duration, stream, workdir))
                        print(f"  {scenario:<11} round {round_ + 1} {target.name:<8} "
                              f"{runs[target.name][-1]['rps']:8.0f} req/s  "
                              f"p50 {runs[target.name][-1]['p50_us'] / 1000:7.2f} ms", file=sys.stderr)
                results[scenario] = {
                    name: {
                        "rounds": data,
                        "median_rps": statistics.median(d["rps"] for d in data),
                        "median_p50_ms": statistics.median(d["p50_us"] for d in data) / 1000,
                        "median_p99_ms": statistics.median(d["p99_us"] for d in data) / 1000,
                        "median_cpu_us_per_request": (
                            statistics.median(d["cpu_us_per_request"] for d in data)
                            if data[0]["cpu_us_per_request"] is not None else None
                        ),
                        "errors": sum(d["errors"] for d in data),
                    }
                    for name, data in runs.items()
                }

        summary = {}
        for scenario, per in results.items():
            direct = per["direct"]
            for name, m in per.items():
                if name == "direct":
                    continue
                m["added_p50_ms"] = m["median_p50_ms"] - direct["median_p50_ms"]
                m["added_p99_ms"] = m["median_p99_ms"] - direct["median_p99_ms"]
            if "litellm" in per and per["litellm"]["median_rps"] > 0:
                summary[f"{scenario} pura/litellm throughput"] = per["pura"]["median_rps"] / per["litellm"]["median_rps"]

        report = {
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "loadavg_at_end": os.getloadavg()},
            "settings": {"duration_s": args.duration, "rounds": args.rounds, "clients": clients,
                         "pura_workers": args.pura_workers, "litellm": None if args.no_litellm else LITELLM_PIN,
                         "compare": str(args.compare) if args.compare else None,
                         "load_generator": "wrk -t1 (Debian), Lua POST script"},
            "results": results,
            "summary": summary,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print_table(results)
        for k, v in summary.items():
            print(f"{k}: {v:.2f}x")
        print(f"JSON: {args.out}")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(results: dict) -> None:
    header = (f"{'scenario':<12}{'target':<9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}"
              f"{'+p99 ms':>9}{'errors':>8}{'cpu us/req':>12}")
    print(header)
    print("-" * len(header))
    for scenario, per in results.items():
        for name, m in per.items():
            added50 = f"{m['added_p50_ms']:9.2f}" if "added_p50_ms" in m else f"{'':>9}"
            added99 = f"{m['added_p99_ms']:9.2f}" if "added_p99_ms" in m else f"{'':>9}"
            cpu = m["median_cpu_us_per_request"]
            cpu_text = f"{cpu:12.0f}" if cpu is not None else f"{'':>12}"
            print(f"{scenario:<12}{name:<9}{m['median_rps']:9.0f}{m['median_p50_ms']:9.2f}"
                  f"{m['median_p99_ms']:9.2f}{added50}{added99}{m['errors']:8d}{cpu_text}")


if __name__ == "__main__":
    sys.exit(main())
