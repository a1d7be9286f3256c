"""``make demo``: generate the sample data, curate it on a local Ray cluster (embed -> cluster
-> dedup -> select), print the selection table and where everything is. Stages run through
the same ``run(config)`` functions as the CLI and the ``jobs/`` entry points."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deldist import curate, report, sample
from deldist.config import load_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--size", default="demo", choices=["tiny", "small", "demo"])
    parser.add_argument("--config", default=str(CONFIG))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    data = out / "sample"
    if not (data / "ground_truth.parquet").exists():
        print(f"generating {args.size} sample data into {data} ...")
        print(json.dumps(sample.generate(str(data), size=args.size, seed=0), indent=2))
    run_root = out / "run"
    cfg = load_config(curate.Config, args.config,
                      [f"input={data / 'videos'}", f"output={run_root}",
                       f"ground_truth={data / 'ground_truth.parquet'}"], section="curate")
    result = curate.run(cfg)
    # MAE pretraining per selection + segmentation finetuning on the Kvasir-style set + NormDEL.
    # engine "local": the same training loop in the driver, since starting a Ray Train worker
    # group per run costs more than these tiny trainings (tests cover the Ray Train path).
    chain = report.run_demo_chain(str(run_root), str(data / "kvasir"),
                                  ["all", *result["selections"]], quick=True, engine="local")
    print("\n" + chain["table"])
    print("\nResults:")
    print(f"  sample data   {data}  (videos/, kvasir/, ground_truth.parquet)")
    print(f"  embeddings    {run_root}/embeddings   errors: {run_root}/errors")
    print(f"  clusters      {run_root}/clusters     scores: {run_root}/dedup/scores")
    for name in result["selections"]:
        print(f"  selection     {run_root}/selections/{name}/  (retained/, removed/, summary.json)")
    print(f"  report        {chain['report']}  (table.csv, table.md)   plot: {chain['plot']}")
    if result.get("html_report"):
        print(f"  HTML report   {result['html_report']}  (duplicate groups, outliers, invalid frames)")
    print("  encoder       vit_tiny_patch16_224, RANDOM-INITIALISED (demo only; see configs/demo.yaml)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
