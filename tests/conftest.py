import os
import sys

# Tests run on the CPU with the default float32; x64 is switched on locally where needed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

# A rule defined in the tests only joins the registry, so every suite parametrized over
# fa_jax.RULES runs it through its entry point too (tests/scaled_sign.py).
import closed_forms  # noqa: E402
import scaled_sign  # noqa: E402

closed_forms.CLOSED_FORMS[scaled_sign.ScaledSign.name] = scaled_sign.closed_form
