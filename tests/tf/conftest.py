"""TensorFlow tests: configure TF's runtime (8 logical CPU devices, op determinism) before any
test touches TensorFlow, exactly as the backend does when faultlab imports it. Without the
`tf` extra installed, the whole directory is skipped (with the reason shown by -ra)."""

import pytest

pytest.importorskip("tensorflow", reason="TensorFlow tests need the tf extra: pip install -e '.[tf]'")

import faultlab.backends.tf.trainer  # noqa: E402,F401  (configures TF on import)
