"""Keras Adam with TF's fused ResourceApplyAdam update (what TF2 Keras optimizers and the ISCA
artifact used): one op per variable and replica, epsilon 1e-8 as torch's."""

from __future__ import annotations

import keras

from faultlab.backends.tf.runtime import tf


class FaultlabAdam(keras.optimizers.Adam):
    """Keras Adam whose update is TF's fused ResourceApplyAdam kernel (see module docstring):
    one op per variable and replica instead of a dozen, which also makes tracing faster."""

    def update_step(self, gradient, variable, learning_rate):
        dt = variable.dtype
        i = self._get_variable_index(variable)
        m, v = self._momentums[i], self._velocities[i]
        t = tf.cast(self.iterations + 1, dt)
        b1, b2 = tf.cast(self.beta_1, dt), tf.cast(self.beta_2, dt)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=_handle(m), v=_handle(v), beta1_power=tf.pow(b1, t),
            beta2_power=tf.pow(b2, t), lr=tf.cast(learning_rate, dt), beta1=b1, beta2=b2,
            epsilon=tf.cast(self.epsilon, dt), grad=tf.cast(gradient, dt), use_locking=False)


def _handle(v):
    return (v.value if isinstance(v, keras.Variable) else v).handle
