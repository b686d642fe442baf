"""titok on a real Ray cluster: `ray job submit` to a token-authenticated head, and a simulated
two-node cluster where a stage's actors land on both nodes."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from titok.workflows.pipeline import transplant
from titok.runstate import RunDir
from tests.conftest import tiny_transplant_config
from tests.test_progress import assert_one_line_per_stage

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(temp_dir: str) -> None:
    """Stop the head started with ``--temp-dir temp_dir`` and everything under it (workers, the job's
    driver), and nothing else: ``ray stop`` would kill every Ray on the machine, another test's or a
    user's long run among them."""
    import psutil

    roots = []
    for process in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(process.info["cmdline"] or ()) and process.pid != os.getpid():
            roots.append(process)
    tree = {p.pid: p for root in roots for p in [root, *_descendants(root)]}
    for process in tree.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(tree.values()), timeout=30)


def _descendants(process):
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _shutdown_in_process_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _stop_a_job_mid_run(address: str, env: dict, job: list[str], run_dir: Path) -> None:
    """``ray job stop`` during the queries stage: the job stops by itself within Ray's 3 s grace (its log
    says so, no SIGKILL needed), no actor of it is left on the cluster, and the stage is not marked."""
    subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", "titok-stopped", "--no-wait", *job],
                   env=env, check=True, capture_output=True, timeout=120)
    deadline = time.time() + 600
    while not (run_dir / "queries" / "_STARTED.json").exists():
        assert time.time() < deadline, "the job never started its queries stage"
        time.sleep(0.2)
    time.sleep(1)
    stopped = subprocess.run([RAY, "job", "stop", "--address", address, "titok-stopped"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    logs = subprocess.run([RAY, "job", "logs", "--address", address, "titok-stopped"],
                          env=env, capture_output=True, text=True, timeout=120).stdout
    assert "titok: stopped by SIGTERM" in logs and "Traceback" not in logs, logs[-3000:]
    status = subprocess.run([RAY, "job", "status", "--address", address, "titok-stopped"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert "stopped" in (status.stdout + status.stderr).lower()
    for _ in range(50):  # the job's actors go with its driver
        listed = subprocess.run([RAY, "list", "actors", "--filter", "state=ALIVE", "--format", "json"],
                                env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        alive = [] if listed.stdout.startswith("No resource") else json.loads(listed.stdout)
        if not alive:
            break
        time.sleep(0.2)
    assert alive == []
    assert not (run_dir / "queries" / "_COMPLETE.json").exists()


@pytest.mark.slow
def test_ray_job_submit_to_a_token_authenticated_head(tiny_model_dirs, tmp_path):
    _shutdown_in_process_ray()  # one Ray of this session at a time: a second slows the head past its start timeouts
    run_dir = tmp_path / "run"
    cfg = tiny_transplant_config(tiny_model_dirs, run_dir, "filter.top_m=4", "queries.pool_size=8")
    config_path = tmp_path / "transplant.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump()))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    gcs_port, dashboard_port = _free_port(), _free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    # its own temp dir (short: Ray's socket paths must fit 107 bytes) and agent port (52365 belongs to any other
    # Ray on this machine), so that it starts beside another Ray and is stopped without touching it
    temp_dir = tempfile.mkdtemp(prefix="titok-head-", dir="/tmp")
    try:
        subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--num-cpus=2",
                        f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                        f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=180)
        wrong_token = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
        refused = subprocess.run([RAY, "job", "submit", "--address", address, "--no-wait", "--", "echo", "hi"],
                                 env=wrong_token, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

        job = ["--working-dir", str(REPO), "--runtime-env", str(REPO / "ray_jobs" / "runtime_env.yaml"), "--",
               "python", "ray_jobs/transplant.py", "--config", str(config_path)]
        _stop_a_job_mid_run(address, env, job, run_dir)  # then the job below resumes its run dir

        submitted = subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", "titok-test", *job],
                                   env=env, capture_output=True, text=True, timeout=1200)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        status = subprocess.run([RAY, "job", "status", "--address", address, "titok-test"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert "job 'titok-test' succeeded" in (status.stdout + status.stderr).lower()
        assert "adapter:" in submitted.stdout
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        # what the job's log shows: one line per stage, none of Ray's per-dataset or per-worker lines
        assert_one_line_per_stage(submitted.stdout + submitted.stderr, pool=8)

        # without RAY_ADDRESS titok starts its own Ray, even with this head on the host (ray.init() joined it,
        # and died with InvalidAuthToken where the head wanted a token the user never set)
        own = subprocess.run([sys.executable, "-c", "import ray\nfrom titok.progress import init_ray\ninit_ray()\n"
                              "print(ray.get_runtime_context().gcs_address)\nray.shutdown()"],
                             env={k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}, capture_output=True,
                             text=True, timeout=300)
        assert own.returncode == 0, own.stderr[-2000:]
        assert not own.stdout.strip().endswith(f":{gcs_port}"), own.stdout
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_stage_actors_spread_over_two_nodes(tiny_model_dirs, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    _shutdown_in_process_ray()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        cfg = tiny_transplant_config(tiny_model_dirs, tmp_path / "run", "engine.actors=2", "engine.batch_size=2")
        transplant(cfg, until="labels")
        loads = [e for e in RunDir(tmp_path / "run").events() if e["event"] == "model_load"]
        assert len(loads) == 2 and {e["stage"] for e in loads} == {"engine"}  # queries and labels share the engines
        assert {e["node_id"] for e in loads} == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
