"""The CLI as a client of its deployments: `loraflow run` submits, follows, and can let go.

    loraflow run configs/demo.yaml    # submits finetune/cpu, shows its log live, prints the summary
    loraflow runs                     # recent finetune runs, to find one again
    loraflow logs NAME                # its log, followed while it runs

The finetune flow runs on the `cpu` pool's worker, not inside the command: closing the terminal or
killing the command leaves the run going. Ctrl-C asks whether to detach (the run goes on) or to
cancel it, and cancelling cancels the train flow it started too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from loraflow.errors import StageError, UsageError
from loraflow.records import RunSummary, load_record

FINETUNE_DEPLOYMENT = "finetune/cpu"
FOLLOW_TIMEOUT_S = 7 * 24 * 3600.0  # a follower never gives up first: Ctrl-C detaches


def submit_and_follow(params: dict[str, Any], settings) -> RunSummary | None:
    """Submit the finetune deployment and follow it to its end; None when the user detached or cancelled."""
    from prefect.deployments import run_deployment

    from flows.bookkeeping import flow_parameters
    from flows.follow import follow

    run = run_deployment(FINETUNE_DEPLOYMENT, parameters=flow_parameters(params), timeout=0)
    print(
        f"finetune flow run '{run.name}' submitted to the cpu pool; following it (Ctrl-C to detach or cancel)\n"
        f"  Prefect UI: {settings.prefect_ui_url}/runs/flow-run/{run.id}",
        flush=True,
    )
    try:
        final = follow(run.id, FOLLOW_TIMEOUT_S, show=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        return _interrupted(run, settings)
    state = final.state
    if state is None or not state.is_completed():
        raise StageError(
            f"finetune flow run '{final.name}' ended {state.name if state else 'unknown'}: "
            f"{(state.message if state else '') or 'see its log'} (`loraflow logs {final.name}`)"
        )
    return _summary(Path(params["home"]), params["config"].run_name, str(run.id))


def _interrupted(run, settings) -> None:
    answer = "d"
    if sys.stdin.isatty():
        try:
            answer = input("\nDetach (the run goes on) or cancel it? [D/c] ").strip().lower()[:1] or "d"
        except (EOFError, KeyboardInterrupt):
            answer = "d"
    if answer == "c":
        cancelled = cancel(settings, run.id)
        print(f"cancelled flow run(s): {', '.join(cancelled)}")
    else:
        print(f"detached: '{run.name}' goes on. `loraflow logs {run.name}` follows it again.")
    return None


def cancel(settings, flow_run_id) -> list[str]:
    """Cancel a flow run and the flow runs it started (the train flow on the gpu pool); return their names."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.states import Cancelling

    from loraflow.stack.services import prefect_client

    names = []
    with prefect_client(settings) as client:
        run = client.read_flow_run(flow_run_id)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id]))
        )
        for r in [*children, run]:
            if r.state is not None and not r.state.is_final():
                client.set_flow_run_state(r.id, Cancelling(message="cancelled from the loraflow CLI"), force=True)
                names.append(r.name)
    return names


def _summary(home: Path, run_name: str | None, flow_run_id: str) -> RunSummary:
    folders = [home / "runs" / run_name] if run_name else sorted((home / "runs").glob(f"*-{flow_run_id[:8]}"))
    for folder in folders:
        if (folder / "summary.json").is_file():
            return load_record(RunSummary, folder / "summary.json")
    raise StageError(f"the finetune flow run {flow_run_id} completed but left no summary.json under {home / 'runs'}")


def recent_runs(settings, limit: int) -> list[str]:
    """One line per recent finetune flow run, newest first, then when the schedule starts the next one."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    from loraflow.stack.services import prefect_client

    finetune = FlowFilter(name=FlowFilterName(any_=["finetune"]))
    scheduled = FlowRunFilterStateType(any_=[StateType.SCHEDULED])
    with prefect_client(settings) as client:
        # A schedule keeps its future runs as Scheduled flow runs without a start time: listed apart, as one line.
        runs = client.read_flow_runs(
            flow_filter=finetune,
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=scheduled.any_))
            ),
            sort=FlowRunSort.START_TIME_DESC,
            limit=limit,
        )
        upcoming = client.read_flow_runs(
            flow_filter=finetune,
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=scheduled)),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=1,
        )
    lines = [f"{'NAME':<28}{'STATE':<12}{'STARTED (UTC)':<22}ID"]
    for r in runs:
        started = r.start_time.strftime("%Y-%m-%d %H:%M:%S") if r.start_time else "-"
        lines.append(f"{r.name:<28}{(r.state.name if r.state else '-'):<12}{started:<22}{r.id}")
    if upcoming:
        lines.append(f"next scheduled: {upcoming[0].expected_start_time:%Y-%m-%d %H:%M:%S} UTC ({upcoming[0].name})")
    return lines


def show_logs(settings, name_or_id: str) -> int:
    """Print a flow run's log and follow it while it runs; exit 0 when it completed, 1 otherwise."""
    from uuid import UUID

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from flows.follow import follow
    from loraflow.stack.services import prefect_client

    with prefect_client(settings) as client:
        try:
            run_id = UUID(name_or_id)
        except ValueError:
            found = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name_or_id])))
            if not found:
                raise UsageError(f"no flow run named {name_or_id!r}; `loraflow runs` lists them") from None
            run_id = found[0].id
    try:
        final = follow(run_id, FOLLOW_TIMEOUT_S, show=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        return 130
    return 0 if final.state is not None and final.state.is_completed() else 1
