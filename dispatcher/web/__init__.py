"""The HTTP side: probes and metrics (``probes``), the ``/v1`` admin API (``admin_api``), its
OpenAPI document (``openapi``) and the operator console under ``/ui`` (``console``)."""
