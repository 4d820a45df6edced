"""The Django app of django-pgmigrate: runs `migrate` through pgmigrate-proxy."""

from pgmigrate_proxy import __version__

from pgmigrate.actions import BlockingAction, Cancel, Drain, Show, Terminate

__all__ = ["BlockingAction", "Cancel", "Drain", "Show", "Terminate", "__version__"]
