"""The errors that mean PostgreSQL or Redis cannot be reached (or is too busy) now.

Tasks retry them; a task that runs out of retries ends with them as
`ServiceUnavailable`; the CLI names the server and the settings to check. Apart
from `sentiment.errors`, which imports nothing heavy: the CLI loads these only
once something failed.
"""

from __future__ import annotations

import redis.exceptions
import sqlalchemy.exc

__all__ = ["POSTGRES_DOWN", "REDIS_DOWN"]

# OperationalError covers a server gone, and lock and statement timeouts.
POSTGRES_DOWN = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
