import os
import sys

# Tests run on the CPU with the default float32; x64 is switched on locally where needed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling small programs: skip LLVM's optimisations of the
# generated CPU code (HLO passes, and so every program's dots and FLOPs, are unchanged).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, os.path.dirname(__file__))

# A rule defined in the tests only joins the registry, so every suite parametrized over
# fa_jax.RULES runs it through its entry point too (tests/scaled_sign.py).
import closed_forms
import scaled_sign

closed_forms.CLOSED_FORMS[scaled_sign.ScaledSign.name] = scaled_sign.closed_form
