"""Reconciliation: what a crashed attempt could not close, closed by the next `up`, `status` or run.

A process killed with SIGKILL cannot end its own MLflow runs or mark its Prefect flow run; the
next loraflow command that talks to the stack does it:

1. a Prefect flow run of loraflow (finetune, train, promote) still RUNNING whose process on this
   machine is gone is set to CRASHED, with the reason;
2. an MLflow run still RUNNING that belongs to a flow run in a final state (its ``loraflow.flow_run_id``
   tag, or its parent's) is ended FAILED (KILLED for a cancelled one), with a note saying why.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from loraflow import tags as T

FLOWS = ("finetune", "train", "promote", "rollback")


@dataclass(frozen=True)
class Closed:
    what: str  # "prefect flow run" or "mlflow run"
    id: str
    why: str


def reconcile(prefect, mlflow) -> list[Closed]:
    """Close crashed flow runs (sync Prefect client ``prefect``) and the MLflow runs they left RUNNING."""
    return _crashed_flow_runs(prefect) + _orphaned_mlflow_runs(prefect, mlflow)


def _process_gone(infrastructure_pid: str | None) -> bool:
    """True when the flow run's process ran on this machine and no longer exists."""
    if not infrastructure_pid or ":" not in infrastructure_pid:
        return False
    host, _, pid = infrastructure_pid.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    import psutil

    return not psutil.pid_exists(int(pid))


def _crashed_flow_runs(prefect) -> list[Closed]:
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    running = prefect.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOWS))),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
    )
    closed = []
    for run in running:
        if _process_gone(run.infrastructure_pid):
            why = f"its process ({run.infrastructure_pid}) is gone; marked by loraflow's reconciliation"
        elif (
            run.infrastructure_pid is None and (parent := _parent_state(prefect, run)) is not None and parent.is_final()
        ):
            why = f"it ran inside a flow run that ended {parent.name}; marked by loraflow's reconciliation"
        else:
            continue
        prefect.set_flow_run_state(run.id, Crashed(message=why), force=True)
        closed.append(Closed("prefect flow run", str(run.id), why))
    return closed


def _ended(state) -> bool:
    return state is not None and state.is_final()


def _parent_state(prefect, run):
    """The state of the flow run that a subflow run ran inside (None for a top-level run)."""
    if run.parent_task_run_id is None:
        return None
    task_run = prefect.read_task_run(run.parent_task_run_id)
    return prefect.read_flow_run(task_run.flow_run_id).state if task_run.flow_run_id else None


def _orphaned_mlflow_runs(prefect, mlflow) -> list[Closed]:
    from prefect.exceptions import ObjectNotFound

    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    if not experiments:
        return []
    running = mlflow.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=1000)
    by_id = {r.info.run_id: r for r in running}
    closed = []
    states: dict[str, object] = {}
    for run in running:
        flow_run_id = run.data.tags.get(T.FLOW_RUN_ID)
        parent = run.data.tags.get("mlflow.parentRunId")
        if flow_run_id is None and parent is not None:
            owner = by_id.get(parent) or mlflow.get_run(parent)
            if owner.info.status != "RUNNING":  # the parent ended: nothing can end this one any more
                why = f"its parent run {parent} ended {owner.info.status} while it was still RUNNING"
                closed.append(_end(mlflow, run.info.run_id, "FAILED", why))
                continue
            flow_run_id = owner.data.tags.get(T.FLOW_RUN_ID)
        if flow_run_id is None or flow_run_id == "local":
            continue
        if flow_run_id not in states:
            try:
                states[flow_run_id] = prefect.read_flow_run(flow_run_id).state
            except (ObjectNotFound, ValueError):
                states[flow_run_id] = None
        state = states[flow_run_id]
        if state is not None and state.is_final() and not state.is_completed():
            status = "KILLED" if state.is_cancelled() else "FAILED"
            why = f"Prefect flow run {flow_run_id} ended {state.name}: {state.message or ''}".strip()
            closed.append(_end(mlflow, run.info.run_id, status, why))
    return closed


def _end(mlflow, run_id: str, status: str, why: str) -> Closed:
    mlflow.set_tag(run_id, T.CLOSED_BY, why[:4000])
    mlflow.set_terminated(run_id, status=status)
    return Closed("mlflow run", run_id, why)
