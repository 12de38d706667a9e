"""Deprecated alias: the speed model moved to ``loka.kernels.costmodel``; this name goes in the next release."""

import sys
import warnings

from loka.kernels import costmodel as _costmodel

warnings.warn("loka.dispatch.costmodel moved to loka.kernels.costmodel; the old name goes in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _costmodel
