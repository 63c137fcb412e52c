"""Leave a file `rank-R` in the folder given: the proof that rank R was started at all.

    python mark_started.py /tmp/.../started
"""

import os
import sys
from pathlib import Path

Path(sys.argv[1], f"rank-{os.environ.get('RANK', 'unknown')}").touch()
print(f"rank {os.environ.get('RANK')} started", flush=True)
