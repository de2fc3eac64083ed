"""The performance benchmark of the Interactions service (issue 5).

`python -m bench` (or `scripts/bench`) starts an embedded PostgreSQL and the
server as a separate process, measures the ceilings and the service against
them on the same machine in the same run, and prints a table. See
docs/performance.md for what each measure means.
"""
