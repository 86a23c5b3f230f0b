"""The MedSAMix server: MONAI Label's REST API (as 3D Slicer's MONAI Label module and the OHIF plugin use it) served
by our own FastAPI application, composed from MONAI Label's public parts (the app instance, its datastores and
sessions) with a security layer: a route policy, validation of every request field, authentication with roles,
browser-origin checks, size limits, non-blocking inference and a supervised training process.

``medsamix-server`` (``python -m medsamix_server``) starts it; ``scripts/serve.sh`` runs it on the demo studies.
The core library (:mod:`medsamix`) does not import this package or MONAI Label.
"""
