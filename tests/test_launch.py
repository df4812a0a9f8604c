"""hscl_jax.launch (several processes of one job on this machine) and hscl_jax.distributed."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hscl_jax import distributed, launch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def _launch(args, timeout=120, **popen_kwargs):
    """Runs ``python -m hscl_jax.launch args``; returns (status, output, seconds)."""
    environ = dict(os.environ, PYTHONPATH=_REPO)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "hscl_jax.launch", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen_kwargs,
    )
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start


def test_each_process_gets_its_id_devices_and_coordinator(tmp_path):
    script = _script(
        tmp_path,
        """
        import os, sys
        keys = ("HSCL_DISTRIBUTED", "HSCL_PROCESS_ID", "HSCL_NUM_PROCESSES",
                "HSCL_COORDINATOR_ADDRESS", "JAX_CPU_COLLECTIVES_IMPLEMENTATION", "XLA_FLAGS")
        print(" ".join(f"{k}={os.environ[k]}" for k in keys))
        print("args", sys.argv[1:])
        """,
    )
    status, output, _ = _launch(
        ["--num_processes=3", "--devices_per_process=2", "--", script, "--flag=x"]
    )
    assert status == 0, output
    lines = output.splitlines()
    addresses = set()
    for process_id in range(3):
        (env_line,) = [line for line in lines if line.startswith(f"[{process_id}] HSCL_")]
        assert f"HSCL_PROCESS_ID={process_id} " in env_line
        assert "HSCL_DISTRIBUTED=1 " in env_line and "HSCL_NUM_PROCESSES=3 " in env_line
        assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo " in env_line
        assert env_line.count("--xla_force_host_platform_device_count") == 1
        assert env_line.endswith("--xla_force_host_platform_device_count=2")
        addresses.add(env_line.split("HSCL_COORDINATOR_ADDRESS=")[1].split()[0])
        assert f"[{process_id}] args ['--flag=x']" in lines
    (address,) = addresses
    assert address.startswith("localhost:") and int(address.split(":")[1]) > 0


def test_a_failing_process_fails_the_launch_and_the_others_are_terminated(tmp_path):
    script = _script(
        tmp_path,
        """
        import os, sys, time
        if os.environ["HSCL_PROCESS_ID"] == "1":
            sys.exit(3)
        print("waiting", flush=True)
        time.sleep(60)
        """,
    )
    status, output, seconds = _launch(["--num_processes=2", "--grace_seconds=0.5", "--", script])
    assert status == 3, output
    assert seconds < 30, output
    assert "launch: process 1 failed (exit status 3)" in output
    assert "launch: process 0 ended with killed by SIGTERM" in output


def test_a_process_killed_by_a_signal_gives_128_plus_the_signal(tmp_path):
    script = _script(
        tmp_path,
        """
        import os, signal
        if os.environ["HSCL_PROCESS_ID"] == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    status, output, _ = _launch(["--num_processes=2", "--", script])
    assert status == 128 + signal.SIGKILL, output
    assert "process 0 failed (killed by SIGKILL)" in output


def test_sigterm_to_the_launcher_reaches_every_process(tmp_path):
    script = _script(
        tmp_path,
        """
        import os, signal, sys, time
        def stop(signum, frame):
            print("got", signal.Signals(signum).name, flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(60)
        """,
    )
    environ = dict(os.environ, PYTHONPATH=_REPO)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "hscl_jax.launch", "--num_processes=2", "--", script],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ready = set()
    for line in launcher.stdout:
        if line.rstrip().endswith("ready"):
            ready.add(line[:3])
        if len(ready) == 2:
            break
    launcher.send_signal(signal.SIGTERM)
    output = launcher.stdout.read()
    assert launcher.wait(timeout=30) == 0, output
    assert "[0] got SIGTERM" in output and "[1] got SIGTERM" in output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_processes=2"], "give the command after '--'"),
        (["--"], "nothing to run after '--'"),
        (["--num_processes=0", "--", "x.py"], "--num_processes=0 must be >= 1"),
        (["--port=70000", "--", "x.py"], "--port=70000 must be in [0, 65535]"),
    ],
)
def test_bad_arguments_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as raised:
        launch.parse_arguments(args)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_initialize_arguments_from_the_environment():
    environ = {
        distributed.COORDINATOR_ADDRESS_ENV: "localhost:1234",
        distributed.NUM_PROCESSES_ENV: "2",
        distributed.PROCESS_ID_ENV: "1",
        distributed.HEARTBEAT_TIMEOUT_ENV: "7",
    }
    assert distributed.initialize_arguments(environ) == {
        "coordinator_address": "localhost:1234",
        "num_processes": 2,
        "process_id": 1,
        "heartbeat_timeout_seconds": 7,
    }
    # None set: JAX detects the cluster (TPU pod, Slurm, Open MPI).
    assert distributed.initialize_arguments({}) == {}


@pytest.mark.parametrize(
    "environ, message",
    [
        ({distributed.NUM_PROCESSES_ENV: "2"}, "HSCL_COORDINATOR_ADDRESS, HSCL_PROCESS_ID not set"),
        (
            {
                distributed.COORDINATOR_ADDRESS_ENV: "h:1",
                distributed.NUM_PROCESSES_ENV: "2",
                distributed.PROCESS_ID_ENV: "2",
            },
            "HSCL_PROCESS_ID=2 must be below HSCL_NUM_PROCESSES=2",
        ),
        ({distributed.NUM_PROCESSES_ENV: "two"}, "HSCL_NUM_PROCESSES='two' must be an integer"),
        ({distributed.HEARTBEAT_TIMEOUT_ENV: "0"}, "HSCL_HEARTBEAT_TIMEOUT_SECONDS='0' must be"),
    ],
)
def test_bad_environment_is_one_line(environ, message):
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[")):
        distributed.initialize_arguments(environ)


def _psum_job(tmp_path, *, calls: int, victim: int = -1, die_at: int = 20) -> str:
    """A job summing over every device of every process ``calls`` times; process ``victim``
    kills itself (SIGKILL) after call ``die_at``."""
    return _script(
        tmp_path,
        f"""
        import os, time
        import jax, jax.numpy as jnp
        from ml_collections import ConfigDict
        from hscl_jax import distributed
        distributed.maybe_initialize(ConfigDict({{"distributed": False}}))
        process = jax.process_index()
        devices = distributed.mapped_devices(jax.local_device_count())
        total = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i", devices=devices)
        value = jnp.full((jax.local_device_count(),), process + 1.0)
        print("devices", jax.process_count(), jax.local_device_count(), jax.device_count())
        for call in range({calls}):
            result = float(total(value)[0])
            if call == 0:
                print("sum", result, flush=True)
            if call == {die_at} and process == {victim}:
                os.kill(os.getpid(), 9)
            time.sleep(0.01)
        """,
    )


@pytest.mark.slow
def test_two_processes_sum_across_all_their_devices(tmp_path):
    script = _psum_job(tmp_path, calls=50)
    status, output, _ = _launch(["--num_processes=2", "--devices_per_process=2", "--", script])
    assert status == 0, output
    for process_id in range(2):
        assert f"[{process_id}] devices 2 2 4" in output
        # Two devices holding 1 (process 0) and two holding 2 (process 1): the sum crossed
        # processes (pmap over this process's devices alone would give 2 or 4).
        assert f"[{process_id}] sum 6.0" in output


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_a_process_dying_alone_stops_the_other_within_the_heartbeat_timeout(tmp_path, victim):
    heartbeat = 3
    script = _psum_job(tmp_path, calls=100_000, victim=victim)
    # A grace period longer than the heartbeat: the survivor must stop on its own.
    status, output, _ = _launch(
        [
            "--num_processes=2",
            f"--heartbeat_timeout_seconds={heartbeat}",
            "--grace_seconds=60",
            "--",
            script,
        ]
    )
    assert status == 128 + signal.SIGKILL, output
    survivor = 1 - victim
    summary = [
        line for line in output.splitlines() if line.startswith(f"launch: process {survivor}")
    ]
    assert len(summary) == 1, output
    delay = float(summary[0].split(", ")[-1].split(" s after")[0])
    assert delay < heartbeat + 5, output
    assert "another task died" in output  # JAX's own reason, in the survivor's output


def test_mapped_devices_of_one_process_are_its_first_local_devices():
    import jax

    assert distributed.mapped_devices(3) == jax.local_devices()[:3]
    assert distributed.mapped_devices(jax.local_device_count()) == jax.devices()


_RAISING_JOB = """
import time
import jax, jax.numpy as jnp
from ml_collections import ConfigDict
from hscl_jax import distributed
distributed.maybe_initialize(ConfigDict({"distributed": False}))
total = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i")
class FailsAlone(Exception):
    pass
try:
    for call in range(100_000):
        total(jnp.ones((jax.local_device_count(),))).block_until_ready()
        if call == 20 and jax.process_index() == 1:
            raise FailsAlone()
        time.sleep(0.01)
except FailsAlone:
    distributed.exit_without_waiting(1)
"""


@pytest.mark.slow
def test_a_process_failing_alone_without_waiting_stops_the_other_within_the_heartbeat(tmp_path):
    heartbeat = 3
    script = _script(tmp_path, _RAISING_JOB)
    status, output, _ = _launch(
        [
            "--num_processes=2",
            f"--heartbeat_timeout_seconds={heartbeat}",
            "--grace_seconds=60",
            "--",
            script,
        ]
    )
    assert status == 1, output
    (delay,) = re.findall(
        r"launch: process 0 ended with killed by SIGABRT, ([\d.]+) s after", output
    )
    # Without exit_without_waiting, process 1 would wait 300 s in JAX's shutdown barrier.
    assert float(delay) < heartbeat + 5, output


def test_processes_die_with_a_killed_launcher(tmp_path):
    script = _script(
        tmp_path,
        """
        import os, time
        print("pid", os.getpid(), flush=True)
        time.sleep(60)
        """,
    )
    launcher = subprocess.Popen(
        [sys.executable, "-m", "hscl_jax.launch", "--num_processes=2", "--", script],
        env=dict(os.environ, PYTHONPATH=_REPO),
        stdout=subprocess.PIPE,
        text=True,
    )
    pids = [int(launcher.stdout.readline().split()[-1]) for _ in range(2)]
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
