"""The processes of one host: with --workers N a supervisor and N spawned
workers; the malloc settings and trimming of a serving process. Nothing here
imports gRPC or the server: the supervisor is handed the database side and
what each worker serves (a `ServerFactory`), like uvicorn's supervisors are
handed their `target`."""

from interactions_server.process._malloc import memory_returned
from interactions_server.process._supervisor import DatabaseSide, Supervisor, supervise
from interactions_server.process._worker import ServerFactory, Serving

__all__ = ["DatabaseSide", "ServerFactory", "Serving", "Supervisor", "memory_returned", "supervise"]
