"""``deldist <stage> --config cfg.yaml [key=value ...]``.

Each stage is a module with ``Config`` and ``run(config)``; the ``jobs/`` entry points call
:func:`main` too, so ``ray job submit`` and the CLI run the same code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any, TextIO

import deldist
from deldist import storage
from deldist.config import config_help, load_configs

# stage name -> module holding Config and run(config)
STAGES: dict[str, str] = {
    "embed": "deldist.embed",
    "cluster": "deldist.cluster",
    "dedup": "deldist.dedup",
    "select": "deldist.select",
    "sweep": "deldist.sweep",
    "curate": "deldist.curate",
    "curate-new": "deldist.curate_new",
    "materialize": "deldist.materialize",
    "pretrain": "deldist.pretrain",
    "finetune": "deldist.finetune",
    "prune": "deldist.prune",
    "report": "deldist.report",
    "verify": "deldist.verify",
    "distill": "deldist.distill_ray",
}

# stages whose output root need not be a curation run root (no embeddings/): verified after
# the run only when it is one
STANDALONE = {"distill"}


def _run_root(config: object) -> str | None:
    """The run root a stage wrote into (curate-new writes into its corpus)."""
    return getattr(config, "output", None) or getattr(config, "corpus", None)


def verify_after(name: str, config: object, result: object) -> dict | None:
    """Every job ends by checking its run root (``deldist verify``): ids and footers only.
    Raises :class:`deldist.verify.VerificationError` when an invariant fails."""
    from deldist import verify

    root = _run_root(config)
    if name == "verify" or root is None or (isinstance(result, dict) and result.get("published") is False):
        return None
    if name in STANDALONE and not storage.is_published(storage.join(root, "embeddings")):
        return None
    return verify.run(verify.Config(output=root))


def _stage_in(argv: list[str]) -> str | None:
    """The stage named on the command line (the first word that is one), for per-stage help."""
    return next((a for a in argv if a in STAGES), None)


class _CurrentStderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a message is written (it may be replaced
    after set-up: by a test's capture, a notebook)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """deldist's own messages (``deldist.*`` loggers) as plain lines on ``stream``; stdout is
    left to the result JSON, so ``deldist select ... | jq`` works."""
    logger = logging.getLogger("deldist")
    logger.handlers[:] = [logging.StreamHandler(stream) if stream is not None else _CurrentStderr()]
    logger.handlers[0].setFormatter(logging.Formatter("%(message)s"))
    logger.setLevel(level.upper())
    logger.propagate = False


def parse_command(argv: list[str], stage: str | None = None) -> tuple[str, Any, argparse.Namespace, list[Any]]:
    """Parse a command line -> (stage name, its module, the flags, the validated configs): every
    key and value checked before anything runs."""
    named = stage or _stage_in(argv)
    module = importlib.import_module(STAGES[named]) if named else None
    parser = argparse.ArgumentParser(
        prog=f"deldist {named}" if named else "deldist", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_help(module.Config) if module else "stages: " + ", ".join(sorted(STAGES)))
    parser.add_argument("--version", action="version", version=f"deldist {deldist.__version__}")
    if stage is None:
        parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--config", help="YAML config (local path or s3:// URI)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local cluster)")
    parser.add_argument("--html", action="store_true", help="write the HTML curation report (= html=true; "
                                                             "report, curate)")
    parser.add_argument("--no-verify", action="store_true", help="skip the closing deldist verify of the run root")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, its sizes and a time / cost "
                                                                "estimate; write nothing, start no Ray cluster")
    parser.add_argument("--cost-model", metavar="FILE", help="YAML of deldist.dry_run.CostModel fields (rates, "
                                                             "cluster shape, prices) for --dry-run")
    parser.add_argument("--json", metavar="FILE", help="write the result JSON to FILE instead of stdout")
    parser.add_argument("--log-level", default="INFO", help="deldist's messages on stderr: DEBUG, INFO, WARNING")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nesting "
                                                     "(verify: the run root alone is output=<root>)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --config
    name = stage or args.stage
    module = importlib.import_module(STAGES[name])
    overrides = [o if "=" in o or name != "verify" else f"output={o}" for o in args.overrides]
    if args.html:  # one way to configure it: the flag is the config field
        if "html" not in module.Config.model_fields:
            parser.error(f"--html does not apply to {name}")
        overrides.append("html=true")
    return name, module, args, load_configs(module.Config, args.config, overrides, section=name.replace("-", "_"))


def main(argv: list[str] | None = None, stage: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name, module, args, configs = parse_command(argv, stage)
    setup_logging(args.log_level)
    if args.dry_run:
        _emit(_dry_run(name, configs, args.cost_model), args.json)
        return 0
    if args.address:
        import os

        os.environ["RAY_ADDRESS"] = args.address
    if name == "verify":
        result = module.run(configs[0].model_copy(update={"fail": False}))
        _emit(result, args.json)
        return 0 if result["ok"] else 1
    results = [module.run(config) for config in configs]  # a list block (select:) runs each entry
    _emit(results[0] if len(results) == 1 else results, args.json)
    if not args.no_verify:
        verify_after(name, configs[-1], results[-1])
    return 0


def _dry_run(name: str, configs: list, cost_model: str | None) -> dict[str, Any]:
    import yaml

    from deldist import dry_run

    cost = dry_run.CostModel.model_validate(yaml.safe_load(storage.read_bytes(cost_model)) if cost_model else {})
    result = dry_run.plan(name, configs, cost)
    log = logging.getLogger("deldist.dry_run")
    log.info(f"deldist {name} --dry-run: would run {', '.join(result['would_run'])}")
    for stage, figures in result["estimate"].items():
        log.info(f"  {stage}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items() if isinstance(v, float)))
    total = result["total"]
    log.info(f"  total on {cost.vcpus} vCPUs + {cost.gpu_nodes} GPUs: {total['wall_h'] * 60:.1f} min, "
             f"${total['cost_usd']:.2f} (assumed rates: --cost-model to give yours)")
    return result


def _emit(result: Any, json_file: str | None) -> None:
    if result is None:
        return
    text = json.dumps(result, indent=2, default=str)
    if json_file:
        storage.write_bytes(json_file, text.encode())
    else:
        print(text)


if __name__ == "__main__":
    sys.exit(main())
