import os
import sys

# Tests run on the CPU with the default float32; x64 is switched on locally where needed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
