"""The `ray job submit` door: any `sidrec` command, run on the cluster with the same library calls as the CLI.

    ray job submit --working-dir . -- python ray_jobs/run.py pipeline --config qwen2.5-0.5b-gpu \
        data.path=/data/amazon18-industrial store.root=s3://bucket/sidrec
    ray job submit --working-dir . -- python ray_jobs/run.py sids build --config ml-100k store.root=s3://...
    ray job submit --working-dir . -- python ray_jobs/run.py train --config qwen2.5-0.5b-gpu ...
    ray job submit --working-dir . -- python ray_jobs/run.py eval --config qwen2.5-0.5b-gpu eval.gpus_per_actor=1
"""

import sys
from pathlib import Path

try:
    import sidrec  # noqa: F401  (installed on the cluster)
except ImportError:  # running from a checkout / uploaded working dir
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from sidrec.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
