"""The serving benchmark, from a checkout: the same as `pdserve bench` (pdserve/bench/serving.py
says what it measures and how).

    python benchmarks/serving.py --model smollm2-135m
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.bench.serving import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
