"""The HTTP side: probes and metrics (``probes``), the ``/v1`` admin API (``admin_api``) and
its OpenAPI document (``openapi``)."""
