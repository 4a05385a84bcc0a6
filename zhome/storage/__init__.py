"""Database engines, the connection pool, migrations and the stores."""
