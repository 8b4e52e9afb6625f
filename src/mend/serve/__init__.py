"""`mend serve`: an HTTP service and web page over a model kept edited by a MendEditor."""

from mend.serve.app import check_auth, create_app, load_token, serve
from mend.serve.engine import Engine, RWLock
from mend.serve.journal import Journal

__all__ = ["Engine", "Journal", "RWLock", "check_auth", "create_app", "load_token", "serve"]
