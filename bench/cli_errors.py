"""How fast `loraflow run` refuses a run it can tell is wrong, before any flow starts (issue 21: < 2 s).

    python bench/cli_errors.py              # 5 tries per case; prints the median wall time per case
    python bench/cli_errors.py --tries 9

Each case is a copy of configs/demo.yaml with one mistake, run as a user runs it (`loraflow run
FILE` in a fresh process, with a local stack that is not running). For each: the median wall time
against a side-by-side baseline of `loraflow --help` (the interpreter and the CLI's own imports),
the exit code, how many lines it printed, and whether a traceback slipped through.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def cases(folder: Path) -> dict[str, Path]:
    demo = yaml.safe_load(DEMO.read_text())
    demo["data"]["path"] = str((DEMO.parent / demo["data"]["path"]).resolve())
    demo["data"]["allowed_roots"] = [str(ROOT / "data")]  # the copies live in a temporary folder
    edits = {
        "missing dataset": lambda c: c["data"].update(path=str(ROOT / "data" / "no-such-file.jsonl")),
        "data outside roots": lambda c: c["data"].update(path="/etc/hostname"),
        "unknown contract": lambda c: c["data"].update(contract="instruction_v9"),
        "invalid setting": lambda c: c["train"].update(learning_rate=-1),
        "stack not running": lambda c: None,  # the config is fine: only the stack is missing
    }
    paths = {}
    for name, edit in edits.items():
        config = yaml.safe_load(yaml.safe_dump(demo))
        edit(config)
        paths[name] = folder / f"{name.replace(' ', '-')}.yaml"
        paths[name].write_text(yaml.safe_dump(config))
    return paths


def timed(args: list[str], home: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = {"LORAFLOW_HOME": str(home), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, home = Path(tmp), Path(tmp) / "home"
        configs = cases(folder)
        print(f"{'case':<20}{'median s':>10}{'--help s':>10}{'exit':>6}{'lines':>7}  traceback  first line")
        for name, config in configs.items():
            runs, baseline = [], []
            for _ in range(args.tries):  # interleaved: the baseline sees the same machine load
                baseline.append(timed(["--help"], home)[0])
                runs.append(timed(["run", str(config)], home))
            done = runs[-1][1]
            out = (done.stdout + done.stderr).strip().splitlines()
            print(
                f"{name:<20}{statistics.median(t for t, _ in runs):>10.2f}{statistics.median(baseline):>10.2f}"
                f"{done.returncode:>6}{len(out):>7}  {'YES' if 'Traceback' in done.stderr else 'no':<9}  {out[0][:90]}"
            )


if __name__ == "__main__":
    main()
