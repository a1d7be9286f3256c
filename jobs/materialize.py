"""Entry point for `ray job submit --working-dir . -- python jobs/materialize.py --config cfg.yaml [key=value ...]`."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the uploaded working dir

from deldist.cli import main  # noqa: E402

raise SystemExit(main(stage="materialize"))
