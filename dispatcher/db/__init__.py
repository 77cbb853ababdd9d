"""Database access: pool factory, migrations, the repository (the only SQL), LISTEN/NOTIFY."""
