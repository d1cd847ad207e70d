"""A pace for Ray Data's scheduling loop in the training job.

Ray Data's streaming executor (2.60, `StreamingExecutor.run`) waits in `ray.wait` only while it
has tasks running. When its output is backpressured, as when a trainer consumes samples slower
than they are decoded, it has none, and the loop turns without a pause: the training stream's
SplitCoordinator actor then held a whole core of the 2-core machine (py-spy: the loop's resource
bookkeeping), beside a trainer that needed it. A few milliseconds' sleep per loop step gives
that core back; a trainer takes a batch every tenth of a second or more, so it never waits on it.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback  # Ray's hook; no public path

PACE_S = 0.005  # at most 200 loop steps a second


class PacedSchedulingLoop(ExecutionCallback):
    """Sleeps PACE_S at each step of the executor's loop (DataContext.custom_execution_callback_classes)."""

    def on_execution_step(self, executor) -> None:
        time.sleep(PACE_S)
