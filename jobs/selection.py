"""Entry point for `ray job submit --working-dir . -- python jobs/selection.py --config cfg.yaml [key=value ...]`.

Not named select.py: a jobs/select.py would shadow the stdlib module ``select`` for every script in jobs/.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the uploaded working dir

from deldist.cli import main  # noqa: E402

raise SystemExit(main(stage="select"))
