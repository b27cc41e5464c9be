"""Build item Semantic IDs on a Ray cluster — the same library call as `sidrec sids build`.

    ray job submit --working-dir . -- python ray_jobs/build_sids.py --config ml-100k \
        data.path=/data/ml-100k store.root=s3://bucket/sidrec
"""

import sys
from pathlib import Path

try:
    import sidrec  # noqa: F401  (installed on the cluster)
except ImportError:  # running from a checkout / uploaded working dir
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from sidrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["sids", "build", *sys.argv[1:]]))
