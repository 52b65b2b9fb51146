"""The `loraflow` command line.

    loraflow up | down | status             the local stack (Prefect server, MLflow server, gpu-pool worker)
    loraflow run CONFIG.yaml [--set k=v]    the finetune flow on the cpu pool, followed here (Ctrl-C: detach or cancel)
    loraflow runs | logs RUN                recent finetune runs; one run's log, followed while it runs
    loraflow demo                           `run configs/demo.yaml`, starting the stack if needed
    loraflow validate DATA [--contract N]   the validate stage alone (exit 0 pass, 1 violated, 2 usage)
    loraflow config-schema                  the JSON schema of the run configuration
    loraflow promote NAME --version N       the promotion gate, then move `champion` (--force needs --reason)
    loraflow rollback NAME                  `champion` back to `previous-champion`
    loraflow history NAME [--at DATE]       versions, lineage, alias moves (--json, --report out.html)
    loraflow gc [--dry-run]                 remove what retention allows; never what an alias needs

Environment variables are read here and nowhere deeper: LORAFLOW_HOME (default ./.loraflow),
LORAFLOW_PREFECT_PORT, LORAFLOW_MLFLOW_PORT, LORAFLOW_HOST + LORAFLOW_ALLOW_REMOTE (where the servers listen:
127.0.0.1 unless both say otherwise), LORAFLOW_IDENTITY (who moves aliases, for the audit trail).
MLflow's own MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD hold its credentials: a tracking URI
that carries one hands it over to them here, and everything the CLI prints or logs is redacted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from loraflow.credentials import install_log_redaction, move_tracking_credentials, redacted_output
from loraflow.errors import LoraflowError, UsageError
from loraflow.lineage import REPO_ROOT
from loraflow.noise import silence_known_noise
from loraflow.stack.settings import OFFLINE_AND_QUIET

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
BACKEND_HELP = (
    "databases of the Prefect and MLflow servers for a new LORAFLOW_HOME: sqlite files (default) or a private "
    "PostgreSQL server (needs Debian's postgresql package); fixed once the home exists"
)
IN_PROCESS_HELP = "run the finetune flow inside this command instead of on the cpu pool's worker (killing it stops it)"
FRESH_HELP = "train from scratch: drop this config's checkpoints and cached adapter instead of resuming from them"


def _settings(backend: str | None = None):
    """The local stack's settings; this process's Prefect and MLflow clients are pointed at it.

    The variables must be set before Prefect is first imported: it reads its settings then.
    ``backend`` (from `--backend`) is checked against the one recorded in LORAFLOW_HOME.
    """
    from loraflow.stack.settings import StackSettings, client_env

    settings = StackSettings.from_env(os.environ, backend=backend)
    os.environ.update(client_env(settings))
    return settings


def _without_credential(tracking_uri: str, setting: str) -> str:
    """The MLflow URI without its credential, which moves into MLflow's variables (warned once, on stderr)."""
    clean, warning = move_tracking_credentials(tracking_uri, setting, os.environ)
    if warning:
        print(f"loraflow: {warning}", file=sys.stderr)
    return clean


def cmd_up(args: argparse.Namespace) -> int:
    from loraflow.stack.services import up

    settings = _settings(args.backend)
    status = up(settings)
    from flows.deploy import apply_saved

    apply_saved(settings.home, DEMO_CONFIG)
    _reconcile(settings)
    print(status.format())
    print(f"\nPrefect UI: {settings.prefect_ui_url}\nMLflow UI:  {settings.mlflow_url}\nState:      {settings.home}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from loraflow.stack.services import down

    stopped = down(_settings())
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from loraflow.stack.services import status

    settings = _settings()
    st = status(settings)
    print(st.format())
    if st.all_healthy:
        _reconcile(settings)
    return 0 if st.all_healthy else 1


def _reconcile(settings, tracking_uri: str | None = None) -> None:
    """Close what crashed attempts left open (flows/reconcile.py) and say what was closed."""
    from mlflow import MlflowClient

    from flows.reconcile import reconcile
    from loraflow.stack.services import prefect_client

    with prefect_client(settings) as prefect:
        closed = reconcile(prefect, MlflowClient(tracking_uri=tracking_uri or settings.mlflow_url))
    for c in closed:
        print(f"closed {c.what} {c.id}: {c.why}")


def cmd_run(args: argparse.Namespace) -> int:
    return _run(Path(args.config), args.set or [], False, fresh=args.fresh, in_process=args.in_process)


def cmd_demo(args: argparse.Namespace) -> int:
    return _run(DEMO_CONFIG, args.set or [], True, args.backend, args.fresh, args.in_process)


def _run(
    config_path: Path,
    overrides: list[str],
    start_stack: bool,
    backend: str | None = None,
    fresh: bool = False,
    in_process: bool = False,
) -> int:
    from loraflow.config import load_config
    from loraflow.stack.services import status, up

    config = load_config(config_path, overrides)  # fails before any work starts
    settings = _settings(backend)
    if start_stack:
        up(settings)
        from flows.deploy import apply_saved

        apply_saved(settings.home, DEMO_CONFIG)
    from flows.preflight import Problem, preflight, raise_if_any

    # The flow's parameters are stored by Prefect: the URI goes in without its credential.
    tracking_uri = (
        _without_credential(config.tracking.uri, "tracking.uri") if config.tracking.uri else settings.mlflow_url
    )
    # A stopped stack is one problem among the config's, not a reason to leave them for the next try.
    running = start_stack or status(settings).all_healthy
    problems = preflight(
        config,
        settings.home,
        tracking_uri if running or config.tracking.uri else None,
        settings.prefect_api_url if running else None,
    )
    if not running:
        problems.append(
            Problem(
                f"the local stack is not running under {settings.home}: start it with `loraflow up` "
                "(or use `loraflow demo`)",
                False,
            )
        )
    raise_if_any(problems)
    _reconcile(settings, tracking_uri)
    params = {"config": config, "home": str(settings.home), "tracking_uri": tracking_uri, "fresh": fresh}
    if in_process:
        from flows.finetune import finetune

        summary = finetune(**params)
    else:
        from flows.client import submit_and_follow

        summary = submit_and_follow(params, settings)
        if summary is None:  # detached or cancelled: said so already
            return 0
    _print_summary(summary, settings)
    if start_stack:  # the demo
        _print_next_steps(summary, settings)
    return 0


def _print_summary(summary, settings) -> None:
    from loraflow.reports import metrics_rows

    v = summary.version
    print(f"\nRegistered model: {v.name}  version {v.version}  (alias '{v.alias}', {v.model_uri})")
    rows = metrics_rows(summary.evaluation)
    width = max(len(r["metric"]) for r in rows) + 2  # the general-text row's name is the long one
    print(f"{'metric':<{width}}{'base':>12}{'fine-tuned':>12}  change")
    for r in rows:
        print(f"{r['metric']:<{width}}{r['base']:>12}{r['fine-tuned']:>12}  {r['change']}")
    m = summary.merged
    print(f"merge check: max |dlogit| {m.max_abs_logit_diff:.3g} <= tolerance {m.tolerance:g}")
    print("stage seconds: " + ", ".join(f"{k} {s:.1f}" for k, s in summary.stage_seconds.items()))
    print(f"Run directory: {summary.run_dir}")
    print(f"Prefect UI:    {settings.prefect_ui_url}/runs/flow-run/{summary.flow_run_id}")
    print(f"MLflow UI:     {summary.mlflow_run_url}")
    if summary.promotion is not None:
        print(f"Promotion:     {summary.promotion.message}")


def _print_next_steps(summary, settings) -> None:
    """What to look at and try after the demo."""
    v = summary.version
    prefect = f"PREFECT_API_URL={settings.prefect_api_url} {Path(sys.executable).parent / 'prefect'}"
    print(
        "\nNext:\n"
        f"  look at the run      Prefect UI {settings.prefect_ui_url}   MLflow UI {settings.mlflow_url}\n"
        f"  the data report      {summary.run_dir}/data/validation_report.html\n"
        f"  promote the candidate  loraflow promote {v.name} --version {v.version}\n"
        f"  roll back            loraflow rollback {v.name}\n"
        f"  lineage and history  loraflow history {v.name}\n"
        f"  the nightly run now  {prefect} deployment run finetune/retrain-nightly\n"
        "  stop the stack       make down"
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from loraflow.data.report import format_report
    from tasks.validate import validate_file

    if (args.tokenizer is None) != (args.max_seq_length is None):
        raise UsageError("--tokenizer and --max-seq-length go together (the token-length check needs both)")
    run_dir = Path(args.out) if args.out else _settings().home / "validate" / Path(args.data).stem
    data = validate_file(args.data, args.contract, run_dir, args.policy, args.tokenizer, args.max_seq_length)
    print(format_report(json.loads(Path(data.report_path).read_text(encoding="utf-8"))))
    print(
        f"PASSED contract {data.contract}: {data.rows} rows ({data.train_rows} train / {data.eval_rows} eval, "
        f"{data.quarantined_rows} quarantined), digest {data.digest[:16]}"
    )
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from loraflow.config import load_config

    config_path = Path(args.config).resolve()
    load_config(config_path)  # refuse a bad default config before touching the server
    remote = os.environ.get("PREFECT_API_URL")  # a team server, when the user points at one
    if not remote:
        from loraflow.stack.services import status

        settings = _settings()
        if not status(settings).all_healthy:
            raise UsageError("no Prefect server: start the local stack with `loraflow up`, or set PREFECT_API_URL.")
    from flows.deploy import CREDENTIAL_BLOCKS, deploy_all, save_choice

    deployed = deploy_all(config_path)
    if not remote:
        save_choice(settings.home, config_path)
    for d in deployed:
        print(f"{d.name:<28} pool {d.pool:<5} {d.id}")
    env = deployed[0].env  # the same for every deployment
    blocks = ", ".join(CREDENTIAL_BLOCKS[v] for v in env)
    print(
        f"MLflow credential: runs get {', '.join(env)} from the Secret blocks {blocks}"
        if env
        else "MLflow credential: from each worker's environment (or create the Secret blocks "
        f"{' and '.join(CREDENTIAL_BLOCKS.values())} and deploy again)"
    )
    webhook = args.alert_webhook or os.environ.get("LORAFLOW_ALERT_WEBHOOK")
    if webhook:
        from urllib.parse import urlsplit

        from flows.deploy import ensure_failure_alert

        ensure_failure_alert(webhook)
        # The host only: a webhook's path or query is often its credential (kept in the block's secret values).
        print(
            f"failure alert: automation posts to the webhook on {urlsplit(webhook).hostname} when a finetune "
            "or train run fails or crashes"
        )
    else:
        print("failure alert: none (pass --alert-webhook URL or set LORAFLOW_ALERT_WEBHOOK)")
    return 0


def _registry(args: argparse.Namespace, need_prefect: bool):
    """MLflow client of --tracking-uri (default: the local stack's server); promote/rollback run as Prefect flows."""
    from mlflow import MlflowClient

    from loraflow.stack.services import status
    from loraflow.stack.settings import PREFECT

    settings = _settings()
    if need_prefect and not status(settings)[PREFECT].healthy:
        raise UsageError(
            f"the Prefect server of the local stack under {settings.home} is not running: start it with `loraflow up`"
        )
    tracking_uri = _without_credential(args.tracking_uri, "--tracking-uri") if args.tracking_uri else None
    return MlflowClient(tracking_uri=tracking_uri or settings.mlflow_url)


def _promotion_rules(config: str | None, client, run_id: str | None):
    """The promotion section of --config, else of the config the version was trained with, else the defaults."""
    from loraflow.config import PromotionConfig, load_config
    from loraflow.registry.versions import run_config

    if config:
        rules = load_config(config).promotion
    else:
        trained_with = run_config(client, run_id) if run_id else None
        rules = trained_with.promotion if trained_with else PromotionConfig()
    identity = os.environ.get("LORAFLOW_IDENTITY")
    return rules.model_copy(update={"identity": identity}) if identity else rules


def _print_verdict(result) -> None:
    if result.verdict is None:
        return
    v = result.verdict
    against = f"champion {v.champion_version}" + (" (re-scored on the candidate's data)" if v.reevaluated else "")
    print(f"gate for version {result.version} against {against if v.champion_version else 'no champion yet'}:")
    for c in v.checks:
        print(f"  {'ok  ' if c.passed else 'FAIL'} {c.name:<22} {c.detail}")


def cmd_promote(args: argparse.Namespace) -> int:
    from loraflow.errors import RegistryError
    from loraflow.registry.versions import get_version

    if args.force and not (args.reason or "").strip():
        raise UsageError("--force needs --reason TEXT: a forced promotion is written to the audit trail with it")
    client = _registry(args, need_prefect=True)
    candidate = get_version(client, args.name, args.version)  # a clear error before any flow starts
    rules = _promotion_rules(args.config, client, candidate.run_id)
    from flows.promote import promote

    result = promote(
        name=args.name,
        version=candidate.version,
        tracking_uri=client.tracking_uri,
        rules=rules,
        reason=args.reason or "",
        force=args.force,
    )
    _print_verdict(result)
    if not result.promoted:
        raise RegistryError(result.message)
    print(result.message)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    client = _registry(args, need_prefect=True)
    from flows.promote import rollback

    result = rollback(
        name=args.name,
        tracking_uri=client.tracking_uri,
        rules=_promotion_rules(args.config, client, None),
        reason=args.reason or "",
    )
    print(result.message)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from loraflow.registry.audit import parse_when
    from loraflow.registry.history import history
    from loraflow.registry.report import history_text, lineage_text, write_html_report

    when = parse_when(args.at) if args.at else None  # a bad date fails before any request
    h = history(_registry(args, need_prefect=False), args.name)
    row = h.version(args.version) if args.version else None
    if args.json:
        payload = h.model_dump(mode="json")
        if when is not None:
            payload["champion_at"] = {"at": when.isoformat(), "version": h.champion_at(when)}
        print(json.dumps(payload, indent=2))
    else:
        print(history_text(h))
        if when is not None:
            print(f"\nchampion at {args.at}: version {h.champion_at(when) or 'none (no champion yet)'}")
        if row is not None:
            print("\n" + lineage_text(row))
    if args.report:
        out = write_html_report(h, Path(args.report))
        print(f"report: {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from flows.client import recent_runs

    settings = _settings()
    for line in recent_runs(settings, args.limit):
        print(line)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from flows.client import show_logs

    return show_logs(_settings(), args.run)


def cmd_gc(args: argparse.Namespace) -> int:
    from loraflow.config import load_config
    from loraflow.registry.retention import collect

    rules = load_config(Path(args.config)).retention if args.config else load_config(DEMO_CONFIG).retention
    client = _registry(args, need_prefect=False)
    plan = collect(_settings().home, rules, client, dry_run=args.dry_run)
    print(plan.format())
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from loraflow.config import PipelineConfig

    print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loraflow", description="Workflow-orchestrated QLoRA fine-tuning with Prefect and MLflow."
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up_cmd = sub.add_parser(
        "up", help="start the local stack (idempotent; waits until healthy) and deploy the train flow"
    )
    up_cmd.add_argument("--backend", choices=["sqlite", "postgres"], help=BACKEND_HELP)
    up_cmd.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop what `loraflow up` started").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="show the local stack's services (exit 1 unless all are healthy)").set_defaults(
        fn=cmd_status
    )

    run = sub.add_parser("run", help="run the finetune flow with a config file (the stack must be up)")
    run.add_argument("config", help="YAML run configuration, e.g. configs/demo.yaml")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY.PATH=VALUE",
        help="override a config value (repeatable), e.g. train.max_steps=20",
    )
    run.add_argument("--fresh", action="store_true", help=FRESH_HELP)
    run.add_argument("--in-process", action="store_true", help=IN_PROCESS_HELP)
    run.set_defaults(fn=cmd_run)

    demo = sub.add_parser("demo", help="start the stack if needed and run configs/demo.yaml end to end")
    demo.add_argument(
        "--set", action="append", metavar="KEY.PATH=VALUE", help="override a demo config value (repeatable)"
    )
    demo.add_argument("--backend", choices=["sqlite", "postgres"], help=BACKEND_HELP)
    demo.add_argument("--fresh", action="store_true", help=FRESH_HELP)
    demo.add_argument("--in-process", action="store_true", help=IN_PROCESS_HELP)
    demo.set_defaults(fn=cmd_demo)

    runs = sub.add_parser("runs", help="recent finetune flow runs: name, state, when (find a run you detached from)")
    runs.add_argument("--limit", type=int, default=15, help="how many, newest first")
    runs.set_defaults(fn=cmd_runs)

    logs = sub.add_parser("logs", help="a flow run's log; follows it while it runs (Ctrl-C stops following)")
    logs.add_argument("run", help="flow run name or id (see `loraflow runs`)")
    logs.set_defaults(fn=cmd_logs)

    val = sub.add_parser(
        "validate", help="check a dataset against a data contract (exit 0 pass, 1 violated, 2 usage error)"
    )
    val.add_argument("data", help="dataset file: JSONL, JSON, CSV or Parquet")
    val.add_argument(
        "--contract", default="instruction_v1", help="contract name in data_contracts/ (default: instruction_v1)"
    )
    val.add_argument("--out", help="folder for the report and split files (default: $LORAFLOW_HOME/validate/<name>)")
    val.add_argument(
        "--policy",
        choices=["fail", "quarantine"],
        default="fail",
        help="fail: any violation fails; quarantine: set bad rows aside up to the contract's limit",
    )
    val.add_argument("--tokenizer", help="model folder whose tokenizer measures example length (with --max-seq-length)")
    val.add_argument("--max-seq-length", type=int, help="training max_seq_length the examples must fit")
    val.set_defaults(fn=cmd_validate)

    dep = sub.add_parser(
        "deploy",
        help="create the cpu/gpu work pools and apply the finetune, nightly-retrain and train deployments (idempotent)",
    )
    dep.add_argument("--config", default=str(DEMO_CONFIG), help="run config whose values fill the UI form's defaults")
    dep.add_argument(
        "--alert-webhook",
        metavar="URL",
        help="POST here when a finetune/train run fails or crashes (Prefect automation)",
    )
    dep.set_defaults(fn=cmd_deploy)

    tracking_help = "MLflow tracking URI (default: the local stack's MLflow server)"
    rules_help = "take the promotion rules from this run config (default: the config the version was trained with)"
    pro = sub.add_parser(
        "promote", help="gate a registered version against the champion and move `champion` to it if it passes"
    )
    pro.add_argument("name", help="registered model name")
    pro.add_argument("--version", required=True, help="version number (or models:/NAME/N)")
    pro.add_argument("--reason", help="why; written to the audit trail (required with --force)")
    pro.add_argument(
        "--force", action="store_true", help="promote even if metric rules fail (never past integrity checks)"
    )
    pro.add_argument("--config", help=rules_help)
    pro.add_argument("--tracking-uri", help=tracking_help)
    pro.set_defaults(fn=cmd_promote)

    rb = sub.add_parser("rollback", help="point `champion` back at `previous-champion` (audited)")
    rb.add_argument("name", help="registered model name")
    rb.add_argument("--reason", help="why; written to the audit trail")
    rb.add_argument("--config", help="take identity and lock timeout from this run config's promotion section")
    rb.add_argument("--tracking-uri", help=tracking_help)
    rb.set_defaults(fn=cmd_rollback)

    his = sub.add_parser("history", help="versions, lineage and alias moves of a registered model")
    his.add_argument("name", help="registered model name")
    his.add_argument("--at", metavar="DATE", help="which version was champion then (ISO date = end of that day, UTC)")
    his.add_argument("--version", help="print this version's full lineage")
    his.add_argument("--json", action="store_true", help="machine-readable output")
    his.add_argument("--report", metavar="PATH.html", help="write an HTML report with a metrics plot")
    his.add_argument("--tracking-uri", help=tracking_help)
    his.set_defaults(fn=cmd_history)

    gc = sub.add_parser("gc", help="remove old run folders, merged models and finished checkpoints (retention)")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed and freed; remove nothing")
    gc.add_argument("--config", help="take the retention section from this run config (default: the demo's)")
    gc.add_argument("--tracking-uri", help=tracking_help)
    gc.set_defaults(fn=cmd_gc)

    sub.add_parser("config-schema", help="print the JSON schema of the run configuration").set_defaults(
        fn=cmd_config_schema
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in OFFLINE_AND_QUIET.items():
        os.environ.setdefault(key, value)
    silence_known_noise()
    args = build_parser().parse_args(argv)
    install_log_redaction()
    with redacted_output():  # all the terminal sees, Prefect's console logs and tracebacks included
        try:
            return args.fn(args)
        except LoraflowError as e:
            print(f"loraflow {args.command}: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception:  # a bug: the traceback Python would print, but through the redacted stream
            traceback.print_exc()
            return 1


if __name__ == "__main__":
    sys.exit(main())
