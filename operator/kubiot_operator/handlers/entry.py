"""For `kopf run -m kubiot_operator.handlers.entry`: the handlers on kopf's default registry."""

from __future__ import annotations

import kopf

from kubiot_operator.handlers import Operator
from kubiot_operator.settings import OperatorSettings

operator = Operator(OperatorSettings(), registry=kopf.get_default_registry())
