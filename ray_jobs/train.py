"""Fine-tune the SID-extended LLM on a Ray cluster — the same library call as `sidrec train`.

    ray job submit --working-dir . -- python ray_jobs/train.py --config qwen2.5-0.5b-gpu \
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
    sys.exit(main(["train", *sys.argv[1:]]))
