"""The Interactions gRPC service: validates events, logs them to PostgreSQL and
keeps the per-user state tables in sync in the same transaction."""
