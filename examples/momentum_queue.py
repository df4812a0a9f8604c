"""H-SCL with a momentum encoder and a labelled queue of its keys (MoCo-style) on the digits.

    python examples/momentum_queue.py                       # 300 steps, batch 64, queue 1024
    python examples/momentum_queue.py --steps=40            # a quick run
    python examples/momentum_queue.py --queue_keys=online   # the queue misused: see below

Each step contrasts the batch's two views with each other and with the queue's filled rows
(``losses.hscl(..., queue=queue)``: other-class rows are extra negatives, never anchors, and get
no gradient), then pushes the momentum encoder's projections of the second view, with their
labels, onto the front of the queue (``queue.push``; the queue starts as ``losses.Queue.empty``).
The momentum encoder is an exponential moving average of the online one, so the keys drift slowly
and the queue's rows stay comparable with each other.

The queue must hold a momentum encoder's keys. ``--queue_keys=online`` fills it with the online
network's own projections instead (what a user gets by pushing the batch's ``z2``): the rows of
older steps then come from networks the optimiser has since moved away from, and the run can
collapse to every projection equal, where the loss is ``ln(2B - 1)`` (printed as
``collapsed loss``); docs/hardening-and-queue.md shows a measured run.

It prints the weighted-kNN top-1 accuracy of the encoder's features on the held-out fifth of the
digits (chance: 0.1) before and after training, and six times during training the step, the mean
loss since the previous line and the queue's filled rows::

    collapsed loss: <ln(2B - 1)>
    knn_top1 before: <accuracy>
    step 50 loss <mean loss> queue <filled rows>
    ...
    knn_top1 after: <accuracy>
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from _digits import size_parser, train_and_report, two_views
from linen_digits import Encoder

from hscl_jax import losses


def main() -> None:
    parser = size_parser(__doc__.splitlines()[0], steps=300, batch=64)
    parser.add_argument("--queue_size", type=int, default=1024, help="rows of the queue")
    parser.add_argument("--momentum", type=float, default=0.99, help="EMA of the key encoder")
    parser.add_argument(
        "--queue_keys",
        choices=("momentum", "online"),
        default="momentum",
        help="which network's projections fill the queue ('online' shows the misuse)",
    )
    args = parser.parse_args()
    model = Encoder()
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, 64)))
    optimizer = optax.adam(1e-3)
    dim = model.apply(params, jnp.zeros((1, 64)))[1].shape[-1]
    queue = losses.Queue.empty(args.queue_size, dim)  # no row filled: every row masked

    @jax.jit
    def train_step(state, images, labels, view_key):
        params, key_params, opt_state, queue = state
        view1, view2 = two_views(view_key, images)

        def loss_fn(params):
            _, z1 = model.apply(params, view1)
            _, z2 = model.apply(params, view2)
            return losses.hscl(z1, z2, labels, beta=1.0, queue=queue), z2

        (loss, z2), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        key_params = jax.tree.map(
            lambda k, p: args.momentum * k + (1 - args.momentum) * p, key_params, params
        )
        if args.queue_keys == "momentum":
            keys = model.apply(key_params, view2)[1]
        else:
            keys = z2
        # FIFO: the keys become the newest rows, as constants; the oldest rows fall off.
        queue = queue.push(keys, labels)
        return (params, key_params, opt_state, queue), loss

    print(f"collapsed loss: {math.log(2 * args.batch - 1):.4f}")
    train_and_report(
        args,
        (params, params, optimizer.init(params), queue),
        train_step,
        jax.jit(lambda state, images: model.apply(state[0], images)[0]),
        describe=lambda state: f" queue {int(state[3].valid.sum())}",
    )


if __name__ == "__main__":
    main()
