"""Where the serving model lived before 2026-12-02: versions registered then hold a pickled
``loraflow.serving.AdapterModel`` and keep loading through this name. New versions log
loraflow/registry/pyfunc_model.py as their code instead (no pickle)."""

from loraflow.registry.serving import AdapterModel

__all__ = ["AdapterModel"]
