"""The base class of every params section."""

import hashlib
import json

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A typed section of ``params.yaml``. Unknown keys are errors: a misspelt "learning_rte"
    must not silently fall back to a default. Frozen: a stage cannot change what it was given."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def content_hash(section: BaseModel) -> str:
    """Stable digest of a validated section (defaults filled in, key order irrelevant)."""
    canonical = json.dumps(section.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
