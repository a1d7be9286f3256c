"""Entry point for `ray job submit --working-dir . -- python jobs/curate_new.py --config cfg.yaml corpus=... selection=... input=...`."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the uploaded working dir

from deldist.cli import main  # noqa: E402

raise SystemExit(main(stage="curate-new"))
