"""The supervisor's QMP client: ``qemu.qmp``'s, without the cost of its message log.

``qemu.qmp``'s protocol hooks (``_cb_outbound`` and ``_cb_inbound``, which it documents
as the place for subclasses to hook in) log every message at DEBUG, and build the text
first whatever the logger's level: ``str(msg)`` is a pretty-printed JSON dump, and the
``indent`` it asks for makes :mod:`json` use its pure-Python encoder. On the 2-core test
host that was most of the supervisor's CPU in a restored sandbox's start (the device
walk's ~400 ``qom-list`` replies). These hooks build the text only when DEBUG is on.
"""

from __future__ import annotations

import logging

from qemu.qmp import QMPClient
from qemu.qmp.message import Message


class QuietQMPClient(QMPClient):
    """A :class:`qemu.qmp.QMPClient` that formats a message only to log it."""

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", msg)
        return msg
