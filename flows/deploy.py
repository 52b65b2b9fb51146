"""Deployments of loraflow's flows on the local stack (applied by `loraflow up`; idempotent)."""

from __future__ import annotations

from loraflow.lineage import REPO_ROOT

TRAIN_DEPLOYMENT = "gpu"


def deploy_train(pool: str) -> str:
    """Create or update the `train/gpu` deployment on work pool ``pool``; returns its id."""
    from flows.train import train_flow

    source_flow = train_flow.from_source(source=str(REPO_ROOT), entrypoint="flows/train.py:train_flow")
    deployment_id = source_flow.deploy(
        name=TRAIN_DEPLOYMENT,
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
        description="Trains a LoRA adapter on the 4-bit base; started by the finetune flow.",
    )
    return str(deployment_id)
