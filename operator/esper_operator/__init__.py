"""The Esper operator: reconciles Blueprints into Kernels and compile Jobs (kopf handlers in handlers.py)."""
