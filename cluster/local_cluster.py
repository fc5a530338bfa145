"""Start and stop a local multi-node Ray cluster on this one machine.

    python -m cluster.local_cluster start --workers 1     # head + 1 worker node
    python -m cluster.local_cluster status
    python -m cluster.local_cluster stop

Then, from the repository root (README.md ("Run on a Ray cluster") has the batch and Serve commands too):

    export RAY_AUTH_MODE=token      # the nodes use Ray's token auth; clients send ~/.ray/auth_token
    ray job submit --address http://127.0.0.1:8266 --working-dir . --runtime-env cluster/runtime_env.yaml \\
        -- python -m train --config train/configs/tiny.yaml scaling.placement_strategy=STRICT_SPREAD

Each node is one `ray start --block` process (its own process group) with its own CPUs, a custom
resource that names it (`local_head`, `local_worker_1`, ...), its own temp dir under --root, and
its own ports. So it clashes neither with a Ray that `ray.init()` starts (default ports, /tmp/ray)
nor with another such cluster given another --root, --port and --dashboard-port. `stop` ends only
what this cluster started (the process groups it recorded, then any Ray process still naming its
temp dirs); it never runs `ray stop`, which would end every Ray instance on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mistral_qa.entry import prog

DEFAULT_ROOT = Path("/tmp/mistral-qa-cluster")  # short: Ray's socket paths live below it (108-byte limit)
STATE_FILE = "cluster.json"
CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root, when run from a checkout


class ClusterError(RuntimeError):
    """The local cluster could not start, or its state is not what the command expects."""


@dataclass
class ClusterSpec:
    root: Path = DEFAULT_ROOT
    workers: int = 1
    port: int = 6390
    dashboard_port: int = 8266
    head_cpus: int = 1
    worker_cpus: int = 1
    object_store_mb: int = 400
    timeout_s: float = 120.0


@dataclass
class NodeInfo:
    name: str
    pid: int
    temp_dir: str
    log: str
    resources: dict[str, float] = field(default_factory=dict)
    start_ticks: int = 0  # /proc start time of `ray start`: tells our process from a reused PID


@dataclass
class ClusterState:
    root: str
    gcs_address: str
    dashboard_url: str
    nodes: list[NodeInfo]
    auth_mode: str = "token"

    def save(self) -> None:
        (Path(self.root) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> ClusterState | None:
        path = Path(root) / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(**{**data, "nodes": [NodeInfo(**n) for n in data["nodes"]]})


def auth_token() -> str | None:
    """The token Ray's clients and nodes use: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return (path.read_text().strip() or None) if path.is_file() else None


def auth_mode() -> str:
    """Token auth unless RAY_AUTH_MODE says otherwise. Every node gets the mode explicitly: a joining node
    does not follow the head's mode on its own (it fails with InvalidAuthToken), and clients (`ray job
    submit`, `serve deploy`) send the token only with RAY_AUTH_MODE=token in their environment."""
    return os.environ.get("RAY_AUTH_MODE") or "token"


def ensure_token() -> None:
    """Create ~/.ray/auth_token the way `ray.init()` does for a new local cluster, if no token exists."""
    if auth_token() is None:
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray, "get-auth-token", "--generate"], check=True, capture_output=True)  # prints the token


def node_env(spec: ClusterSpec) -> dict[str, str]:
    """The nodes' environment: this venv first on PATH (so a job's `python` is ours) and RAY_ADDRESS
    naming this cluster, as KubeRay sets it in its pods: Ray code that looks the cluster up by itself
    (Train's PlacementGroupCleaner, the state API) would otherwise find several on this host and fail."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_TMPDIR"}
    env["RAY_ADDRESS"] = f"127.0.0.1:{spec.port}"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = auth_mode()
    if (CHECKOUT / "pyproject.toml").is_file():
        # As the image's PYTHONPATH in KubeRay pods: `serve deploy`'s import_path serve.app:build_app
        # must resolve in every worker, and pip installs the jobs only as mistral_qa.serve etc.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
    # On SIGTERM a node first drains (for Serve traffic) for up to 30 s; the whole cluster goes at
    # once here, so there is nothing to drain for.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    return env


def node_ports(spec: ClusterSpec, index: int) -> dict[str, int]:
    """Fixed ports above --port for node `index` (0 = head). Ray's own defaults (the agent's 52365,
    the client server's 10001) would collide between two nodes on one host or with a `ray.init()`
    instance, and ports picked at random here could be taken by Ray's own random picks before use:
    these stay below Linux's ephemeral range (32768+), where nothing is handed out at random."""
    return {
        "--dashboard-agent-listen-port": spec.port + 2 + 2 * index,
        "--metrics-export-port": spec.port + 3 + 2 * index,
    }


def ray_start_command(spec: ClusterSpec, index: int, temp_dir: Path, resources: dict[str, float]) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats"]
    cmd += ["--temp-dir", str(temp_dir)]  # per node: sessions, sockets and logs never mix
    cmd += ["--num-cpus", str(spec.worker_cpus if index else spec.head_cpus), "--num-gpus", "0"]
    cmd += ["--resources", json.dumps(resources), "--object-store-memory", str(spec.object_store_mb * 2**20)]
    for flag, port in node_ports(spec, index).items():
        cmd += [flag, str(port)]
    if index == 0:
        cmd += ["--head", "--port", str(spec.port), "--ray-client-server-port", str(spec.port + 1)]
        cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(spec.dashboard_port)]
    else:
        cmd += ["--address", f"127.0.0.1:{spec.port}"]
    return cmd


def launch_node(spec: ClusterSpec, index: int, resources: dict[str, float]) -> NodeInfo:
    name = f"worker-{index}" if index else "head"
    temp_dir = spec.root / name
    temp_dir.mkdir(parents=True, exist_ok=True)
    log = spec.root / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ray_start_command(spec, index, temp_dir, resources),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=node_env(spec),
            cwd=spec.root,
            start_new_session=True,  # its own process group: stop can end it and all it spawned
        )
    fields = proc_stat(proc.pid) or [0] * 20
    return NodeInfo(name, proc.pid, str(temp_dir), str(log), resources, start_ticks=int(fields[19]))


def auth_headers() -> dict[str, str]:
    token = auth_token() if auth_mode() == "token" else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def alive_nodes(dashboard_url: str) -> list[dict]:
    """The cluster's alive nodes from the dashboard's state API ([] while it is not up yet)."""
    request = urllib.request.Request(f"{dashboard_url}/api/v0/nodes?limit=1000&detail=true", headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = json.load(resp)
    except (OSError, ValueError):
        return []
    return [n for n in body.get("data", {}).get("result", {}).get("result", []) if n.get("state") == "ALIVE"]


def log_tail(node: NodeInfo, lines: int = 30) -> str:
    path = Path(node.log)
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for_nodes(state: ClusterState, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in state.nodes:
            if not node_alive(node):
                raise ClusterError(f"node {node.name} exited during start; its log ends:\n{log_tail(node)}")
        if len(alive_nodes(state.dashboard_url)) >= count:
            return
        time.sleep(1)
    raise ClusterError(f"{count} nodes not alive after {timeout_s:.0f} s; head log ends:\n{log_tail(state.nodes[0])}")


def wait_for_gcs(state: ClusterState, timeout_s: float) -> None:
    host, port = state.gcs_address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not node_alive(state.nodes[0]):
            raise ClusterError(f"the head exited during start; its log ends:\n{log_tail(state.nodes[0])}")
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise ClusterError(f"the head's GCS is not up after {timeout_s:.0f} s; its log ends:\n{log_tail(state.nodes[0])}")


def clear_root(root: Path) -> None:
    """Empty root of an earlier cluster's temp dirs and logs; refuse a folder holding anything else."""
    ours = re.compile(rf"({STATE_FILE}|(head|worker-\d+)(\.log)?)")
    others = [p.name for p in root.iterdir() if not ours.fullmatch(p.name)] if root.is_dir() else []
    if others:
        raise ClusterError(f"--root {root} holds other files ({', '.join(sorted(others)[:5])}): give an empty folder")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)


def start_cluster(spec: ClusterSpec) -> ClusterState:
    """Start a head and spec.workers worker nodes; returns once all of them are alive."""
    old = ClusterState.load(spec.root)
    if old is not None and any(node_alive(n) for n in old.nodes):
        raise ClusterError(f"a cluster is already running under {spec.root}; stop it first")
    clear_root(spec.root)
    if auth_mode() == "token":
        ensure_token()
    state = ClusterState(
        root=str(spec.root),
        gcs_address=f"127.0.0.1:{spec.port}",
        dashboard_url=f"http://127.0.0.1:{spec.dashboard_port}",
        auth_mode=auth_mode(),
        nodes=[],
    )
    try:
        state.nodes.append(launch_node(spec, 0, {"local_head": 1}))
        state.save()
        wait_for_gcs(state, spec.timeout_s)  # worker nodes can join from then on
        for i in range(1, spec.workers + 1):
            state.nodes.append(launch_node(spec, i, {"local_worker": 1, f"local_worker_{i}": 1}))
            state.save()
        wait_for_nodes(state, 1 + spec.workers, spec.timeout_s)
    except BaseException:
        stop_cluster(spec.root)
        raise
    return state


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]; None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def node_alive(node: NodeInfo) -> bool:
    """The node's `ray start` still runs: its PID is alive and started when ours did (not reused)."""
    fields = proc_stat(node.pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == node.start_ticks


def node_group(node: NodeInfo) -> list[int]:
    """The live processes of the node's process group. Linux hands out no PID that is still some
    group's ID, so members found once `ray start` is gone are the node's; a process with the node's
    PID but another start time means the PID was reused, and nothing is the node's."""
    fields = proc_stat(node.pid)
    if fields is not None and int(fields[19]) != node.start_ticks:
        return []
    return process_group(node.pid)


def process_group(pgid: int) -> list[int]:
    """Live members of a process group: a node's `ray start` started it, so every member is the node's."""
    members = []
    for proc in Path("/proc").iterdir():
        fields = proc_stat(int(proc.name)) if proc.name.isdigit() else None
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(proc.name))
    return members


def processes_naming(root: Path) -> list[int]:
    """Ray processes whose command line names a path under root, in case one left its process group
    (a `tail -f` of a log there is not a Ray process and is left alone)."""
    needle, found = str(root).encode() + b"/", []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and (b"site-packages/ray/" in cmdline or b"/bin/ray\0" in cmdline):
            found.append(int(proc.name))
    return found


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if pid_alive(p)]


def signal_pids(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_cluster(root: Path = DEFAULT_ROOT, grace_s: float = 20.0) -> int:
    """Stop the cluster under root; returns how many of its processes were running."""
    root = Path(root)
    state = ClusterState.load(root)
    nodes = state.nodes if state else []
    groups = {node.pid: node_group(node) for node in nodes}
    # `ray start --block` stops its node's processes (raylet, GCS, agents, workers) on SIGTERM; all
    # nodes at once, as the whole cluster goes. What outlives the grace period is killed.
    signal_pids([node.pid for node in nodes if node_alive(node)], signal.SIGTERM)
    wait_gone([pid for group in groups.values() for pid in group], grace_s)
    for node in nodes:
        if remaining := node_group(node):
            os.killpg(node.pid, signal.SIGKILL)
            wait_gone(remaining, 5)
    leftovers = processes_naming(root)  # one that left its process group
    signal_pids(leftovers, signal.SIGKILL)
    wait_gone(leftovers, 5)
    if state is not None:
        (root / STATE_FILE).unlink(missing_ok=True)
    return sum(map(len, groups.values())) + len(leftovers)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog("python -m cluster.local_cluster"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="folder for the nodes' temp dirs, logs and state"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker nodes besides the head")
    parser.add_argument("--port", type=int, default=6390, help="GCS port of the head (Ray's default is 6379)")
    parser.add_argument("--dashboard-port", type=int, default=8266, help="dashboard and job API port (default 8265)")
    parser.add_argument("--head-cpus", type=int, default=1, help="CPUs the head offers to tasks")
    parser.add_argument("--worker-cpus", type=int, default=1, help="CPUs each worker node offers")
    parser.add_argument("--object-store-mb", type=int, default=400, help="object store per node (MiB)")
    return parser.parse_args(argv)


def report(state: ClusterState, workers: int, root_flag: str) -> str:
    lines = [
        f"Ray cluster up: head + {workers} worker node(s); temp dirs and logs under {state.root}",
        f"  jobs and dashboard: {state.dashboard_url}    GCS: {state.gcs_address}",
    ]
    if state.auth_mode == "token":
        lines.append(
            "  token auth is on: `export RAY_AUTH_MODE=token` in the shell that runs ray job submit / serve deploy"
        )
    lines.append(f"  stop it: python -m cluster.local_cluster stop{root_flag}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.root.resolve()
    if args.command == "stop":
        print(f"stopped {stop_cluster(root)} processes of the cluster under {root}")
        return 0
    if args.command == "status":
        state = ClusterState.load(root)
        if state is None:
            print(f"no cluster under {root}")
            return 1
        print(f"{state.dashboard_url}: {len(alive_nodes(state.dashboard_url))} alive node(s)")
        return 0
    spec = ClusterSpec(
        root=root, workers=args.workers, port=args.port, dashboard_port=args.dashboard_port,
        head_cpus=args.head_cpus, worker_cpus=args.worker_cpus, object_store_mb=args.object_store_mb,
    )  # fmt: skip
    try:
        state = start_cluster(spec)
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report(state, args.workers, "" if root == DEFAULT_ROOT else f" --root {root}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
