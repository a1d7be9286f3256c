"""``make demo``: generate the sample data, run the pipeline on a local Ray cluster, print
where everything is. Stages run through the same ``run(config)`` functions as the CLI."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from deldist import embed, sample
from deldist.config import load_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--size", default="demo", choices=["tiny", "demo"])
    parser.add_argument("--config", default=str(CONFIG))
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    data = out / "sample"
    if not (data / "ground_truth.parquet").exists():
        print(f"generating {args.size} sample data into {data} ...")
        print(json.dumps(sample.generate(str(data), size=args.size, seed=0), indent=2))
    run_root = str(out / "run")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    cfg = load_config(embed.Config, args.config, [f"input={data / 'videos'}", f"output={run_root}"],
                      section="embed")
    embed.run(cfg)
    print("\nResults:")
    print(f"  sample data     {data}  (videos/, kvasir/, ground_truth.parquet)")
    print(f"  embeddings      {run_root}/embeddings  (Parquet + _manifest.json)")
    print(f"  errors          {run_root}/errors")
    print("  encoder         vit_tiny_patch16_224, RANDOM-INITIALISED (demo only; see configs/demo.yaml)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
