"""The scripts of examples/ run as written, at the small sizes their flags allow, and print what
their docstrings promise: a falling loss and a kNN accuracy far above chance for the training
loops, one-device values for every multi-device pattern of the loss."""

import math
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
NUMBER = r"([0-9]+(?:\.[0-9]+)?(?:e[-+][0-9]+)?)"


def _run(script: str, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _losses_and_accuracy(out: str) -> tuple[list[float], float, float]:
    step_losses = [float(v) for v in re.findall(rf"^step \d+ loss {NUMBER}", out, re.M)]
    (before,) = re.findall(rf"^knn_top1 before: {NUMBER}$", out, re.M)
    (after,) = re.findall(rf"^knn_top1 after: {NUMBER}$", out, re.M)
    return step_losses, float(before), float(after)


@pytest.mark.parametrize("script", ["linen_digits.py", "nnx_digits.py"])
def test_digits_training_loop_lowers_the_loss_and_keeps_knn_far_above_chance(script):
    pytest.importorskip("sklearn")
    step_losses, before, after = _losses_and_accuracy(_run(script, "--steps=30", "--batch=64"))
    assert len(step_losses) == 6, step_losses
    assert step_losses[-1] < step_losses[0] - 0.1, step_losses
    # Ten classes: chance is 0.1.
    assert after > 0.5 and before > 0.5, (before, after)


def test_momentum_queue_fills_and_the_loss_falls_below_the_collapsed_value():
    pytest.importorskip("sklearn")
    out = _run("momentum_queue.py", "--steps=12", "--batch=32", "--queue_size=160")
    (collapsed,) = re.findall(rf"^collapsed loss: {NUMBER}$", out, re.M)
    assert float(collapsed) == pytest.approx(math.log(63), abs=1e-4)
    fills = [int(v) for v in re.findall(r" queue (\d+)$", out, re.M)]
    # 32 keys a step into 160 rows: full after five steps, never more.
    assert fills == [64, 128, 160, 160, 160, 160], out
    step_losses, _, after = _losses_and_accuracy(out)
    # A fresh network starts near the collapsed value; training moves away from it.
    assert step_losses[-1] < min(step_losses[0], float(collapsed)) - 0.1, step_losses
    assert after > 0.5, out


def test_sharded_loss_patterns_match_one_device():
    out = _run("sharded_loss.py", "--batch=64", "--dim=16")
    (one_device,) = re.findall(rf"^one device: loss {NUMBER} \(8 devices below\)$", out, re.M)
    patterns = re.findall(
        rf"^(.+): loss {NUMBER} relative error: loss {NUMBER} gradient {NUMBER}$", out, re.M
    )
    assert [name for name, *_ in patterns] == [
        "shard_map, gradient inside",
        "grad of a shard_map loss",
        "jit over a mesh of Auto axes",
        "jit over a mesh of Explicit axes",
        "pmap, gradient summed",
    ], out
    for name, loss, loss_error, grad_error in patterns:
        assert float(loss) == pytest.approx(float(one_device), rel=1e-4), name
        # float32 rounding of differently partitioned programs; a gradient 1/n or n times the
        # true one would be off by at least 0.5.
        assert float(loss_error) < 1e-4 and float(grad_error) < 1e-4, (name, out)
