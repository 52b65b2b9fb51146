"""Following a flow run from another process: its log lines as they arrive, until it ends.

The train flow runs on the `gpu` pool's worker; the finetune flow (and the terminal that started
it) follows it here, so its progress lines ("train step 12/30 loss 2.91 ...") show live where the
user is looking, and in the finetune flow run's log in the Prefect UI too.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from uuid import UUID

POLL_S = 1.0


# Prefect's own lifecycle lines: true, but noise in a terminal that follows a run.
ENGINE_CHATTER = (
    "Finished in state",
    "Beginning flow run",
    "Running 1 deployment pull step",
    "Executing deployment step",
    "Deployment step",
    "All deployment steps",
    "Worker '",
    "Created task run",
    "Executing '",
    "Opening process",
    "Process for flow run",
)


def follow(
    flow_run_id: UUID | str,
    timeout_s: float,
    show: Callable[[str], None] | None = None,
    prefix: str = "",
):
    """Show each log line of the flow run (INFO and above; Prefect's lifecycle lines left out) until it reaches
    a final state or ``timeout_s`` passes; return the flow run as last read.

    ``show`` defaults to ``print`` looked up when called: inside a flow with ``log_prints`` that is Prefect's
    print, so the lines land in the calling flow run's log too.
    """
    show = show or (lambda line: print(line, flush=True))
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel, LogFilterTimestamp
    from prefect.client.schemas.sorting import LogSort

    deadline = time.monotonic() + timeout_s
    drains = 2  # reads after the final state: the run's last lines are shipped as it ends
    seen: set[UUID] = set()
    since: dt.datetime | None = None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(UUID(str(flow_run_id)))
            done = run.state is not None and run.state.is_final()
            # Batches of log lines can land a little out of order: re-read a margin, skip what was shown.
            after = LogFilterTimestamp(after_=since - dt.timedelta(seconds=30)) if since else None
            log_filter = LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[run.id]), level=LogFilterLevel(ge_=20), timestamp=after
            )
            for log in client.read_logs(log_filter=log_filter, sort=LogSort.TIMESTAMP_ASC, limit=200):
                if log.id not in seen:
                    seen.add(log.id)
                    if not log.message.startswith(ENGINE_CHATTER) and " submitted to infrastructure" not in log.message:
                        show(prefix + log.message)
                    since = max(since or log.timestamp, log.timestamp)
            drains -= done
            if drains < 0 or time.monotonic() > deadline:
                return run
            time.sleep(POLL_S)
