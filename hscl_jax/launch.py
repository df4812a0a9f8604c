"""Runs a multi-process (multi-host) job as several processes on this machine, on CPU.

    python -m hscl_jax.launch --num_processes=2 --devices_per_process=4 -- \\
        train.py --config=configs/default.py --workdir=/tmp/hscl_2proc

Everything after ``--`` is given to this Python interpreter (a script, or ``-m module``), once per
process. Each process gets ``devices_per_process`` fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``), gloo cross-process collectives, and the
``HSCL_*`` variables of :mod:`hscl_jax.distributed` (coordinator ``localhost:<free port>``, process
count and id, heartbeat timeout), so the trainer joins the run exactly as on a TPU pod, where JAX
finds the same three values itself.

Each output line is prefixed with ``[<process id>]``. The launcher waits for every process and exits
with 0 when all succeed, else with the status of the first process that failed (128 + N for a
process killed by signal N). When a process fails, the others get ``--grace_seconds`` to finish on
their own (JAX's coordination service stops them once it notices: immediately when process 0
died, after the heartbeat timeout otherwise), then SIGTERM, then SIGKILL. SIGTERM and SIGINT sent
to the launcher are passed on to every process (a preemption of the whole job).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import IO

from hscl_jax import distributed

# After SIGTERM, how long a process has to stop before it is killed.
_TERMINATE_SECONDS = 10.0
_POLL_SECONDS = 0.05


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _without_device_count(xla_flags: str) -> list[str]:
    return [
        flag
        for flag in xla_flags.split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]


def process_environment(
    base: dict[str, str],
    *,
    process_id: int,
    num_processes: int,
    devices_per_process: int,
    coordinator_address: str,
    heartbeat_timeout_seconds: int,
) -> dict[str, str]:
    """The environment of process ``process_id``: ``base`` plus what makes it join the run."""
    environ = dict(base)
    xla_flags = _without_device_count(environ.get("XLA_FLAGS", ""))
    xla_flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    environ.update(
        {
            "XLA_FLAGS": " ".join(xla_flags),
            "JAX_PLATFORMS": "cpu",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            # Lines reach the launcher (and its prefixes) as they are written.
            "PYTHONUNBUFFERED": "1",
            distributed.DISTRIBUTED_ENV: "1",
            distributed.COORDINATOR_ADDRESS_ENV: coordinator_address,
            distributed.NUM_PROCESSES_ENV: str(num_processes),
            distributed.PROCESS_ID_ENV: str(process_id),
            distributed.HEARTBEAT_TIMEOUT_ENV: str(heartbeat_timeout_seconds),
        }
    )
    return environ


def exit_status(returncode: int) -> int:
    """A shell's view of a child's status: 128 + N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"


def _copy_prefixed(stream: IO[bytes], prefix: str, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.buffer.write(prefix.encode() + line)
            sys.stdout.buffer.flush()
    stream.close()


def _die_with_parent() -> None:
    """In a child, before exec: ask Linux to SIGKILL it when the launcher dies (even by SIGKILL),
    so that no orphan waits forever in a collective."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclasses.dataclass
class _Child:
    process_id: int
    popen: subprocess.Popen[bytes]
    copier: threading.Thread
    ended_at: float | None = None  # time.monotonic() when the launcher saw it end


def _signal_all(children: Sequence[_Child], signum: int) -> None:
    for child in children:
        if child.popen.poll() is None:
            child.popen.send_signal(signum)


def _log(message: str, lock: threading.Lock) -> None:
    with lock:
        sys.stdout.write(f"launch: {message}\n")
        sys.stdout.flush()


def run(
    command: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int,
    port: int | None = None,
    grace_seconds: float = 10.0,
    heartbeat_timeout_seconds: int = 10,
) -> int:
    """Runs ``python <command>`` as ``num_processes`` processes of one job; returns the exit status
    (0, or the first failure's, as :func:`exit_status`)."""
    coordinator_address = f"localhost:{port or free_port()}"
    lock = threading.Lock()
    children: list[_Child] = []
    for process_id in range(num_processes):
        environ = process_environment(
            dict(os.environ),
            process_id=process_id,
            num_processes=num_processes,
            devices_per_process=devices_per_process,
            coordinator_address=coordinator_address,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        )
        popen = subprocess.Popen(
            [sys.executable, *command],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        copier = threading.Thread(
            target=_copy_prefixed, args=(popen.stdout, f"[{process_id}] ", lock), daemon=True
        )
        copier.start()
        children.append(_Child(process_id, popen, copier))

    def forward(signum: int, frame: FrameType | None) -> None:
        del frame
        _log(f"received {signal.Signals(signum).name}: passing it on to every process", lock)
        _signal_all(children, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    first_failure: _Child | None = None
    terminated_at: float | None = None
    try:
        while True:
            now = time.monotonic()
            for child in children:
                if child.ended_at is None and child.popen.poll() is not None:
                    child.ended_at = now
                    if child.popen.returncode != 0 and first_failure is None:
                        first_failure = child
                        _log(
                            f"process {child.process_id} failed "
                            f"({describe_status(child.popen.returncode)}); the others get "
                            f"{grace_seconds:g} s to stop before they are terminated",
                            lock,
                        )
            if all(child.ended_at is not None for child in children):
                break
            if first_failure is not None:
                failed_at = first_failure.ended_at
                assert failed_at is not None  # set when its failure was seen
                if terminated_at is None and now - failed_at > grace_seconds:
                    _log("terminating the remaining processes (SIGTERM)", lock)
                    _signal_all(children, signal.SIGTERM)
                    terminated_at = now
                elif terminated_at is not None and now - terminated_at > _TERMINATE_SECONDS:
                    _log("killing the remaining processes (SIGKILL)", lock)
                    _signal_all(children, signal.SIGKILL)
                    terminated_at = float("inf")
            time.sleep(_POLL_SECONDS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.popen.poll() is None:
                child.popen.kill()
            child.popen.wait()
            child.copier.join()
    if first_failure is None:
        return 0
    for child in children:
        if child is not first_failure:
            # Every child has ended by now (the loop above waits for all).
            assert child.ended_at is not None and first_failure.ended_at is not None
            delay = child.ended_at - first_failure.ended_at
            _log(
                f"process {child.process_id} ended with {describe_status(child.popen.returncode)}"
                f", {delay:.1f} s after process {first_failure.process_id} failed",
                lock,
            )
    return exit_status(first_failure.popen.returncode)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hscl_jax.launch",
        description="Run a multi-process JAX job as processes on this machine (CPU devices).",
        usage="%(prog)s [options] -- script.py [args]  (or -- -m module [args])",
    )
    parser.add_argument("--num_processes", type=int, default=2, help="processes of the job")
    parser.add_argument(
        "--devices_per_process", type=int, default=1, help="fake CPU devices of each process"
    )
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument(
        "--grace_seconds",
        type=float,
        default=10.0,
        help="after a process fails, seconds the others get before SIGTERM",
    )
    parser.add_argument(
        "--heartbeat_timeout_seconds",
        type=int,
        default=10,
        help="seconds of silence after which JAX declares a process dead",
    )
    return parser


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """The launcher's options and the command after ``--``; one-line errors (exit status 2)."""
    parser = _parser()
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    arguments = parser.parse_args(argv[:split])  # --help prints the help and exits 0 here
    if split == len(argv):
        parser.error("give the command after '--', e.g. -- train.py --config=... --workdir=...")
    arguments.command = argv[split + 1 :]
    if not arguments.command:
        parser.error("nothing to run after '--'")
    for name in ("num_processes", "devices_per_process", "heartbeat_timeout_seconds"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name}={getattr(arguments, name)} must be >= 1")
    if not 0 <= arguments.port < 65536:
        parser.error(f"--port={arguments.port} must be in [0, 65535]")
    if arguments.grace_seconds < 0:
        parser.error(f"--grace_seconds={arguments.grace_seconds:g} must be >= 0")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    return run(
        arguments.command,
        num_processes=arguments.num_processes,
        devices_per_process=arguments.devices_per_process,
        port=arguments.port or None,
        grace_seconds=arguments.grace_seconds,
        heartbeat_timeout_seconds=arguments.heartbeat_timeout_seconds,
    )


if __name__ == "__main__":
    sys.exit(main())
