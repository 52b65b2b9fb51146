"""One training attempt: the trainer in a process of its own, followed until it ends.

The trainer (``python -m tasks.train``) writes its metrics, tags and steps to
``<run_dir>/train/events.jsonl``; this side forwards them to the train stage's MLflow run (buffered
through an MLflow outage), prints a progress line now and then (the Prefect log of the train flow
run, and the terminal that follows it), and turns the process's end into an Adapter or an error.
A killed trainer (SIGKILL, OOM) fails the attempt with the step it reached; Prefect retries the
attempt, and the next trainer resumes from the newest checkpoint. The trainer dies with this
process (``PR_SET_PDEATHSIG``), so a cancelled or crashed flow leaves no orphan training on.

With ``train.distributed`` 'ddp' or 'fsdp' the trainer is torchrun, which starts one rank per GPU of this
machine (``train.gpus``, or every GPU it sees): the ranks die with torchrun as torchrun dies with
this process, rank 0 writes the one event log this side follows, and the attempt's log holds every
rank's output.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraflow import tags as T
from loraflow.config import PipelineConfig
from loraflow.errors import StageError
from loraflow.records import Adapter, QuantizedBase, ValidatedData, load_record
from loraflow.tracking import EventReader, Tracker, replay

POLL_S = 0.5
PROGRESS_EVERY_S = 10.0  # a progress line at least this often, and on every 5% of the steps


class TrainerCrashed(StageError):
    """The trainer process died (killed, OOM, a bug): another attempt resumes from the newest checkpoint."""


def retry_if_crashed(task, task_run, state) -> bool:
    """Prefect's retry condition for an attempt: retry a crash, not a refusal (bad data or config)."""
    return isinstance(state.result(raise_on_failure=False), TrainerCrashed)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Progress:
    """Turns the trainer's step events into occasional one-line reports."""

    log: Path
    last_step: int = 0
    refusal: str | None = None  # the trainer's message when it refused the run
    steps: int = 0
    _printed_at: float = field(default=0.0)
    _seconds: list[float] = field(default_factory=list)

    def step(self, e: dict) -> None:
        self.last_step, self.steps = e["step"], e["steps"]
        self._seconds = [*self._seconds[-19:], e["seconds"]]
        every = max(1, self.steps // 20)
        now = time.monotonic()
        if e["step"] % every == 0 or e["step"] == self.steps or now - self._printed_at > PROGRESS_EVERY_S:
            self._printed_at = now
            per_step = sum(self._seconds) / len(self._seconds)
            eta = int(per_step * (self.steps - e["step"]))
            print(
                f"train step {e['step']}/{self.steps}  loss {e['loss']:.4f}  {per_step:.2f} s/step  "
                f"ETA {eta // 60}:{eta % 60:02d}  (log: {self.log})"
            )


def run_attempt(
    config: PipelineConfig,
    base: QuantizedBase,
    data: ValidatedData,
    run_dir: Path,
    checkpoint_dir: Path | None,
    tracker: Tracker,
    attempt: int,
) -> Adapter:
    """Run the trainer once and return its adapter; raise StageError when the process fails or is killed."""
    from tasks.train import REFUSED, TrainRequest  # torch and peft: imported where training happens

    folder = run_dir / "train"
    folder.mkdir(parents=True, exist_ok=True)
    request = TrainRequest(
        base=base,
        data=data,
        lora=config.lora,
        train=config.train,
        run_dir=str(run_dir),
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
    ).save(folder / "request.json")
    events, result, log = folder / "events.jsonl", folder / f"adapter-{attempt}.json", folder / f"attempt-{attempt}.log"
    result.unlink(missing_ok=True)
    reader = EventReader(events, events.stat().st_size if events.exists() else 0)  # this attempt's lines only
    progress = Progress(log)
    argv = trainer_command(config, [str(request), str(events), str(result)])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
    try:
        while True:
            code = proc.poll()
            for e in reader.new():
                _handle(e, tracker, progress, attempt)
            if code is not None:
                break
            time.sleep(POLL_S)
    except BaseException:  # cancelled or interrupted: the trainer goes with us
        proc.kill()
        proc.wait()
        raise
    if code == REFUSED:
        raise StageError(progress.refusal or f"the trainer refused the run; its output: {log}")
    if code != 0 or not result.is_file():
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        resume = f"; the next attempt resumes from the newest checkpoint in {checkpoint_dir}" if checkpoint_dir else ""
        raise TrainerCrashed(
            f"the trainer (attempt {attempt}, pid {proc.pid}) {how} after step {progress.last_step}{resume}. "
            f"Its output: {log}\n{_tail(log)}"
        )
    return load_record(Adapter, result)


def trainer_command(config: PipelineConfig, args: list[str]) -> list[str]:
    """The trainer's command line: ``python -m tasks.train ARGS``, under torchrun (a rank per GPU) for 'ddp'/'fsdp'."""
    cfg = config.train
    if cfg.distributed == "none":
        return [sys.executable, "-m", "tasks.train", *args]
    ranks = ranks_to_launch(cfg.gpus, _visible_gpus())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone"]
    return [*torchrun, "-m", "tasks.train", *args]


def ranks_to_launch(gpus: int | None, visible: int) -> int:
    """How many ranks to start: ``train.gpus``, or every visible GPU (1 rank on a machine without one)."""
    if gpus is None:
        return max(1, visible)
    if visible and gpus > visible:
        raise StageError(
            f"train.gpus={gpus}, but this worker sees {visible} GPU(s): lower train.gpus, or give the `gpu` pool's "
            "job more GPUs (the gpu_count job variable, infra/README.md)"
        )
    return gpus  # without a GPU: that many CPU ranks (gloo), as the tests run them


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _handle(e: dict, tracker: Tracker, progress: Progress, attempt: int) -> None:
    kind = e["kind"]
    if kind == "started":
        ranks = f", {e['ranks']} ranks" if e.get("ranks", 1) > 1 else ""
        print(f"trainer started (attempt {attempt}, pid {e['pid']}{ranks}); its output: {progress.log}")
    elif kind == "step":
        progress.step(e)
    elif kind == "refused":
        progress.refusal = e["message"]
    elif kind == "tags" and T.RESUMED_FROM in e["tags"]:
        print(f"resuming from {e['tags'][T.RESUMED_FROM]}")
    replay(e, tracker)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
