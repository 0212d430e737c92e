"""Results store: SQLAlchemy models (``db.models``) and the transactional store (``db.store``)."""

from db.store import ResultsStore, StoreError, open_store

__all__ = ["ResultsStore", "StoreError", "open_store"]
