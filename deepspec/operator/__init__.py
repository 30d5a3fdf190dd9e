"""Kubernetes operator for DraftTraining resources (kopf handlers over pure builders)."""
