"""cluster/local_cluster.py without Ray: node commands, ports, and that `stop` ends exactly the
processes a cluster started (stand-in `sleep` processes play the nodes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.local_cluster import (
    ClusterError,
    ClusterSpec,
    ClusterState,
    NodeInfo,
    clear_root,
    node_alive,
    node_ports,
    proc_stat,
    process_group,
    ray_start_command,
    stop_cluster,
)


def test_nodes_get_their_own_temp_dirs_ports_and_resources(tmp_path):
    spec = ClusterSpec(root=tmp_path, workers=2, port=23000, dashboard_port=23015)
    head = ray_start_command(spec, 0, tmp_path / "head", {"local_head": 1})
    worker = ray_start_command(spec, 1, tmp_path / "worker-1", {"local_worker_1": 1})
    assert head[head.index("--temp-dir") + 1] != worker[worker.index("--temp-dir") + 1]
    assert head[head.index("--port") + 1] == "23000" and worker[worker.index("--address") + 1] == "127.0.0.1:23000"
    assert head[head.index("--dashboard-port") + 1] == "23015"
    ports = [p for i in range(3) for p in node_ports(spec, i).values()] + [spec.port, spec.port + 1]
    assert len(set(ports)) == len(ports) and max(ports) < spec.port + 10 < 32768  # below the ephemeral range
    assert "--block" in head and "--head" in head and "--head" not in worker


def test_clear_root_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "head").mkdir()
    (tmp_path / "worker-1.log").write_text("old log")
    clear_root(tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ClusterError, match="notes.txt"):
        clear_root(tmp_path)
    assert (tmp_path / "notes.txt").is_file()


def fake_node(root: Path, name: str) -> tuple[NodeInfo, subprocess.Popen]:
    """A process group like a node's: a leader and a child, both mere sleeps."""
    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30
    while len(process_group(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    ticks = int(proc_stat(proc.pid)[19])
    return NodeInfo(name, proc.pid, str(root / name), str(root / f"{name}.log"), start_ticks=ticks), proc


def test_stop_ends_the_node_process_groups_and_nothing_else(tmp_path):
    bystander = subprocess.Popen(["sleep", "300"])  # not the cluster's, though started by the same user
    nodes = [fake_node(tmp_path, "head"), fake_node(tmp_path, "worker-1")]
    state = ClusterState(str(tmp_path), "127.0.0.1:1", "http://127.0.0.1:2", [n for n, _ in nodes])
    state.save()
    try:
        assert all(node_alive(n) for n, _ in nodes)
        assert stop_cluster(tmp_path, grace_s=2) == 4  # two leaders, two children
        for node, proc in nodes:
            proc.wait(timeout=10)
            assert not node_alive(node)
        assert bystander.poll() is None
        assert ClusterState.load(tmp_path) is None
    finally:
        bystander.kill()
        for _, proc in nodes:
            proc.kill()


def test_a_reused_pid_is_not_taken_for_a_node(tmp_path):
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        impostor = NodeInfo("head", other.pid, str(tmp_path / "head"), "", start_ticks=1)  # another start time
        ClusterState(str(tmp_path), "127.0.0.1:1", "http://127.0.0.1:2", [impostor]).save()
        assert not node_alive(impostor)
        assert stop_cluster(tmp_path, grace_s=1) == 0
        assert other.poll() is None
    finally:
        other.kill()
