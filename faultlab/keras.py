"""faultlab.keras: faults in your own Keras model and custom training loop (public API).

The implementation lives in the TensorFlow backend (``faultlab/backends/tf/keras_api.py``,
whose docstring shows a whole loop); this is its stable public path. Names are imported on
first use, and TensorFlow only with ``Injector``, ``TFWorkload`` (what a ``module:function``
TF user workload returns), ``TFCheckpointAdapter`` (Keras state <-> the checkpoint engine) and
``Protector`` (detection, rollback and deterministic replay for your custom loop; its
``ProtectionReport`` says what happened: docs/tensorflow.md, "Protecting your Keras loop").
"""

from __future__ import annotations

from faultlab.lazy import lazy_exports

_EXPORTS = {n: "faultlab.backends.tf.keras_api" for n in (
    "Injector", "fault", "faults_from_campaign", "configure_cpu_devices", "cpu_devices",
    "operand_table", "layer_names")}
_EXPORTS["TFWorkload"] = "faultlab.backends.tf.trainer"
_EXPORTS["TFCheckpointAdapter"] = "faultlab.backends.tf.adapter"
_EXPORTS.update(Protector="faultlab.backends.tf.protector",
                ProtectionReport="faultlab.backends.tf.protector")

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
