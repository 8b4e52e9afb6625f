"""`mend serve`: an HTTP service and web page over a model kept edited by a MendEditor."""

from mend.serve.app import create_app, load_token, serve, write_mode
from mend.serve.engine import Engine, RWLock
from mend.serve.journal import Journal

__all__ = ["Engine", "Journal", "RWLock", "create_app", "load_token", "serve", "write_mode"]
