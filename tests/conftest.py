import sys
from pathlib import Path

# the pack root, so ``antipure_core`` and ``tests.toy`` import without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
