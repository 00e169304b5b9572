"""Where instance files live: a filesystem store with staging, atomic placement and fsync."""

from services.core.storage.filesystem import InstanceStore

__all__ = ["InstanceStore"]
