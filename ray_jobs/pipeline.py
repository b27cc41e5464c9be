"""Every stage on a Ray cluster, resuming from the artifact store — the same library call as `sidrec pipeline`.

    ray job submit --working-dir . -- python ray_jobs/pipeline.py --config qwen2.5-0.5b-gpu \
        data.path=/data/amazon18-industrial store.root=s3://bucket/sidrec
"""

import sys
from pathlib import Path

try:
    import sidrec  # noqa: F401  (installed on the cluster)
except ImportError:  # running from a checkout / uploaded working dir
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from sidrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
