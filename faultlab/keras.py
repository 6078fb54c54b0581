"""faultlab.keras: faults in your own Keras model and custom training loop (public API).

The implementation lives in the TensorFlow backend (``faultlab/backends/tf/keras_api.py``,
whose docstring shows a whole loop); this is its stable public path. Importing it does not
start TensorFlow: ``Injector`` is imported on first use.
"""

from faultlab.backends.tf import keras_api as _impl
from faultlab.backends.tf.keras_api import (configure_cpu_devices, cpu_devices, fault,
                                            faults_from_campaign, layer_names, operand_table)

__all__ = ["Injector", "TFWorkload", "fault", "faults_from_campaign", "configure_cpu_devices", "cpu_devices",
           "operand_table", "layer_names"]


def __getattr__(name):
    # imported when first asked for: these import TensorFlow
    if name == "TFWorkload":     # what a `module:function` TF user workload returns
        from faultlab.backends.tf.trainer import TFWorkload
        return TFWorkload
    return getattr(_impl, name)   # Injector
