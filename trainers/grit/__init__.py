"""GRIT: rank-space natural-gradient preconditioning and reprojection for LoRA.

Public API: ``GritParams``, ``GritManager`` (``manager.covariances``, ``precondition``,
``wrap_optimizer``, ``callback``, ``diagnostics``, ``state_dict`` / ``load_state_dict``).
The manager is imported lazily so that reading the config (params validation) stays light.
"""

from trainers.grit.config import GritParams

__all__ = ["GritParams", "GritError", "GritManager"]


def __getattr__(name: str):
    if name in ("GritManager", "GritError"):
        from trainers.grit import manager

        return getattr(manager, name)
    raise AttributeError(name)
