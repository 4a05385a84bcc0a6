"""Server administration: the admin API and the account operations it shares with the client API."""
