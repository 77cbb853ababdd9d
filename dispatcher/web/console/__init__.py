"""The operator console: HTML pages under ``/ui/`` on the admin listener (``pages``), its
sign-in sessions (``session``), templates and static files shipped as package data."""
