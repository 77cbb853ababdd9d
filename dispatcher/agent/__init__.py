"""The reference lead-qualification agent (``dispatcher agent``).

It shows the full loop the dispatcher exists for: an API call starts a job, background steps
commit their state together with an outbox event, and the dispatcher delivers the signed
callbacks in order. Modules: ``api`` (aiohttp), ``validation`` (pure request checks),
``store`` (all of its SQL), ``steps`` (the pure pipeline), ``enrichment`` (offline company
table), ``runner`` (background execution), ``app`` (composition root). The agent never sends
HTTP callbacks itself.
"""

from __future__ import annotations
