"""Offline evaluation on a Ray cluster — the same library call as `sidrec eval`.

    ray job submit --working-dir . -- python ray_jobs/evaluate.py --config qwen2.5-0.5b-gpu \
        store.root=s3://bucket/sidrec eval.gpus_per_actor=1 eval.num_actors=4
"""

import sys
from pathlib import Path

try:
    import sidrec  # noqa: F401  (installed on the cluster)
except ImportError:  # running from a checkout / uploaded working dir
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from sidrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
