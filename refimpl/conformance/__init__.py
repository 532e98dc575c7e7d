"""The conformance harness: check any implementation of refimpl's ops against the reference.

Public surface: :func:`run`, :func:`assert_conforms`, the :class:`Target` protocol,
:func:`get_target`, the ``refimpl conform`` command and the pytest plugin
(``pytest --refimpl-target=...``). See ``runner`` for the tiers, ``table`` for the
op table, ``tolerance`` for what "agrees" means.
"""

from __future__ import annotations

from refimpl.conformance.runner import RunResult, assert_conforms, run
from refimpl.conformance.table import TIERS, OpSpec, op_table, select
from refimpl.conformance.targets import Target, get_target

__all__ = ["TIERS", "OpSpec", "RunResult", "Target", "assert_conforms", "get_target", "op_table", "run", "select"]
