"""The ``store`` params section: where the results store lives."""

from __future__ import annotations

from pydantic import model_validator

from core.section import Section


class StoreParams(Section):
    """Results store. Any SQLAlchemy URL works; SQLite paths are relative to the repo root."""

    url: str = "sqlite:///outputs/centralized.db"

    @model_validator(mode="after")
    def _has_scheme(self) -> StoreParams:
        if "://" not in self.url:
            raise ValueError("url must be a SQLAlchemy URL such as sqlite:///outputs/centralized.db")
        return self
