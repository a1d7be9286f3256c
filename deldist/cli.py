"""``deldist <stage> --config cfg.yaml [key=value ...]``.

Each stage is a module with ``Config`` and ``run(config)``; the ``jobs/`` entry points call
:func:`main` too, so ``ray job submit`` and the CLI run the same code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from deldist.config import load_config

# stage name -> module holding Config and run(config)
STAGES: dict[str, str] = {
    "embed": "deldist.embed",
    "cluster": "deldist.cluster",
    "dedup": "deldist.dedup",
    "select": "deldist.select",
    "curate": "deldist.curate",
    "curate-new": "deldist.curate_new",
    "materialize": "deldist.materialize",
    "pretrain": "deldist.pretrain",
    "finetune": "deldist.finetune",
    "report": "deldist.report",
    "verify": "deldist.verify",
}


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
    return verify.run(verify.Config(output=root))


def main(argv: list[str] | None = None, stage: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deldist", description=__doc__)
    if stage is None:
        parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--config", help="YAML config (local path or s3:// URI)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local cluster)")
    parser.add_argument("--html", action="store_true", help="write the HTML curation report (= html=true; "
                                                             "report, curate)")
    parser.add_argument("--no-verify", action="store_true", help="skip the closing deldist verify of the run root")
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
    config = load_config(module.Config, args.config, overrides, section=name.replace("-", "_"))
    if args.address:
        import os

        os.environ["RAY_ADDRESS"] = args.address
    if name == "verify":
        result = module.run(config.model_copy(update={"fail": False}))
        return 0 if result["ok"] else 1
    result = module.run(config)
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    if not args.no_verify:
        verify_after(name, config, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
